"""The one frozen Hugging Face CLIP every zsad method shares.

A :class:`CLIPBackbone` holds the frozen CLIP towers (the text tower only when a method asks for it) and exposes what
the ZSAD methods need, computed in one pass:

* :meth:`CLIPBackbone.encode_image` — the global embedding and the tokens of any chosen layers (1-based, i.e. HF
  ``hidden_states[k]``), optionally through ``post_layernorm`` + ``visual_projection``, from the plain residual stream
  or from the DPAM value-value stream (:mod:`zsad.backbone.dpam`), at any input size with bilinear or bicubic
  position-embedding interpolation.
* :meth:`CLIPBackbone.encode_text` — fixed prompts, encoded once and cached.
* :meth:`CLIPBackbone.encode_prompt_embeddings` — learnable prompts (context vectors and deep prompts) through the
  frozen text tower with the causal mask preserved (:mod:`zsad.backbone.prompts`).

Example:
    >>> from zsad.backbone import create_backbone
    >>> backbone = create_backbone("tiny", image_size=98)
    >>> out = backbone.encode_image(torch.zeros(1, 3, 98, 98), layers=(6, 24))
    >>> out.patch_tokens[0].shape
    torch.Size([1, 49, 16])
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

from zsad.backbone.dpam import vv_attention_block

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "openai/clip-vit-large-patch14-336"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Interpolation = Literal["bilinear", "bicubic"]
Weights = Literal["pretrained", "random"]


class BackboneWeightsNotFoundError(FileNotFoundError):
    """Raised when pretrained CLIP weights are neither in a local directory nor in the Hugging Face cache."""


# --------------------------------------------------------------------------------------------------------------------
# Architectures shipped as data
# --------------------------------------------------------------------------------------------------------------------


@cache
def _architecture_files() -> dict[str, dict]:
    """Read every JSON architecture shipped in ``zsad/backbone/architectures``."""
    folder = resources.files("zsad.backbone") / "architectures"
    archs = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".json"):
            archs[entry.name[: -len(".json")]] = json.loads(entry.read_text())
    return archs


def list_architectures() -> list[str]:
    """Names accepted by ``create_backbone(name, weights="random")`` (plus their hub ids)."""
    return sorted(_architecture_files())


def architecture_config(name: str) -> CLIPConfig:
    """Build the :class:`~transformers.CLIPConfig` of a shipped architecture.

    Args:
        name: An architecture name (``vit_l_14_336``, ``vit_b_16``, ``tiny``; ``-`` and ``/`` are accepted in place
            of ``_``) or the hub id it mirrors (``openai/clip-vit-large-patch14-336``).

    Returns:
        The configuration, with ``projection_dim`` set in both sub-configs (HF reads it from there).

    Raises:
        KeyError: If the name is neither a shipped architecture nor the hub id of one.
    """
    archs = _architecture_files()
    key = name.lower().replace("-", "_").replace("/", "_").replace("@", "_")
    if key not in archs:
        by_hub = {spec.get("hub_id"): arch for arch, spec in archs.items() if spec.get("hub_id")}
        if name not in by_hub:
            msg = f"Unknown CLIP architecture {name!r}; shipped: {sorted(archs)} (or their hub ids {sorted(by_hub)})."
            raise KeyError(msg)
        key = by_hub[name]
    spec = archs[key]
    return CLIPConfig(
        text_config=spec["text_config"],
        vision_config=spec["vision_config"],
        projection_dim=spec["projection_dim"],
    )


def is_architecture_name(name: str) -> bool:
    """Whether ``name`` names a shipped architecture (not a hub id or a directory)."""
    return name.lower().replace("-", "_").replace("/", "_").replace("@", "_") in _architecture_files()


# --------------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class VisionOutput:
    """What one vision forward returns.

    Attributes:
        global_embedding: ``[B, E]`` projected class token of the last layer (``ln_post`` applied or not, as asked).
        patch_tokens: One ``[B, N, C]`` tensor per requested layer, class token removed; ``C`` is the projection
            dimension when ``project=True``, else the encoder width.
        class_tokens: One ``[B, C]`` class token per requested layer, treated like the patch tokens.
        grid: ``(h, w)`` of the patch grid, ``N = h * w``.
        layers: The 1-based layer numbers, in the order of ``patch_tokens``.
    """

    global_embedding: torch.Tensor
    patch_tokens: list[torch.Tensor]
    class_tokens: list[torch.Tensor]
    grid: tuple[int, int]
    layers: tuple[int, ...] = field(default_factory=tuple)


# --------------------------------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------------------------------


class CLIPBackbone(nn.Module):
    """A frozen Hugging Face CLIP, vision tower always, text tower on request.

    Build it with :func:`create_backbone`; the constructor takes ready modules so that tests can wrap any model.

    Args:
        vision: The vision transformer (transformers 5.x ``CLIPVisionModel``: ``embeddings``, ``pre_layrnorm``,
            ``encoder``, ``post_layernorm``).
        visual_projection: ``Linear(width → E)`` without bias.
        text: The text transformer, or ``None`` for vision-only methods (no text parameters are held then).
        text_projection: ``Linear(text width → E)``, or ``None`` with ``text``.
        image_size: Input side the methods feed (e.g. 518); position embeddings are interpolated to it.
        pos_interpolation: ``"bicubic"`` (transformers, APRIL-GAN, AdaCLIP) or ``"bilinear"`` (AnomalyCLIP, AdaptCLIP).
        pos_antialias: Resize the position table with ``antialias=True`` (APRIL-GAN's open_clip; for bicubic this
            also changes the upsampling kernel, cubic ``a = -0.5`` instead of ``-0.75``). Default off (transformers).
        name: Where the weights came from (hub id, directory or architecture), kept for checkpoints and caches.
        weights: ``"pretrained"`` or ``"random"``.
    """

    def __init__(
        self,
        vision: CLIPVisionModel,
        visual_projection: nn.Linear,
        text: CLIPTextModel | None = None,
        text_projection: nn.Linear | None = None,
        image_size: int | None = None,
        pos_interpolation: Interpolation = "bicubic",
        name: str = "custom",
        weights: Weights = "pretrained",
        pos_antialias: bool = False,
    ) -> None:
        super().__init__()
        if pos_interpolation not in ("bilinear", "bicubic"):
            msg = f"pos_interpolation must be 'bilinear' or 'bicubic', got {pos_interpolation!r}."
            raise ValueError(msg)
        self.vision = vision
        self.visual_projection = visual_projection
        self.text = text
        self.text_projection = text_projection
        self.image_size = image_size or vision.config.image_size
        self.pos_interpolation = pos_interpolation
        self.pos_antialias = bool(pos_antialias)
        self.name = name
        self.weights = weights
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}
        # Last resized position table per grid, reused only while tracing an export (zsad.deploy): the table depends
        # on the weights alone, and antialiased bicubic resizing has no ONNX operator, so the graph holds it as a
        # constant. The eager forward run just before tracing refreshes it.
        self._traced_positions: dict[tuple[int, int], torch.Tensor] = {}
        self._tokenizer = None
        self.requires_grad_(False)
        self.eval()

    # -- facts ------------------------------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        """Number of vision transformer blocks."""
        return self.vision.config.num_hidden_layers

    @property
    def width(self) -> int:
        """Vision transformer width."""
        return self.vision.config.hidden_size

    @property
    def embed_dim(self) -> int:
        """Joint embedding dimension (the projection's output)."""
        return self.visual_projection.out_features

    @property
    def text_width(self) -> int:
        """Text transformer width (token-embedding dimension)."""
        self._require_text()
        return self.text.config.hidden_size

    @property
    def patch_size(self) -> int:
        """Side of one patch in pixels."""
        return self.vision.config.patch_size

    @property
    def has_text(self) -> bool:
        """Whether the text tower is loaded."""
        return self.text is not None

    def train(self, mode: bool = True) -> CLIPBackbone:  # noqa: ARG002 - the backbone stays frozen
        """Keep the frozen backbone in eval mode whatever the surrounding module does."""
        return super().train(False)

    def identity(self) -> dict[str, object]:
        """What determines the backbone's features (for checkpoints and the feature cache)."""
        identity = {
            "name": self.name,
            "weights": self.weights,
            "image_size": self.image_size,
            "pos_interpolation": self.pos_interpolation,
            "hidden_act": self.vision.config.hidden_act,
        }
        if self.pos_antialias:  # only when set, so identities recorded before the option existed stay equal
            identity["pos_antialias"] = True
        return identity

    # -- vision -----------------------------------------------------------------------------------------------------

    def position_embeddings(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position table ``[1 + h*w, width]`` for a patch grid, interpolated with the configured mode.

        The pretrained 577-row parameter is never mutated (parameter counts and checkpoints rely on it); the class
        row is kept and the patch rows are resized with ``align_corners=False`` like transformers and open_clip.
        """
        table = self.vision.embeddings.position_embedding.weight
        n_native = table.shape[0] - 1
        # int(): under ONNX tracing shapes are traced tensors, which round() rejects; the table size is a constant.
        side = round(int(n_native) ** 0.5)
        if (side, side) == grid:
            return table
        key = (int(grid[0]), int(grid[1]))  # traced shapes are tensors: plain ints make a usable key
        if torch.jit.is_tracing() and key in self._traced_positions:
            return self._traced_positions[key]
        patches = table[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(
            patches.float(), size=grid, mode=self.pos_interpolation, align_corners=False, antialias=self.pos_antialias
        )
        patches = patches.to(table.dtype).permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
        resized = torch.cat([table[:1], patches], dim=0)
        if not torch.jit.is_tracing():
            self._traced_positions[key] = resized.detach()
        return resized

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch + class + position embeddings followed by ``pre_layrnorm`` (HF ``hidden_states[0]``)."""
        emb = self.vision.embeddings
        dtype = emb.patch_embedding.weight.dtype
        patches = emb.patch_embedding(images.to(dtype))  # [B, W, h, w]
        grid = (patches.shape[-2], patches.shape[-1])
        patches = patches.flatten(2).transpose(1, 2)
        cls = emb.class_embedding.to(dtype).expand(images.shape[0], 1, -1)
        tokens = torch.cat([cls, patches], dim=1) + self.position_embeddings(grid).unsqueeze(0)
        return self.vision.pre_layrnorm(tokens), grid

    def project(self, tokens: torch.Tensor, ln_post: bool = True) -> torch.Tensor:
        """``visual_projection(post_layernorm(tokens))`` (or without the layer norm) on any token tensor."""
        if ln_post:
            tokens = self.vision.post_layernorm(tokens)
        return self.visual_projection(tokens)

    def encode_image(
        self,
        images: torch.Tensor,
        layers: tuple[int, ...] | list[int] = (),
        project: bool = True,
        global_ln_post: bool = True,
        dpam_start: int | None = None,
        stop_at_last_requested: bool = False,
    ) -> VisionOutput:
        """Run the vision tower once and return the global embedding and the chosen layers' tokens.

        Args:
            images: ``[B, 3, S, S]`` normalised images; any ``S`` divisible by the patch size.
            layers: 1-based layer numbers (``hidden_states[k]`` in HF terms) whose tokens to return.
            project: Apply ``post_layernorm`` + ``visual_projection`` to the returned tokens.
            global_ln_post: Apply ``post_layernorm`` before projecting the final class token (standard CLIP image
                embedding); AnomalyCLIP and AdaptCLIP project the raw class token (``False``).
            dpam_start: With a layer number ``k``, blocks ``k..L`` also run the value-value attention stream (DPAM)
                and the returned tokens come from that stream; ``None`` returns the plain residual stream.
            stop_at_last_requested: Stop after the deepest requested layer (the global embedding then comes from that
                layer's class token) — for methods that need no final layer.

        Returns:
            The :class:`VisionOutput`.
        """
        layers = tuple(int(k) for k in layers)
        for k in layers:
            if not 1 <= k <= self.num_layers:
                msg = f"Layer {k} is outside 1..{self.num_layers} (1-based, as HF hidden_states[k])."
                raise ValueError(msg)
        wanted = set(layers)
        last = max(layers) if (stop_at_last_requested and layers) else self.num_layers
        h, grid = self.embed(images)
        stream: torch.Tensor | None = None  # the DPAM value-value stream
        captured: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.vision.encoder.layers[:last], start=1):
            if dpam_start is not None and index >= dpam_start:
                if stream is None:
                    stream = h
                h, vv = vv_attention_block(block, h)
                stream = stream + vv
                if index in wanted:
                    captured[index] = stream
            else:
                h = block(h, None)
                if index in wanted:
                    captured[index] = h
        tokens = [captured[k] for k in layers]
        if project:
            tokens = [self.project(t) for t in tokens]
        global_embedding = self.project(h[:, 0], ln_post=global_ln_post)
        return VisionOutput(
            global_embedding=global_embedding,
            patch_tokens=[t[:, 1:] for t in tokens],
            class_tokens=[t[:, 0] for t in tokens],
            grid=grid,
            layers=layers,
        )

    # -- text -------------------------------------------------------------------------------------------------------

    def _require_text(self) -> None:
        if self.text is None:
            msg = "This backbone was loaded vision-only (load_text=False); the method needs load_text=True."
            raise RuntimeError(msg)

    @property
    def tokenizer(self):  # noqa: ANN201 - zsad.backbone.tokenizer.CLIPBPETokenizer
        """The CLIP BPE tokenizer (offline, from the vocabulary open_clip_torch ships)."""
        if self._tokenizer is None:
            from zsad.backbone.tokenizer import get_tokenizer

            self._tokenizer = get_tokenizer()
        return self._tokenizer

    def encode_text(self, texts: list[str] | tuple[str, ...], normalize: bool = False) -> torch.Tensor:
        """Encode fixed prompts through the frozen text tower, once: results are cached by the prompt strings.

        Args:
            texts: Prompt strings.
            normalize: L2-normalise the returned embeddings.

        Returns:
            ``[len(texts), E]`` projected EOT features (a cached tensor: do not modify it in place).
        """
        self._require_text()
        key = tuple(texts)
        device = self.text_projection.weight.device
        cached = self._text_cache.get(key)
        if cached is None or cached.device != device:
            ids = self.tokenizer(list(texts)).to(device)
            with torch.no_grad():
                embeds = self.text.embeddings.token_embedding(ids)
                cached = self.encode_prompt_embeddings(embeds, ids.argmax(dim=-1))
            self._text_cache[key] = cached
        return F.normalize(cached, dim=-1) if normalize else cached

    def encode_prompt_embeddings(
        self,
        token_embeddings: torch.Tensor,
        eot_index: torch.Tensor,
        deep_prompts: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run token embeddings (possibly holding learnable vectors) through the frozen text tower.

        Autograd is left to the caller: learnable prompts get gradients through the frozen weights.

        Args:
            token_embeddings: ``[P, T, W]`` token embeddings (no position embedding added yet).
            eot_index: ``[P]`` position of the end-of-text token of each prompt (pooling position).
            deep_prompts: ``{layer: [n, W] or [P, n, W]}`` with 0-based text-layer indices; before that layer,
                hidden positions ``1..n`` are replaced by the tensor (AnomalyCLIP's deep prompts; the length stays
                ``T``). A ``[n, W]`` tensor is shared by all prompts.

        Returns:
            ``[P, E]`` projected features.
        """
        from zsad.backbone.prompts import run_text_tower

        self._require_text()
        return run_text_tower(self.text, self.text_projection, token_embeddings, eot_index, deep_prompts)


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def _weights_help(name: str) -> str:
    return (
        f"CLIP weights {name!r} are not available offline.\n"
        "  Get them once on a machine with network access:\n"
        f"    huggingface-cli download {name}            # fills the Hugging Face cache (~/.cache/huggingface)\n"
        f"    # or: python -c \"from transformers import CLIPModel; CLIPModel.from_pretrained('{name}')"
        ".save_pretrained('weights/clip')\"\n"
        "  then either keep HF_HUB_OFFLINE=1 with that cache, or pass the directory: --model.backbone=weights/clip.\n"
        "  For a run without pretrained weights use --model.weights=random (results then mean nothing) or "
        "--model.backbone=tiny."
    )


def _from_config(config: CLIPConfig, load_text: bool, seed: int) -> tuple:
    # Random weights are seeded so that two processes (DDP ranks, a resumed run) build the same frozen backbone.
    devnull = torch.random.fork_rng(devices=[])
    with devnull:
        torch.manual_seed(seed)
        vision_cfg = CLIPVisionConfig(**config.vision_config.to_dict())
        vision = CLIPVisionModel(vision_cfg)
        visual_projection = nn.Linear(vision_cfg.hidden_size, config.projection_dim, bias=False)
        nn.init.normal_(visual_projection.weight, std=vision_cfg.hidden_size**-0.5)
        text = text_projection = None
        if load_text:
            text_cfg = CLIPTextConfig(**config.text_config.to_dict())
            text = CLIPTextModel(text_cfg)
            text_projection = nn.Linear(text_cfg.hidden_size, config.projection_dim, bias=False)
            nn.init.normal_(text_projection.weight, std=text_cfg.hidden_size**-0.5)
    return vision, visual_projection, text, text_projection


def _from_pretrained(name: str, load_text: bool, attn_implementation: str, overrides: dict) -> tuple:
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    kwargs = {"attn_implementation": attn_implementation, **overrides}
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if Path(name).expanduser().exists():
        name = str(Path(name).expanduser())
        kwargs["local_files_only"] = True
    elif offline:
        kwargs["local_files_only"] = True
    from transformers.utils import logging as hf_logging

    # Each tower loads from the full CLIPModel checkpoint: silence the report listing the other tower's keys.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        vis = CLIPVisionModelWithProjection.from_pretrained(name, **kwargs)
        text = text_projection = None
        if load_text:
            txt = CLIPTextModelWithProjection.from_pretrained(name, **kwargs)
            text, text_projection = txt.text_model, txt.text_projection
    except (OSError, ValueError) as err:
        if isinstance(err, ValueError) and "offline" not in str(err).lower() and "connect" not in str(err).lower():
            raise
        raise BackboneWeightsNotFoundError(_weights_help(name)) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return vis.vision_model, vis.visual_projection, text, text_projection


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: Weights = "pretrained",
    image_size: int | None = None,
    pos_interpolation: Interpolation = "bicubic",
    load_text: bool = True,
    hidden_act: str | None = None,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    pos_antialias: bool = False,
) -> CLIPBackbone:
    """Build the frozen CLIP backbone.

    Args:
        name: A Hugging Face hub id (default ``openai/clip-vit-large-patch14-336``), a local directory written by
            ``save_pretrained``, or a shipped architecture (``vit_l_14_336``, ``vit_b_16``, ``tiny``).
        weights: ``"pretrained"`` loads weights from ``name``; ``"random"`` builds the architecture with seeded
            random weights (benchmarks, parameter counts, tests). ``tiny`` is always random.
        image_size: Input side the method feeds (e.g. 518); default the architecture's native size.
        pos_interpolation: Position-embedding resize mode, ``"bicubic"`` or ``"bilinear"``.
        load_text: Load the text tower (``False`` for vision-only methods: no text parameters in memory).
        hidden_act: Override the activation (``"quick_gelu"`` or ``"gelu"``; APRIL-GAN/AdaCLIP checkpoints ran with
            exact GELU).
        attn_implementation: transformers attention back-end for the plain layers (``"sdpa"`` default).
        seed: Seed of random weights.
        pos_antialias: Resize the position table with antialias (APRIL-GAN's official table; see
            :class:`CLIPBackbone`).

    Returns:
        The frozen :class:`CLIPBackbone` in eval mode.

    Raises:
        BackboneWeightsNotFoundError: Pretrained weights are requested but absent offline.
    """
    if weights not in ("pretrained", "random"):
        msg = f"weights must be 'pretrained' or 'random', got {weights!r}."
        raise ValueError(msg)
    if is_architecture_name(name) and weights == "pretrained" and name != "tiny":
        hub = _architecture_files()[name.lower().replace("-", "_").replace("/", "_")].get("hub_id")
        msg = f"{name!r} is an architecture without weights: use weights='random', or name the hub id {hub!r}."
        raise ValueError(msg)
    if weights == "random" or is_architecture_name(name):
        config = architecture_config(name)
        if hidden_act is not None:
            config.vision_config.hidden_act = config.text_config.hidden_act = hidden_act
        config.vision_config._attn_implementation = attn_implementation  # noqa: SLF001
        config.text_config._attn_implementation = attn_implementation  # noqa: SLF001
        parts = _from_config(config, load_text, seed)
        weights = "random"
    else:
        overrides = {} if hidden_act is None else {"hidden_act": hidden_act}
        parts = _from_pretrained(name, load_text, attn_implementation, overrides)
    vision, visual_projection, text, text_projection = parts
    if weights == "random":
        logger.info("CLIP backbone %s built with RANDOM weights: scores measured with it are not CLIP's.", name)
    return CLIPBackbone(
        vision,
        visual_projection,
        text,
        text_projection,
        image_size=image_size,
        pos_interpolation=pos_interpolation,
        name=name,
        weights=weights,
        pos_antialias=pos_antialias,
    )
