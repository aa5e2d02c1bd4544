"""From patch-level similarity maps to pixel anomaly maps: upsampling and Gaussian smoothing.

Plain PyTorch, used inside every method's ``torch_model.py`` so that the exported / anomalib ``forward`` path and the
Lightning path produce the same maps. The conventions (interpolation mode, ``align_corners``, sigma) are arguments
decided by each method's config, never re-derived here.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

UpsampleMode = Literal["bilinear", "bicubic", "nearest"]


def patches_to_grid(scores: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Reshape ``[B, N]`` or ``[B, N, C]`` patch scores to ``[B, h, w]`` / ``[B, C, h, w]``."""
    if scores.dim() == 2:
        return scores.reshape(scores.shape[0], *grid)
    return scores.reshape(scores.shape[0], *grid, scores.shape[-1]).permute(0, 3, 1, 2)


def upsample(
    maps: torch.Tensor,
    size: int | tuple[int, int],
    mode: UpsampleMode = "bilinear",
    align_corners: bool | None = False,
) -> torch.Tensor:
    """Resize ``[B, h, w]`` or ``[B, C, h, w]`` maps to ``size``, keeping the input's rank."""
    squeeze = maps.dim() == 3
    x = maps.unsqueeze(1) if squeeze else maps
    if mode == "nearest":
        align_corners = None
    x = F.interpolate(x, size=size, mode=mode, align_corners=align_corners)
    return x.squeeze(1) if squeeze else x


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """SciPy's 1-D Gaussian (radius ``int(truncate * sigma + 0.5)``, normalised to sum 1)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).float()


class GaussianSmoothing(nn.Module):
    """Separable Gaussian filter equal to ``scipy.ndimage.gaussian_filter(map, sigma)`` (``mode="reflect"``).

    SciPy's ``reflect`` repeats the edge pixel (half-sample symmetric); torch's ``reflect`` padding does not, so the
    padding is built with explicit flips (``hf_clip.md``/README §4: the official ZSAD code smooths with SciPy).

    Args:
        sigma: Standard deviation in pixels; ``0`` disables smoothing.
        truncate: Kernel radius in sigmas (SciPy default 4).
    """

    def __init__(self, sigma: float = 4.0, truncate: float = 4.0) -> None:
        super().__init__()
        self.sigma = float(sigma)
        kernel = gaussian_kernel1d(sigma, truncate) if sigma > 0 else torch.ones(1)
        self.register_buffer("kernel", kernel, persistent=False)

    @staticmethod
    def _pad_symmetric(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
        size = x.shape[dim]
        # Repeat the symmetric extension when the radius exceeds the map (tiny maps in tests), like SciPy does.
        reps = math.ceil(radius / size)
        parts = [x]
        flipped = x.flip(dim)
        for i in range(reps):
            edge = flipped if i % 2 == 0 else x
            parts.insert(0, edge)
            parts.append(edge)
        full = torch.cat(parts, dim=dim)
        start = reps * size - radius
        return full.narrow(dim, start, size + 2 * radius)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Smooth ``[B, H, W]`` maps (float32)."""
        if self.sigma <= 0:
            return maps
        radius = (self.kernel.numel() - 1) // 2
        k = self.kernel.to(maps.dtype)
        x = maps.unsqueeze(1)
        x = F.conv2d(self._pad_symmetric(x, radius, 3), k.view(1, 1, 1, -1))
        x = F.conv2d(self._pad_symmetric(x, radius, 2), k.view(1, 1, -1, 1))
        return x.squeeze(1)
