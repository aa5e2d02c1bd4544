"""AnomalyCLIP: object-agnostic prompt learning over a frozen CLIP with a DPAM image stream.

Paper: Zhou et al., "AnomalyCLIP: Object-agnostic Prompt Learning for Zero-shot Anomaly Detection", ICLR 2024
(arXiv 2310.18961); behaviour of the official repository zqhang/AnomalyCLIP where the two disagree
(``shared/specs/anomalyclip.md``).

Text side (learnable). Two object-agnostic prompts, identical for every class::

    g_n = [SOT] V_1 … V_12 object . [EOT]            (normal,   official ``ctx_pos``)
    g_a = [SOT] W_1 … W_12 damaged object . [EOT]    (abnormal, official ``ctx_neg``)

plus deep text prompts: before text layers 2..9 (1-based) the hidden states at positions 1..4 are **replaced** by a
learnable ``[4, W]`` tensor shared by both prompts (the official code replaces; the paper's first version said
"concatenated"). The causal mask of the text tower is kept. ``T = (F_n, F_a)``, the two L2-normalised EOT features.

Image side (frozen). DPAM (:mod:`zsad.backbone.dpam`) over layers 6..24: a value-value attention stream ``s`` that
starts at the input of layer 6 and never feeds back. Patch features ``F = proj(ln_post(s^(l)))`` for the map layers;
global feature ``g = proj(h^(24)[CLS])`` without ``ln_post``.

Scores with the fixed temperature ``τ = 0.07``::

    image:  p = softmax(ĝ T̂ᵀ / τ)[abnormal]
    map:    S^(l) = softmax(F̂^(l) T̂ᵀ / τ) per patch → bilinear upsampling of the probabilities
            M = Σ_l (S^(l)_abn + 1 − S^(l)_norm) / 2, then a Gaussian filter σ = 4 (test only)

Since only the prompts are learnt, the image forward is frozen (:meth:`AnomalyCLIPModel.encode`, what the feature
cache stores) and the text features are computed once per optimiser step in training and once, then cached, in
evaluation (:meth:`AnomalyCLIPModel.text_features`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from zsad.backbone import CLIPBackbone, PromptTemplate, TensorStateCache
from zsad.methods.anomaly_map import GaussianSmoothing, patches_to_grid, upsample
from zsad.methods.anomalyclip.checkpoint import (
    OfficialCheckpointError,
    check_frozen_parts,
    convert_official_state_dict,
    read_official_checkpoint,
)

#: The object-agnostic templates; ``{}`` holds the learnable context (official: "X X … X object." / "… damaged …").
NORMAL_TEMPLATE = "{} object."
ABNORMAL_TEMPLATE = "{} damaged object."


class AnomalyCLIPModel(nn.Module):
    """AnomalyCLIP's learnable prompts and scoring around a frozen CLIP backbone.

    Args:
        backbone: Frozen CLIP with its text tower (built with bilinear position interpolation and QuickGELU for the
            official model).
        layers: 1-based layers whose DPAM tokens give pixel maps. ``(24,)`` is what every published number and
            released checkpoint uses; ``(6, 12, 18, 24)`` is the paper's multi-layer model (a different model).
        n_ctx: Learnable context vectors per prompt (12).
        prompt_depth: Text layers carrying learnable tokens counted with the input (9 = input + 8 deep prompts).
        deep_prompt_length: Hidden positions replaced by each deep prompt (4).
        dpam_start: First layer (1-based) of the DPAM value-value stream (6: the official ``DPAM_layer=20`` replaces
            the last 19 of 24 blocks).
        temperature: Fixed softmax temperature ``τ`` (0.07; CLIP's learnt logit scale is not used).
        sigma: Gaussian sigma of the test maps (SciPy ``gaussian_filter`` equivalent; 0 disables).
        init_std: Standard deviation of the normal initialisation of every learnable tensor (0.02).
        fp16_deep_prompts: Round the deep prompts to float16 before use, as the official code does (about 2e-4 on
            the text features if disabled). As in the official code the prompts are expanded to both text prompts
            *before* the cast, so each prompt's gradient is rounded to float16 and then the two are summed.
    """

    def __init__(
        self,
        backbone: CLIPBackbone,
        layers: Sequence[int] = (24,),
        n_ctx: int = 12,
        prompt_depth: int = 9,
        deep_prompt_length: int = 4,
        dpam_start: int = 6,
        temperature: float = 0.07,
        sigma: float = 4.0,
        init_std: float = 0.02,
        fp16_deep_prompts: bool = True,
    ) -> None:
        super().__init__()
        if not backbone.has_text:
            msg = "AnomalyCLIP learns text prompts: build the backbone with load_text=True."
            raise ValueError(msg)
        self.layers = tuple(int(k) for k in layers)
        if not self.layers:
            msg = "AnomalyCLIP needs at least one map layer (default (24,))."
            raise ValueError(msg)
        if any(k < dpam_start or k > backbone.num_layers for k in self.layers):
            msg = f"Map layers {self.layers} must lie in the DPAM layers {dpam_start}..{backbone.num_layers}."
            raise ValueError(msg)
        n_text_layers = backbone.text.config.num_hidden_layers
        if not 1 <= prompt_depth <= n_text_layers:
            msg = f"prompt_depth must be in 1..{n_text_layers} (input + deep-prompted text layers), got {prompt_depth}."
            raise ValueError(msg)
        if not 1 <= deep_prompt_length <= n_ctx:
            # Replacing more positions than there are context tokens would overwrite the class words.
            msg = f"deep_prompt_length must be in 1..n_ctx ({n_ctx}), got {deep_prompt_length}."
            raise ValueError(msg)
        self.backbone = backbone
        self.n_ctx = n_ctx
        self.prompt_depth = prompt_depth
        self.deep_prompt_length = deep_prompt_length
        self.dpam_start = dpam_start
        self.temperature = temperature
        self.fp16_deep_prompts = fp16_deep_prompts

        tokenizer = backbone.tokenizer
        self.templates = (
            PromptTemplate(NORMAL_TEMPLATE, n_ctx, tokenizer),
            PromptTemplate(ABNORMAL_TEMPLATE, n_ctx, tokenizer),
        )
        width = backbone.text_width
        # Official names: ctx_pos (normal), ctx_neg (abnormal), compound_prompts_text.{i} (deep prompts).
        self.ctx_normal = nn.Parameter(torch.randn(n_ctx, width) * init_std)
        self.ctx_abnormal = nn.Parameter(torch.randn(n_ctx, width) * init_std)
        self.deep_prompts = nn.ParameterList(
            nn.Parameter(torch.randn(deep_prompt_length, width) * init_std) for _ in range(prompt_depth - 1)
        )
        self.smoothing = GaussianSmoothing(sigma)
        self._text_cache = TensorStateCache()

    # -- text side --------------------------------------------------------------------------------------------------

    def prompt_parameters(self) -> list[nn.Parameter]:
        """The learnable prompt tensors: normal context, abnormal context, deep prompts."""
        return [self.ctx_normal, self.ctx_abnormal, *self.deep_prompts]

    def encode_prompts(self) -> torch.Tensor:
        """Run both prompts through the frozen text tower (one batch of two, autograd as the caller's mode).

        Returns:
            ``[2, E]`` L2-normalised text features ``(F_n, F_a)``.
        """
        token_embedding = self.backbone.text.embeddings.token_embedding
        normal, abnormal = self.templates
        embeddings = torch.cat(
            [normal.embed(token_embedding, self.ctx_normal), abnormal.embed(token_embedding, self.ctx_abnormal)]
        )
        eot = torch.cat([normal.eot(), abnormal.eot()])
        deep = {}
        n_prompts = embeddings.shape[0]
        for index, prompt in enumerate(self.deep_prompts, start=1):  # 0-based text layers 1..depth-1
            if self.fp16_deep_prompts:
                # Official order: expand to both prompts, *then* cast to fp16. The backward of the cast then rounds
                # each prompt's gradient to fp16 before expand's backward sums them (casting first would round
                # the sum instead: ~5e-4 relative difference in the deep-prompt gradients).
                deep[index] = prompt.unsqueeze(0).expand(n_prompts, -1, -1).half().float()
            else:
                deep[index] = prompt
        features = self.backbone.encode_prompt_embeddings(embeddings, eot, deep_prompts=deep)
        return F.normalize(features.float(), dim=-1)

    def _text_state(self) -> list[torch.Tensor]:
        # The prompts and the frozen text tower: what the text features depend on.
        return [*self.prompt_parameters(), *self.backbone.text.parameters(), self.backbone.text_projection.weight]

    def text_features(self) -> torch.Tensor:
        """``[2, E]`` normalised (normal, abnormal) text features.

        In training (or whenever gradients to the prompts are being recorded) they are encoded afresh: one text
        forward of two prompts per optimiser step, never one per image. Otherwise they are encoded once and cached
        until a prompt or text-tower tensor changes (optimiser step, ``load_state_dict``, ``.to()``) or the module
        switches to training.
        """
        recording = torch.is_grad_enabled() and any(p.requires_grad for p in self.prompt_parameters())
        if self.training or recording:
            return self.encode_prompts()
        return self._text_cache.get(self._text_state(), self.encode_prompts)

    def clear_text_cache(self) -> None:
        """Forget the cached text features (they are also invalidated automatically)."""
        self._text_cache.clear()

    def train(self, mode: bool = True) -> AnomalyCLIPModel:
        """Switch mode and drop the text cache."""
        self.clear_text_cache()
        return super().train(mode)

    def load_official_checkpoint(self, path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor]) -> None:
        """Load a prompt learner released with the official code (``{"prompt_learner": state_dict}`` or the dict).

        ``ctx_pos``/``ctx_neg``/``compound_prompts_text.{i}`` become ``ctx_normal``/``ctx_abnormal``/
        ``deep_prompts.{i}``; the frozen prompt parts are checked against this backbone; the unused
        ``compound_prompt_projections`` are ignored (:mod:`zsad.methods.anomalyclip.checkpoint`).
        """
        official = read_official_checkpoint(path_or_state_dict)
        try:
            check_frozen_parts(official, self.templates, self.backbone.text.embeddings.token_embedding)
            converted = convert_official_state_dict(
                official,
                n_ctx=self.n_ctx,
                width=self.backbone.text_width,
                n_deep=len(self.deep_prompts),
                deep_prompt_length=self.deep_prompt_length,
            )
        except OfficialCheckpointError as e:
            # Name the file: the layout checks only see the state dict.
            if isinstance(path_or_state_dict, Mapping):
                raise
            msg = f"{str(path_or_state_dict)!r}: {e}"
            raise OfficialCheckpointError(msg) from None
        with torch.no_grad():
            for name, value in converted.items():
                self.get_parameter(name).copy_(value)

    # -- image side -------------------------------------------------------------------------------------------------

    def encode_config(self) -> dict[str, object]:
        """What :meth:`encode` depends on besides the backbone and the input (the feature cache's key)."""
        return {"layers": list(self.layers), "dpam_start": self.dpam_start, "global_ln_post": False}

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Frozen image features from one DPAM forward.

        Args:
            images: ``[B, 3, S, S]`` normalised images.

        Returns:
            ``global`` ``[B, E]`` (``proj(h^(24)[CLS])``, no ``ln_post``) and ``patches`` ``[B, L, N, E]``
            (``proj(ln_post(s^(l)))`` of the map layers, class token dropped); neither normalised.
        """
        out = self.backbone.encode_image(
            images,
            layers=self.layers,
            project=True,
            global_ln_post=False,
            dpam_start=self.dpam_start,
        )
        return {"global": out.global_embedding, "patches": torch.stack(out.patch_tokens, dim=1)}

    # -- scores -----------------------------------------------------------------------------------------------------

    def forward_features(
        self,
        features: dict[str, torch.Tensor],
        image_size: tuple[int, int],
        full_maps: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """Score frozen features against the (normal, abnormal) text features.

        Args:
            features: The output of :meth:`encode`.
            image_size: ``(H, W)`` of the input images (the maps' size).
            full_maps: Also return the upsampled two-channel maps of every layer (what the loss needs); default in
                training only.

        Returns:
            ``image_logits`` ``[B, 2]`` (``ĝT̂ᵀ/τ``), ``image_score`` ``[B]`` (abnormal probability),
            ``patch_probs`` ``[B, L, 2, h, w]``, ``anomaly_map`` ``[B, H, W]`` (unsmoothed
            ``Σ_l (S_abn + 1 − S_norm)/2``) and with ``full_maps`` ``maps`` ``[B, L, 2, H, W]``.
        """
        if full_maps is None:
            full_maps = self.training
        text = self.text_features()
        image_logits = F.normalize(features["global"].float(), dim=-1) @ text.T / self.temperature
        patches = F.normalize(features["patches"].float(), dim=-1)
        batch, n_layers, n_patches, _ = patches.shape
        grid = (image_size[0] // self.backbone.patch_size, image_size[1] // self.backbone.patch_size)
        if grid[0] * grid[1] != n_patches:
            msg = f"{n_patches} patch tokens do not form the {grid} grid of a {tuple(image_size)} image."
            raise ValueError(msg)
        probs = (patches @ text.T / self.temperature).softmax(dim=-1)  # [B, L, N, 2]
        patch_probs = patches_to_grid(probs.flatten(0, 1), grid)  # [B*L, 2, h, w]
        # (S_abn + 1 − S_norm)/2 commutes with the (linear) bilinear upsampling: combine first, upsample one channel.
        combined = (patch_probs[:, 1] + 1.0 - patch_probs[:, 0]) / 2.0
        anomaly_map = upsample(combined, image_size, mode="bilinear", align_corners=False)
        anomaly_map = anomaly_map.view(batch, n_layers, *image_size).sum(dim=1)
        out = {
            "image_logits": image_logits,
            "image_score": image_logits.softmax(dim=-1)[:, 1],
            "patch_probs": patch_probs.view(batch, n_layers, 2, *grid),
            "anomaly_map": anomaly_map,
        }
        if full_maps:
            maps = upsample(patch_probs, image_size, mode="bilinear", align_corners=False)
            out["maps"] = maps.view(batch, n_layers, 2, *image_size)
        return out

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor] | InferenceBatch:
        """Training: the dict of :meth:`forward_features`; evaluation: ``InferenceBatch`` with the smoothed map."""
        out = self.forward_features(self.encode(images), (images.shape[-2], images.shape[-1]))
        if self.training:
            return out
        return InferenceBatch(pred_score=out["image_score"], anomaly_map=self.smoothing(out["anomaly_map"]))
