"""Learnable normal/abnormal vectors per hierarchy level over a frozen CLIP image encoder (seed 000).

Notation of the paper: for a feature ``z`` and a pair ``(f_n, f_a)``,

    P(z, f_a) = exp(sim(z, f_a)/τ) / (exp(sim(z, f_n)/τ) + exp(sim(z, f_a)/τ))

* image score ``s = P(x, f_a)`` with the image-level pair and the global feature ``x``;
* layer map ``S^(l)_i = P(X^(l)_i, f_a^(l))`` for each patch ``i`` of layer ``l``;
* final map ``M = Σ_l w(l) · up(S^(l))`` with learnable layer weights ``w = softmax(θ)``.

No text encoder: the 768-d vectors replace the text features. With the default configuration at ViT-L/14@336 the
model trains ``(1 + 4) × 2 × 768 + 4 = 7,684`` parameters (``shared/specs/learnable_vectors.md`` §2).

The frozen part (:meth:`LearnableVectorsModel.encode`) and the learnable head (:meth:`forward_features`) are split
so that training can run over cached features (:mod:`zsad.backbone.cache`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from zsad.backbone import CLIPBackbone
from zsad.methods.anomaly_map import GaussianSmoothing, patches_to_grid, upsample

LayerWeighting = Literal["softmax", "fixed"]


def pair_probability(features: torch.Tensor, pair: torch.Tensor, temperature: float) -> torch.Tensor:
    """``P(z, f_a)``: 2-way softmax over cosine similarities to ``pair = (f_n, f_a)``.

    Args:
        features: ``[..., D]`` features ``z``.
        pair: ``[2, D]`` normal and abnormal vectors.
        temperature: ``τ``.

    Returns:
        ``[...]`` abnormal probabilities.
    """
    logits = F.normalize(features, dim=-1) @ F.normalize(pair, dim=-1).T / temperature
    return logits.softmax(dim=-1)[..., 1]


class LearnableVectorsModel(nn.Module):
    """The seed-000 model: frozen CLIP image encoder + per-level learnable vector pairs + layer weights.

    Args:
        backbone: Frozen CLIP backbone (vision tower only is enough).
        layers: 1-based layers whose patch tokens are scored (``L``).
        temperature: ``τ`` of the softmax (fixed; a learnable one would change the 7,684 count).
        sigma: Gaussian smoothing of the test map (0 disables).
        global_ln_post: Apply ``post_layernorm`` to the global class token before projecting (standard CLIP image
            embedding; AnomalyCLIP does not).
        layer_weighting: ``"softmax"`` (``w = softmax(θ)``, learnable) or ``"fixed"`` (``w = 1/|L|``, ablation).
        shared_vectors: One pair for the image and every layer (ablation of the per-level idea).
        init_std: Standard deviation of the vectors' normal initialisation.
        upsample_mode: Interpolation of the layer maps to the input size (bilinear, ``align_corners=False``).
        dpam_start: Score DPAM value-value tokens from this layer on instead of the residual stream (ablation).
    """

    def __init__(
        self,
        backbone: CLIPBackbone,
        layers: tuple[int, ...] = (6, 12, 18, 24),
        temperature: float = 0.07,
        sigma: float = 4.0,
        global_ln_post: bool = True,
        layer_weighting: LayerWeighting = "softmax",
        shared_vectors: bool = False,
        init_std: float = 0.02,
        upsample_mode: Literal["bilinear", "bicubic"] = "bilinear",
        dpam_start: int | None = None,
    ) -> None:
        super().__init__()
        if layer_weighting not in ("softmax", "fixed"):
            msg = f"layer_weighting must be 'softmax' or 'fixed', got {layer_weighting!r}."
            raise ValueError(msg)
        self.backbone = backbone
        self.layers = tuple(layers)
        self.temperature = temperature
        self.global_ln_post = global_ln_post
        self.shared_vectors = shared_vectors
        self.upsample_mode = upsample_mode
        self.dpam_start = dpam_start
        dim = backbone.embed_dim
        n_pairs = 1 if shared_vectors else 1 + len(self.layers)
        # vectors[0] = (f_n, f_a) of the image level, vectors[1 + l] = (f_n^(l), f_a^(l)).
        self.vectors = nn.Parameter(torch.randn(n_pairs, 2, dim) * init_std)
        if layer_weighting == "softmax":
            self.layer_logits = nn.Parameter(torch.zeros(len(self.layers)))
        else:
            self.register_buffer("layer_logits", torch.zeros(len(self.layers)), persistent=False)
        self.smoothing = GaussianSmoothing(sigma)

    @property
    def layer_weights(self) -> torch.Tensor:
        """``w(l)``, summing to one."""
        return self.layer_logits.softmax(dim=0)

    def image_pair(self) -> torch.Tensor:
        """``[2, D]`` image-level pair ``(f_n, f_a)``."""
        return self.vectors[0]

    def layer_pairs(self) -> torch.Tensor:
        """``[L, 2, D]`` per-layer pairs."""
        if self.shared_vectors:
            return self.vectors[0].unsqueeze(0).expand(len(self.layers), -1, -1)
        return self.vectors[1:]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Frozen features: ``global`` ``[B, D]`` and ``patches`` ``[B, L, N, D]`` (projected, not normalised)."""
        out = self.backbone.encode_image(
            images,
            layers=self.layers,
            project=True,
            global_ln_post=self.global_ln_post,
            dpam_start=self.dpam_start,
        )
        return {"global": out.global_embedding, "patches": torch.stack(out.patch_tokens, dim=1)}

    def forward_features(
        self,
        features: dict[str, torch.Tensor],
        image_size: tuple[int, int],
    ) -> dict[str, torch.Tensor]:
        """Score frozen features.

        Returns:
            ``image_score`` ``[B]`` (``s``), ``layer_maps`` ``[B, L, h, w]`` (``S^(l)``) and ``anomaly_map``
            ``[B, H, W]`` (``M``, unsmoothed).
        """
        patches = features["patches"].float()
        n = patches.shape[2]
        side = int(round(n**0.5))
        image_score = pair_probability(features["global"].float(), self.image_pair(), self.temperature)
        # [B, L, N]: each layer against its own pair (einsum over normalised vectors).
        pairs = F.normalize(self.layer_pairs(), dim=-1)
        logits = torch.einsum("blnd,lcd->blnc", F.normalize(patches, dim=-1), pairs) / self.temperature
        layer_maps = patches_to_grid(logits.softmax(dim=-1)[..., 1].flatten(0, 1), (side, side))
        layer_maps = layer_maps.view(patches.shape[0], len(self.layers), side, side)
        upsampled = upsample(layer_maps, image_size, mode=self.upsample_mode, align_corners=False)
        anomaly_map = torch.einsum("blhw,l->bhw", upsampled, self.layer_weights)
        return {"image_score": image_score, "layer_maps": layer_maps, "anomaly_map": anomaly_map}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor] | InferenceBatch:
        """Training: the dict of :meth:`forward_features`; evaluation: an ``InferenceBatch`` with the smoothed map."""
        out = self.forward_features(self.encode(images), tuple(images.shape[-2:]))
        if self.training:
            return out
        return InferenceBatch(pred_score=out["image_score"], anomaly_map=self.smoothing(out["anomaly_map"]))
