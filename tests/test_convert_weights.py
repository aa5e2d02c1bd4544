"""`zsad convert-weights`: open_clip / OpenAI CLIP checkpoints become Hugging Face directories that the shared backbone
loads, with the same image and text features as open_clip (random weights, small architectures)."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from zsad.backbone import architecture_config, create_backbone
from zsad.cli import main as zsad_main
from zsad.convert_weights import WeightConversionError, convert_weights, open_clip_config_to_hf
from zsad.methods.checkpoint_io import OfficialCheckpointError

#: A small open_clip ViT (2 heads of 32 in both towers, 5x5 grid at 80 px); real vocabulary so real prompts work.
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 80, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
PROMPTS = ["a photo of a damaged bottle.", "a cropped photo of the flawless concrete block.", "x"]


def _open_clip_model(tmp_path: Path, quick_gelu: bool = False, seed: int = 0) -> tuple[torch.nn.Module, Path, Path]:
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**TINY, quick_gelu=quick_gelu).eval()
    # Non-trivial layer norms and logit scale: an identity LN would hide a swapped ln_pre / ln_post.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.3 * torch.randn_like(p))
    arch = tmp_path / "tiny_open_clip.json"
    arch.write_text(json.dumps(TINY))
    return model, arch, tmp_path / "tiny.pt"


def _features_match(model: torch.nn.Module, directory: Path) -> None:
    backbone = create_backbone(str(directory))
    images = torch.randn(2, 3, 80, 80)
    with torch.no_grad():
        image_ref = model.encode_image(images)
        text_ref = model.encode_text(open_clip.tokenize(PROMPTS))
    image = backbone.encode_image(images).global_embedding
    text = backbone.encode_text(PROMPTS)
    assert image_ref.abs().mean() > 0.1  # a non-trivial comparison
    torch.testing.assert_close(image, image_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(text, text_ref, atol=1e-5, rtol=0)


def test_open_clip_checkpoint_converts_to_the_same_image_and_text_features(tmp_path, capsys) -> None:
    model, arch, ckpt = _open_clip_model(tmp_path)
    # A training checkpoint as open_clip writes it: {"epoch", "state_dict"} with DDP "module." prefixes.
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    out = tmp_path / "hf"
    zsad_main(["convert-weights", "--format", "open_clip", "--arch", str(arch), "--input", str(ckpt), "--output",
               str(out)])  # fmt: skip
    assert str(out) in capsys.readouterr().out  # says where it wrote
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["vision_config"]["hidden_act"] == "gelu"
    _features_match(model, out)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_openai_jit_archive_and_fp16_state_dict_convert_with_quick_gelu(tmp_path) -> None:
    model, arch, ckpt = _open_clip_model(tmp_path, quick_gelu=True, seed=1)
    model = model.half().float()  # OpenAI releases fp16 weights; compare with what the files hold
    # OpenAI's released .pt files are TorchScript archives (read with torch.jit.load, as open_clip does).
    jit = tmp_path / "ViT-tiny.pt"
    traced = torch.jit.trace_module(model, {"encode_image": torch.randn(1, 3, 80, 80)}, check_trace=False)
    traced.save(str(jit))
    out = convert_weights("openai", str(arch), jit, tmp_path / "hf_jit")
    assert json.loads((out / "config.json").read_text())["text_config"]["hidden_act"] == "quick_gelu"
    _features_match(model, out)
    # A plain fp16 state dict in OpenAI key layout converts the same way.
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, ckpt)
    _features_match(model, convert_weights("openai", str(arch), ckpt, tmp_path / "hf"))


def test_winclip_architecture_maps_to_the_shipped_vit_b_16_plus_240() -> None:
    converted = open_clip_config_to_hf("ViT-B-16-plus-240")
    shipped = architecture_config("vit_b_16_plus_240")
    for ours, theirs in (
        (converted.vision_config, shipped.vision_config),
        (converted.text_config, shipped.text_config),
    ):
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
                    "layer_norm_eps", "projection_dim"):  # fmt: skip
            assert getattr(ours, key) == getattr(theirs, key), key
    v = converted.vision_config
    assert (v.hidden_size, v.num_attention_heads, v.image_size, v.patch_size, v.hidden_act) == (
        896,
        14,
        240,
        16,
        "gelu",
    )
    assert converted.projection_dim == 640
    assert open_clip_config_to_hf("ViT-B-16-quickgelu").vision_config.hidden_act == "quick_gelu"


def test_bad_input_names_the_file_and_the_fix(tmp_path, capsys) -> None:
    model, arch, ckpt = _open_clip_model(tmp_path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit):
        zsad_main(["convert-weights", "--format", "open_clip", "--arch", str(arch), "--input", str(garbage),
                   "--output", str(tmp_path / "o")])  # fmt: skip
    assert "garbage.pt" in capsys.readouterr().err
    torch.save(model.state_dict(), ckpt)
    with pytest.raises(OfficialCheckpointError, match=r"tiny\.pt.*does not fit.*--arch"):
        convert_weights("open_clip", "ViT-B-16", ckpt, tmp_path / "o")
    with pytest.raises(WeightConversionError, match="Unknown open_clip architecture"):
        convert_weights("open_clip", "ViT-Nope", ckpt, tmp_path / "o")
    with pytest.raises(WeightConversionError, match="ResNet"):
        open_clip_config_to_hf("RN50")
    with pytest.raises(WeightConversionError, match="attentional_pool"):
        open_clip_config_to_hf("coca_ViT-B-32")
