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
ImageScore = Literal["global", "global+max"]


def pair_logits(features: torch.Tensor, pair: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[..., 2]`` logits ``sim(z, f_n)/τ, sim(z, f_a)/τ`` (cosine similarities, vectors normalised here)."""
    return F.normalize(features, dim=-1) @ F.normalize(pair, dim=-1).T / temperature


def pair_probability(features: torch.Tensor, pair: torch.Tensor, temperature: float) -> torch.Tensor:
    """``P(z, f_a)``: 2-way softmax over cosine similarities to ``pair = (f_n, f_a)`` (Eq. 1 of the seed).

    Args:
        features: ``[..., D]`` features ``z``.
        pair: ``[2, D]`` normal and abnormal vectors.
        temperature: ``τ``.

    Returns:
        ``[...]`` abnormal probabilities.
    """
    return pair_logits(features, pair, temperature).softmax(dim=-1)[..., 1]


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
        image_score: ``"global"`` (``s = P(x, f_a)``, faithful) or ``"global+max"`` (mean of ``s`` and the maximum of
            the smoothed test map; ablation).
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
        image_score: ImageScore = "global",
    ) -> None:
        super().__init__()
        if layer_weighting not in ("softmax", "fixed"):
            msg = f"layer_weighting must be 'softmax' or 'fixed', got {layer_weighting!r}."
            raise ValueError(msg)
        if image_score not in ("global", "global+max"):
            msg = f"image_score must be 'global' or 'global+max', got {image_score!r}."
            raise ValueError(msg)
        self.backbone = backbone
        self.layers = tuple(layers)
        self.temperature = temperature
        self.global_ln_post = global_ln_post
        self.shared_vectors = shared_vectors
        self.upsample_mode = upsample_mode
        self.dpam_start = dpam_start
        self.image_score = image_score
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
    def set_vectors(self, pair: torch.Tensor) -> None:
        """Set every pair to ``pair`` ``[2, D]`` (e.g. frozen-CLIP text features of a normal / a damaged prompt)."""
        self.vectors.copy_(pair.to(self.vectors).unsqueeze(0).expand_as(self.vectors))

    def encode_config(self) -> dict[str, object]:
        """What :meth:`encode` depends on besides the backbone and the input (the feature cache's key)."""
        return {"layers": list(self.layers), "global_ln_post": self.global_ln_post, "dpam_start": self.dpam_start}

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
        """Score frozen features (the learnable head; runs on fresh or cached :meth:`encode` output).

        Args:
            features: :meth:`encode` output, ``global`` ``[B, D]`` and ``patches`` ``[B, L, N, D]``.
            image_size: ``(H, W)`` of the input the features come from; ``N = (H / patch) · (W / patch)``.

        Returns:
            ``image_score`` ``[B]`` (``s``), ``image_logits`` ``[B, 2]`` (``cos/τ`` to ``(f_n, f_a)``),
            ``layer_maps`` ``[B, L, h, w]`` (``S^(l)``) and ``anomaly_map`` ``[B, H, W]`` (``M``, unsmoothed).
        """
        patches = features["patches"].float()
        grid = (image_size[0] // self.backbone.patch_size, image_size[1] // self.backbone.patch_size)
        if grid[0] * grid[1] != patches.shape[2]:
            msg = f"{patches.shape[2]} patch tokens do not tile a {image_size} input ({grid[0]}x{grid[1]} patches)."
            raise ValueError(msg)
        image_logits = pair_logits(features["global"].float(), self.image_pair(), self.temperature)
        # [B, L, N, 2]: each layer's patches against that layer's own pair.
        pairs = F.normalize(self.layer_pairs(), dim=-1)
        logits = torch.einsum("blnd,lcd->blnc", F.normalize(patches, dim=-1), pairs) / self.temperature
        batch, n_layers = patches.shape[:2]
        layer_maps = patches_to_grid(logits.softmax(dim=-1)[..., 1].flatten(0, 1), grid)
        layer_maps = layer_maps.reshape(batch, n_layers, *grid)
        upsampled = upsample(layer_maps, image_size, mode=self.upsample_mode, align_corners=False)
        anomaly_map = torch.einsum("blhw,l->bhw", upsampled, self.layer_weights)
        return {
            "image_score": image_logits.softmax(dim=-1)[:, 1],
            "image_logits": image_logits,
            "layer_maps": layer_maps,
            "anomaly_map": anomaly_map,
        }

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor] | InferenceBatch:
        """Training: the dict of :meth:`forward_features`; evaluation: an ``InferenceBatch`` with the smoothed map."""
        out = self.forward_features(self.encode(images), tuple(images.shape[-2:]))
        if self.training:
            return out
        anomaly_map = self.smoothing(out["anomaly_map"])
        score = out["image_score"]
        if self.image_score == "global+max":
            score = 0.5 * (score + anomaly_map.flatten(1).amax(dim=1))
        return InferenceBatch(pred_score=score, anomaly_map=anomaly_map)
