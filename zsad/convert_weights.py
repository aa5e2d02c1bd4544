"""Convert OpenAI and open_clip CLIP checkpoints into Hugging Face CLIP directories (``zsad convert-weights``).

The written directory (``config.json`` + ``model.safetensors``) is what ``create_backbone("<dir>")`` loads, so weights
that only exist as OpenAI ``.pt`` archives or open_clip releases (WinCLIP's ``ViT-B-16-plus-240`` /
``laion400m_e31``) become usable offline and on the shared backbone. The architecture comes from open_clip's model
configs (shipped inside ``open_clip_torch``) or a JSON file in the same format; the key mapping is
``shared/specs/hf_clip.md`` §9.

Only the plain ViT CLIP family maps onto ``transformers.CLIPModel``: open_clip options without an HF counterpart
(timm or HF-transformer towers, attentional pooling, average pooling, layer scale, no ``ln_pre``, ...) are refused
with an error naming the option.

Example:
    >>> from zsad.convert_weights import open_clip_config_to_hf
    >>> cfg = open_clip_config_to_hf("ViT-B-16-plus-240")
    >>> cfg.vision_config.hidden_size, cfg.vision_config.num_attention_heads, cfg.projection_dim
    (896, 14, 640)
"""

from __future__ import annotations

import argparse
import json
import logging
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from transformers import CLIPConfig, CLIPModel
from transformers.initialization import no_init_weights

from zsad.methods.checkpoint_io import OfficialCheckpointError, check_finite, read_checkpoint_file

logger = logging.getLogger(__name__)

Format = Literal["open_clip", "openai"]

#: Vision-tower options of open_clip whose value must be the default for the tower to be a plain HF CLIP tower.
_VISION_DEFAULTS: dict[str, object] = {
    "ls_init_value": None,
    "attentional_pool": False,
    "no_ln_pre": False,
    "pos_embed_type": "learnable",
    "final_ln_after_pool": False,
    "pool_type": "tok",
    "timm_model_name": None,
}
#: Likewise for the text tower.
_TEXT_DEFAULTS: dict[str, object] = {
    "ls_init_value": None,
    "embed_cls": False,
    "no_causal_mask": False,
    "final_ln_after_pool": False,
    "pool_type": "argmax",
    "proj_bias": False,
    "hf_model_name": None,
}
#: Non-parameter entries of open_clip / OpenAI state dicts (buffers and JIT metadata).
_DROPPED_KEYS = ("attn_mask", "input_resolution", "context_length", "vocab_size")


class WeightConversionError(ValueError):
    """An architecture or checkpoint that cannot be converted to a Hugging Face CLIP."""


# --------------------------------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------------------------------


def open_clip_model_config(arch: str) -> dict:
    """The open_clip model config of ``arch``: an open_clip model name or the path of a JSON file in its format.

    Raises:
        WeightConversionError: Neither a known open_clip model name nor a readable JSON file.
    """
    path = Path(arch).expanduser()
    if arch.endswith(".json") or path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            msg = f"{str(path)!r} is not a readable open_clip model config (JSON with embed_dim, vision_cfg, text_cfg)."
            raise WeightConversionError(msg) from err
    import open_clip

    config = open_clip.get_model_config(arch)
    if config is None:
        known = ", ".join(n for n in open_clip.list_models() if n.startswith("ViT"))
        msg = f"Unknown open_clip architecture {arch!r}; pass a model name ({known}) or a JSON config file."
        raise WeightConversionError(msg)
    return config


def _check_defaults(cfg: Mapping, defaults: Mapping[str, object], tower: str, arch: str) -> None:
    for key, default in defaults.items():
        if cfg.get(key, default) != default:
            msg = (
                f"open_clip architecture {arch!r}: {tower}_cfg.{key}={cfg[key]!r} has no Hugging Face CLIP "
                f"counterpart (supported: {default!r}); only plain ViT CLIP models can be converted."
            )
            raise WeightConversionError(msg)


