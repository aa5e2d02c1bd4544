"""CLIP-ADA's objective (Eqs. 4–6): BCE between each pass's sigmoid map and the synthetic anomaly mask.

``L = L_coarse + λ · Σ_{r=1..R} L_refine,r`` with ``λ = 1`` (the paper writes one refinement term; with ``R > 1`` each
pass has its own projection and its own BCE term, summed — the paper does not say, zsad's choice).

The mask is brought to the map (``"grid"``, default: area-averaged to ``h × w``, soft targets) or the map to the mask
(``"image"``: the sigmoid map upsampled bilinearly to the input size, binary targets) — the paper does not say which.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from zsad.methods.anomaly_map import upsample

LossResolution = Literal["grid", "image"]


def mask_to_grid(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[B, H, W]`` binary mask → ``[B, h, w]`` fraction of anomalous pixels per patch (area averaging)."""
    return F.interpolate(mask.float().unsqueeze(1), size=grid, mode="area").squeeze(1)


class CLIPADALoss(nn.Module):
    """Sum of the coarse BCE and ``λ`` times the refinement BCEs.

    Args:
        refine_weight: ``λ`` (1 in the paper).
        resolution: ``"grid"`` (mask area-averaged to the patch grid) or ``"image"`` (map upsampled to the mask).
    """

    def __init__(self, refine_weight: float = 1.0, resolution: LossResolution = "grid") -> None:
        super().__init__()
        if resolution not in ("grid", "image"):
            msg = f"resolution must be 'grid' or 'image', got {resolution!r}."
            raise ValueError(msg)
        self.refine_weight = refine_weight
        self.resolution = resolution

    def pass_loss(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """BCE of one pass: ``logits`` ``[B, h, w]`` (sigmoid applied here), ``mask`` ``[B, H, W]`` in {0, 1}."""
        logits = logits.float()
        if self.resolution == "grid":
            # BCE on sigmoid(logits), computed from the logits for numerical stability (same value).
            return F.binary_cross_entropy_with_logits(logits, mask_to_grid(mask, tuple(logits.shape[-2:])))
        probs = upsample(logits.sigmoid(), tuple(mask.shape[-2:]), mode="bilinear", align_corners=False)
        with torch.autocast(device_type=probs.device.type, enabled=False):
            return F.binary_cross_entropy(probs.clamp(1e-7, 1 - 1e-7), mask.float())

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args: ``logits`` ``[B, R+1, h, w]`` (pass 0 = coarse); ``mask`` ``[B, H, W]``.

        Returns:
            ``loss`` and the detached terms ``coarse`` and ``refine`` (the sum over refinement passes).
        """
        mask = mask.to(logits.device)
        coarse = self.pass_loss(logits[:, 0], mask)
        refine = sum((self.pass_loss(logits[:, r], mask) for r in range(1, logits.shape[1])), logits.new_zeros(()))
        loss = coarse + self.refine_weight * refine
        return {"loss": loss, "coarse": coarse.detach(), "refine": refine.detach()}
