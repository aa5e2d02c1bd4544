"""Helpers of the data tests: counting files on disk independently of the code under test, small breakable data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def _count_images(category_dir: Path) -> dict[str, int]:
    """Image files per split of an MVTec-layout category folder, counted with os.walk (follows symlinks)."""
    counts = {"train": 0, "test": 0, "test_anomalous": 0}
    for split in ("train", "test"):
        for dirpath, _, filenames in os.walk(category_dir / split, followlinks=True):
            n = sum(Path(name).suffix.lower() in IMAGE_SUFFIXES for name in filenames)
            counts[split] += n
            if split == "test" and Path(dirpath).name != "good":
                counts["test_anomalous"] += n
    return counts


@pytest.fixture
def count_images():
    """``count_images(category_dir) -> {"train": n, "test": n, "test_anomalous": n}``, independent of zsad."""
    return _count_images


@pytest.fixture
def small_mvtec(tmp_path: Path) -> Path:
    """A fresh one-category MVTec-layout dataset (32 px) that a test may break: alpha, 3 train, 2 good, 2 spot."""
    from zsad.data.synthetic import make_mvtec_like

    return make_mvtec_like(
        tmp_path / "mvtec", categories=("alpha",), n_train=3, n_test_good=2, n_test_defect=2, size=32, defects=("spot",)
    )
