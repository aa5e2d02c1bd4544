"""Upsampling and smoothing conventions shared by the methods."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from zsad.methods.anomaly_map import GaussianSmoothing, patches_to_grid, upsample


@pytest.mark.parametrize(("sigma", "size"), [(4.0, 98), (4.0, 37), (1.5, 20), (4.0, 10)])
def test_gaussian_smoothing_equals_scipy_gaussian_filter(sigma: float, size: int) -> None:
    """The official code smooths with SciPy (mode 'reflect', truncate 4): equal everywhere, borders included."""
    maps = torch.rand(2, size, size + 3)
    ours = GaussianSmoothing(sigma)(maps)
    for index in range(2):
        expected = gaussian_filter(maps[index].double().numpy(), sigma=sigma)
        np.testing.assert_allclose(ours[index].numpy(), expected, atol=1e-5)


def test_sigma_zero_disables_smoothing() -> None:
    maps = torch.rand(1, 8, 8)
    assert torch.equal(GaussianSmoothing(0.0)(maps), maps)


def test_patches_to_grid_and_upsample() -> None:
    scores = torch.arange(2 * 9, dtype=torch.float32).reshape(2, 9)
    grid = patches_to_grid(scores, (3, 3))
    assert grid.shape == (2, 3, 3) and grid[1, 2, 0] == scores[1, 6]
    channels = patches_to_grid(torch.rand(2, 9, 2), (3, 3))
    assert channels.shape == (2, 2, 3, 3)
    up = upsample(grid, 12)
    assert up.shape == (2, 12, 12)
    constant = upsample(torch.full((1, 3, 3), 0.25), (7, 5), mode="bicubic")
    torch.testing.assert_close(constant, torch.full((1, 7, 5), 0.25))
