"""Overlay and curve pictures: files written where the predict path expects them, with the right content."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from metrics_toy import toy_batch
from PIL import Image

from zsad.backbone.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from zsad.viz import curves_figure, denormalize_image, figure_to_array, overlay_figure, save_overlays


def test_denormalize_inverts_clip_normalisation() -> None:
    rgb = torch.rand(3, 5, 7)
    normalised = (rgb - torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]) / torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    restored = denormalize_image(normalised)
    assert restored.shape == (5, 7, 3) and restored.dtype == np.uint8
    assert np.abs(restored.astype(int) - (rgb.permute(1, 2, 0).numpy() * 255).round()).max() <= 1


def test_save_overlays_writes_one_png_per_sample(tmp_path: Path) -> None:
    batch = toy_batch([1, 4, 5])
    paths = save_overlays(batch, tmp_path, threshold=1.0)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "cable/good_001.png",
        "cable/scratch_004.png",
        "screw/scratch_005.png",
    ]
    with Image.open(paths[1]) as image:
        assert image.size[0] > image.size[1] > 200  # three panels side by side


def test_threshold_contour_is_drawn_in_red() -> None:
    amap = np.zeros((32, 32), np.float32)
    amap[8:20, 8:20] = 1.0
    image = np.full((32, 32, 3), 128, np.uint8)
    without = figure_to_array(overlay_figure(image, amap, threshold=None))
    with_contour = figure_to_array(overlay_figure(image, amap, threshold=0.5))
    red = (with_contour[..., 0] > 200) & (with_contour[..., 1] < 60) & (with_contour[..., 2] < 60)
    red_before = (without[..., 0] > 200) & (without[..., 1] < 60) & (without[..., 2] < 60)
    assert red.sum() > red_before.sum() + 50


def test_curves_figure_has_one_panel_per_curve() -> None:
    line = (np.array([0.0, 1.0]), np.array([0.0, 1.0]))
    fig = curves_figure({"pixel_roc": line, "pro": line}, {"pixel_auroc": 0.5, "pixel_aupro": 0.15}, 0.3, "x")
    assert len(fig.axes) == 2