def _layer_norm_eps(cfg: Mapping) -> float:
    return float((cfg.get("norm_kwargs") or {}).get("eps", 1e-5))


def open_clip_config_to_hf(arch: str | Mapping, quick_gelu: bool | None = None) -> CLIPConfig:
    """Build the :class:`~transformers.CLIPConfig` of an open_clip ViT architecture.

    Args:
        arch: An open_clip model name (``"ViT-B-16-plus-240"``), a JSON config path, or the config dict itself.
        quick_gelu: Activation override: ``True`` = QuickGELU (OpenAI weights), ``False`` = exact GELU; ``None``
            reads the config's ``quick_gelu`` flag (open_clip's default: GELU).

    Returns:
        The configuration (``projection_dim`` set in both sub-configs, as HF reads it from there).

    Raises:
        WeightConversionError: The architecture has a tower or option without a Hugging Face CLIP counterpart.
    """
    name = arch if isinstance(arch, str) else "<config>"
    cfg = dict(open_clip_model_config(arch) if isinstance(arch, str) else arch)
    vision, text = dict(cfg.get("vision_cfg", {})), dict(cfg.get("text_cfg", {}))
    if "embed_dim" not in cfg or not vision or not text:
        msg = f"open_clip architecture {name!r} lacks embed_dim, vision_cfg or text_cfg."
        raise WeightConversionError(msg)
    if not isinstance(vision.get("layers", 12), int):
        msg = f"open_clip architecture {name!r} has a ResNet image tower; only ViT towers can be converted."
        raise WeightConversionError(msg)
    _check_defaults(vision, _VISION_DEFAULTS, "vision", name)
    _check_defaults(text, _TEXT_DEFAULTS, "text", name)
    for tower, sub in (("vision", vision), ("text", text)):
        if sub.get("act_kwargs"):
            msg = f"open_clip architecture {name!r}: {tower}_cfg.act_kwargs is not supported."
            raise WeightConversionError(msg)
    act = "quick_gelu" if (cfg.get("quick_gelu", False) if quick_gelu is None else quick_gelu) else "gelu"
    image_size, patch_size = vision.get("image_size", 224), vision.get("patch_size", 16)
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        msg = f"open_clip architecture {name!r}: only square image and patch sizes are supported."
        raise WeightConversionError(msg)
    v_width, t_width = int(vision.get("width", 768)), int(text.get("width", 512))
    projection_dim = int(cfg["embed_dim"])
    vision_config = {
        "hidden_size": v_width,
        "intermediate_size": int(v_width * float(vision.get("mlp_ratio", 4.0))),
        "num_hidden_layers": int(vision.get("layers", 12)),
        # open_clip derives the head count from the head width; HF stores the count.
        "num_attention_heads": v_width // int(vision.get("head_width", 64)),
        "image_size": image_size,
        "patch_size": patch_size,
        "num_channels": 3,
        "hidden_act": act,
        "layer_norm_eps": _layer_norm_eps(vision),
        "projection_dim": projection_dim,
    }
    text_config = {
        "vocab_size": int(text.get("vocab_size", 49408)),
        "hidden_size": t_width,
        "intermediate_size": int(t_width * float(text.get("mlp_ratio", 4.0))),
        "num_hidden_layers": int(text.get("layers", 12)),
        "num_attention_heads": int(text.get("heads", 8)),
        "max_position_embeddings": int(text.get("context_length", 77)),
        "hidden_act": act,
        "layer_norm_eps": _layer_norm_eps(text),
        "projection_dim": projection_dim,
        # OpenAI BPE ids; pooling is at the argmax id (= <|endoftext|>), as open_clip's "argmax" text pool.
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim)


# --------------------------------------------------------------------------------------------------------------------
# State dict
# --------------------------------------------------------------------------------------------------------------------

_BLOCK_MAP = {
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_TOP_MAP = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}


