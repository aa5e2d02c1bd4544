"""Generated datasets: fast, in the documented layouts, deterministic, two visually different domains."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsad.data import make_gogan_like, make_mvtec_like, make_visa_like


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)


def test_small_defaults_are_written_in_well_under_a_second(tmp_path: Path) -> None:
    for make in (make_mvtec_like, make_visa_like):
        start = time.perf_counter()
        make(tmp_path / make.__name__)
        assert time.perf_counter() - start < 1.0, make.__name__
    start = time.perf_counter()
    make_gogan_like(tmp_path / "gogan", size=64)
    assert time.perf_counter() - start < 1.0


def test_mvtec_like_layout_and_counts(tmp_path: Path) -> None:
    root = make_mvtec_like(tmp_path / "m", categories=("a1", "b2", "c3"), n_train=2, n_test_good=1, n_test_defect=2)
    assert sorted(p.name for p in root.iterdir()) == ["a1", "b2", "c3"]
    for category in ("a1", "b2", "c3"):
        folder = root / category
        assert len(list((folder / "train/good").glob("*.png"))) == 2
        assert len(list((folder / "test/good").glob("*.png"))) == 1
        for defect in ("scratch", "spot", "crack", "missing"):
            images = sorted((folder / "test" / defect).glob("*.png"))
            masks = sorted((folder / "ground_truth" / defect).glob("*_mask.png"))
            assert [p.stem + "_mask" for p in images] == [m.stem for m in masks]
            for image_path, mask_path in zip(images, masks, strict=True):
                mask = np.asarray(Image.open(mask_path))
                assert mask.shape == _pixels(image_path).shape[:2] == (64, 64)
                assert set(np.unique(mask)) == {0, 255}


def test_generation_is_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    first = make_mvtec_like(tmp_path / "1", categories=("alpha",), n_train=1, n_test_good=0, n_test_defect=1)
    again = make_mvtec_like(tmp_path / "2", categories=("alpha",), n_train=1, n_test_good=0, n_test_defect=1)
    other = make_mvtec_like(tmp_path / "3", categories=("alpha",), n_train=1, n_test_good=0, n_test_defect=1, seed=1)
    files = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.png"))
    assert all((first / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert any((first / f).read_bytes() != (other / f).read_bytes() for f in files)


def test_normal_images_vary_and_defect_masks_are_regions(tmp_path: Path) -> None:
    root = make_gogan_like(tmp_path / "g", categories=("nunozumi",), n_train=3, n_test_defect=1, size=64)
    normals = [_pixels(p) for p in sorted((root / "nunozumi/train/good").glob("*.png"))]
    assert np.abs(normals[0] - normals[1]).mean() > 1.0, "normal images are not copies of each other"
    for mask_path in (root / "nunozumi/ground_truth").rglob("*_mask.png"):
        mask = np.asarray(Image.open(mask_path)) > 0
        assert 4 <= mask.sum() < mask.size / 2


def test_the_two_domains_look_different(tmp_path: Path) -> None:
    def mean_colour(domain: str) -> np.ndarray:
        root = make_mvtec_like(tmp_path / domain, domain=domain, n_train=3, n_test_good=0, n_test_defect=0)
        return np.mean([_pixels(p).mean((0, 1)) for p in root.rglob("train/good/*.png")], axis=0)

    warm, cool = mean_colour("a"), mean_colour("b")
    assert warm[0] > warm[2] and cool[2] > cool[0], "domain a is warm (red > blue), domain b cool"
    assert np.abs(warm - cool).max() > 40


def test_visa_like_raw_layout_matches_the_download(tmp_path: Path) -> None:
    root = make_visa_like(tmp_path / "v", categories=("pcb1",), n_train=2, n_test_good=1, n_test_defect=1)
    with (root / "split_csv/1cls.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["split"] for r in rows].count("train") == 2
    anomalies = [r for r in rows if r["label"] == "anomaly"]
    assert len(anomalies) == 4 and all(r["split"] == "test" for r in anomalies)
    class_ids = set()
    for row in anomalies:
        image = Image.open(root / row["image"])
        mask = np.asarray(Image.open(root / row["mask"]))
        assert image.size == (96, 64) and mask.shape == (64, 96)
        class_ids |= set(np.unique(mask).tolist())
    assert class_ids == {0, 1, 2, 3, 4}, "class-id masks (1..K), not 0/255"


def test_gogan_like_has_the_real_category_and_defect_structure(tmp_path: Path) -> None:
    root = make_gogan_like(tmp_path / "g", n_train=1, n_test_good=1, n_test_defect=1, size=32, image_format="jpg")
    defects = {
        c: sorted(p.name for p in (root / c / "test").iterdir() if p.name != "good") for c in ("nunozumi", "tanizumi")
    }
    assert defects["nunozumi"] == ["crack_joint_opening", "efflorescence", "exudate", "spalling_missing"]
    assert defects["tanizumi"] == ["crack_joint_opening", "efflorescence", "spalling_missing"]
    assert all(p.suffix == ".jpg" for p in root.rglob("test/*/*"))
    assert all(p.suffix == ".png" for p in root.rglob("ground_truth/*/*"))


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_train"):
        make_mvtec_like(tmp_path, n_train=-1)
    with pytest.raises(ValueError, match="unknown defect kind"):
        make_mvtec_like(tmp_path / "x", defects=("dent",))
    with pytest.raises(ValueError, match="layout"):
        make_visa_like(tmp_path / "y", layout="zip")