def _unwrap(state: Mapping, source: str) -> dict[str, torch.Tensor]:
    """The bare model state dict of a training checkpoint (``{"state_dict": ...}``, DDP ``module.`` prefixes)."""
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = key.removeprefix("module.")
        # open_clip's CustomTextCLIP keeps the text tower under `text.`; the plain CLIP has it at the top level.
        if key.startswith("text.") and not key.startswith("text_projection"):
            key = key.removeprefix("text.")
        out[key] = value
    if not out:
        msg = f"{source}: no tensors found; not an open_clip / OpenAI CLIP checkpoint."
        raise OfficialCheckpointError(msg)
    return out


def convert_state_dict(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Map an open_clip / OpenAI CLIP state dict to ``transformers.CLIPModel`` keys (``hf_clip.md`` §9).

    ``in_proj_weight``/``bias`` are split into q, k, v; ``visual.proj`` and ``text_projection`` (used as
    ``x @ proj``) are transposed into ``Linear`` weights. Values are cast to float32 (OpenAI archives are fp16).

    Args:
        state: The state dict (``visual.*``, ``transformer.*``, ``token_embedding.*``, ...).
        source: Name of the file, for the messages.

    Returns:
        The Hugging Face state dict.

    Raises:
        OfficialCheckpointError: A key that belongs to no plain ViT CLIP (a ResNet or timm tower, attentional pool).
    """
    state = _unwrap(state, source)
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        value = value.float() if value.is_floating_point() else value
        if key in _TOP_MAP:
            out[_TOP_MAP[key]] = value
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif key.startswith(("visual.transformer.resblocks.", "transformer.resblocks.")):
            tower = "vision_model" if key.startswith("visual.") else "text_model"
            index, rest = key.split("resblocks.", 1)[1].split(".", 1)
            prefix = f"{tower}.encoder.layers.{index}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]  # weight | bias
                for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                    out[f"{prefix}self_attn.{name}_proj.{kind}"] = part.contiguous()
            elif rest in _BLOCK_MAP:
                out[prefix + _BLOCK_MAP[rest]] = value
            else:
                unknown.append(key)
        elif key.rsplit(".", 1)[-1] in _DROPPED_KEYS or key in _DROPPED_KEYS:
            continue
        else:
            unknown.append(key)
    if unknown:
        msg = (
            f"{source}: {len(unknown)} keys of no plain ViT CLIP (e.g. {sorted(unknown)[:5]}); only open_clip / OpenAI "
            "ViT checkpoints (visual.transformer.resblocks.*, transformer.resblocks.*) can be converted."
        )
        raise OfficialCheckpointError(msg)
    return out


def _read_state(path: Path, fmt: Format) -> Mapping:
    """Read the checkpoint; OpenAI's released ``.pt`` files are TorchScript archives, read with ``torch.jit.load``."""
    what = "OpenAI CLIP .pt file" if fmt == "openai" else "open_clip checkpoint"
    if not path.is_file():
        msg = f"{what} {str(path)!r} not found."
        raise FileNotFoundError(msg)
    if fmt == "openai" and zipfile.is_zipfile(path):
        try:
            return torch.jit.load(str(path), map_location="cpu").state_dict()
        except RuntimeError:
            pass  # a plain (non-JIT) state dict saved by torch.save: read it safely below
    return read_checkpoint_file(path, what)


def convert_weights(
    fmt: Format,
    arch: str,
    input_path: str | Path,
    output_dir: str | Path,
    quick_gelu: bool | None = None,
) -> Path:
    """Convert one checkpoint file into a Hugging Face CLIP directory usable as ``backbone=<output_dir>``.

    Args:
        fmt: ``"open_clip"`` (an open_clip release or training checkpoint) or ``"openai"`` (OpenAI's ``.pt``).
        arch: open_clip model name or JSON config path describing the architecture.
        input_path: The checkpoint file.
        output_dir: Directory to write ``config.json`` and ``model.safetensors`` into (created).
        quick_gelu: Activation override; ``None`` = QuickGELU for ``openai`` (its models were trained with it), the
            config's ``quick_gelu`` flag for ``open_clip``.

    Returns:
        The output directory.

    Raises:
        FileNotFoundError: ``input_path`` does not exist.
        OfficialCheckpointError: The file is unreadable, holds non-finite values, or does not fit ``arch``.
        WeightConversionError: ``arch`` has no Hugging Face CLIP counterpart.
    """
    if fmt not in ("open_clip", "openai"):
        msg = f"format must be 'open_clip' or 'openai', got {fmt!r}."
        raise ValueError(msg)
    if quick_gelu is None and fmt == "openai":
        quick_gelu = True
    config = open_clip_config_to_hf(arch, quick_gelu=quick_gelu)
    path = Path(input_path).expanduser()
    source = str(path)
    hf_state = convert_state_dict(_read_state(path, fmt), source)
    check_finite(hf_state, source)
    # Shapes from a model on the meta device: no memory, no random initialisation of 100M+ parameters.
    with torch.device("meta"):
        expected = {k: v.shape for k, v in CLIPModel(config).state_dict().items() if not k.endswith("position_ids")}
    missing = sorted(set(expected) - set(hf_state))
    mismatched = [f"{k}: {tuple(hf_state[k].shape)} vs {tuple(s)}" for k, s in expected.items() if k in hf_state
                  and hf_state[k].shape != s]  # fmt: skip
    if missing or mismatched:
        msg = (
            f"{source} does not fit the architecture {arch!r}: "
            + (f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}; " if missing else "")
            + (f"shape mismatch {mismatched[:3]}" if mismatched else "")
            + ". Pass the --arch the checkpoint was trained with."
        )
        raise OfficialCheckpointError(msg)
    with no_init_weights():  # every parameter is overwritten below
        model = CLIPModel(config)
    model.load_state_dict(hf_state, strict=False)  # position_ids buffers keep their defaults
    out = Path(output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """``zsad convert-weights``: OpenAI / open_clip checkpoint → Hugging Face CLIP directory."""
    parser = argparse.ArgumentParser(
        prog="zsad convert-weights",
        description=(
            "Convert an OpenAI .pt or open_clip CLIP checkpoint into a Hugging Face CLIP directory "
            "(config.json + model.safetensors) usable as --model.init_args.backbone=<dir>, offline."
        ),
        epilog=(
            "Example (WinCLIP's backbone): zsad convert-weights --format open_clip --arch ViT-B-16-plus-240 "
            "--input ~/.cache/clip/vit_b_16_plus_240-laion400m_e31-8fb26589.pt "
            "--output weights/vit_b_16_plus_240-laion400m_e31"
        ),
    )
    parser.add_argument("--format", required=True, choices=["open_clip", "openai"], help="Checkpoint format.")
    parser.add_argument("--arch", required=True, help="open_clip model name (e.g. ViT-B-16-plus-240) or JSON config.")
    parser.add_argument("--input", required=True, help="Checkpoint file (.pt / .pth / .bin).")
    parser.add_argument("--output", required=True, help="Output directory.")
    act = parser.add_mutually_exclusive_group()
    act.add_argument("--quick-gelu", dest="quick_gelu", action="store_const", const=True, default=None,
                     help="Force QuickGELU (default for --format openai).")  # fmt: skip
    act.add_argument("--gelu", dest="quick_gelu", action="store_const", const=False,
                     help="Force exact GELU (default for open_clip configs without quick_gelu).")  # fmt: skip
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        out = convert_weights(args.format, args.arch, args.input, args.output, quick_gelu=args.quick_gelu)
    except (FileNotFoundError, OfficialCheckpointError, WeightConversionError) as err:
        parser.exit(2, f"zsad convert-weights: error: {err}\n")
    print(f"Wrote Hugging Face CLIP ({args.arch}, {args.format}) to {out}/ (config.json, model.safetensors)")


if __name__ == "__main__":
    main()
