"""Bad input: every case is either handled (converted, resized, binarised) or rejected at setup — before training —
with one error that names the file and the fix. Nothing is skipped silently."""

from __future__ import annotations

import os
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zsad.data import (
    BadImageError,
    CrossDataset,
    DatasetLayoutError,
    DatasetNotFoundError,
    Gogan,
    MVTecAD,
    UnifiedDataset,
    Visa,
    make_visa_like,
)

SPOT_IMAGE = Path("alpha/test/spot/000.png")
SPOT_MASK = Path("alpha/ground_truth/spot/000_mask.png")
TRAIN_IMAGE = Path("alpha/train/good/000.png")


def _datamodule(root: Path, **kwargs) -> MVTecAD:
    return MVTecAD(root=root, category="alpha", num_workers=0, **kwargs)


def _setup(root: Path, **kwargs) -> MVTecAD:
    datamodule = _datamodule(root, **kwargs)
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule


def _item(datamodule: MVTecAD, relative: Path, split: str = "test"):
    dataset = getattr(datamodule, f"{split}_data")
    paths = [Path(p).resolve() for p in dataset.samples.image_path]
    target = (Path(datamodule.root) / relative).resolve()
    return dataset[paths.index(target)]


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# -- unreadable images ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: _truncate(p), "truncated"),
        (lambda p: p.write_bytes(b""), r"empty \(0 bytes\)"),
        (lambda p: p.write_text("not an image"), "not a readable image"),
    ],
    ids=["truncated-png", "zero-byte", "not-an-image"],
)
def test_unreadable_images_are_rejected_naming_the_file(small_mvtec: Path, damage, message: str) -> None:
    damage(small_mvtec / TRAIN_IMAGE)
    with pytest.raises(BadImageError, match=message) as error:
        _setup(small_mvtec)
    assert str((small_mvtec / TRAIN_IMAGE).resolve()) in str(error.value)
    assert "Fix:" in str(error.value)


@pytest.mark.parametrize("side", [40, 400], ids=["small-jpeg-decoded", "large-jpeg-tail-checked"])
def test_truncated_jpegs_are_rejected(tmp_path: Path, side: int) -> None:
    from zsad.data import make_gogan_like

    root = make_gogan_like(
        tmp_path / "g", categories=("nunozumi",), n_train=1, n_test_good=1, n_test_defect=1, size=32, image_format="jpg"
    )
    noisy = (np.random.default_rng(0).random((side, side, 3)) * 255).astype(np.uint8)
    path = root / "nunozumi/train/good/000.jpg"
    Image.fromarray(noisy).save(path, quality=95)
    assert (path.stat().st_size > 16_384) == (side == 400)
    _truncate(path, keep=0.8)
    with pytest.raises(BadImageError, match="000.jpg.*(truncated|not a readable)"):
        datamodule = Gogan(root=root, category="nunozumi", num_workers=0)
        datamodule.setup()


def test_unreadable_file_found_at_load_time_names_the_file_too(small_mvtec: Path) -> None:
    datamodule = _setup(small_mvtec, check_files=False)
    _truncate(small_mvtec / SPOT_IMAGE)
    with pytest.raises(BadImageError, match=r"000\.png: cannot be decoded.*Fix:"):
        _item(datamodule, SPOT_IMAGE)


# -- image modes ------------------------------------------------------------------------------------------------------


def _write_mode(path: Path, mode: str) -> torch.Tensor:
    """Overwrite ``path`` with an image of ``mode``; return the RGB float image a correct reader must produce."""
    rng = np.random.default_rng(1)
    if mode == "L":
        grey = rng.integers(0, 256, (32, 32), dtype=np.uint8)
        Image.fromarray(grey, "L").save(path)
        expected = np.repeat(grey[..., None], 3, -1) / 255.0
    elif mode == "RGBA":
        rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
        rgba[..., 3] = 0  # fully transparent: the stored colour is kept, alpha dropped
        Image.fromarray(rgba, "RGBA").save(path)
        expected = rgba[..., :3] / 255.0
    elif mode == "I;16":
        deep = rng.integers(0, 65536, (32, 32), dtype=np.uint16)
        Image.fromarray(deep).save(path)
        assert Image.open(path).mode == "I;16"
        expected = np.repeat(deep[..., None], 3, -1) / 65535.0
    else:  # palette
        rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        paletted = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        paletted.save(path)
        expected = np.asarray(paletted.convert("RGB")) / 255.0
    return torch.from_numpy(expected.astype(np.float32)).permute(2, 0, 1)


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P"], ids=["grayscale", "rgba", "16-bit", "palette"])
def test_grey_rgba_16bit_and_palette_images_become_rgb_in_unit_range(small_mvtec: Path, mode: str) -> None:
    expected = _write_mode(small_mvtec / SPOT_IMAGE, mode)
    item = _item(_setup(small_mvtec), SPOT_IMAGE)
    assert item.image.shape == (3, 32, 32)
    assert torch.allclose(item.image, expected, atol=1e-6)
    if mode == "I;16":
        assert 0.3 < item.image.mean() < 0.7, "a 16-bit image is scaled, not saturated to white"


# -- masks ------------------------------------------------------------------------------------------------------------


def _mask_region() -> np.ndarray:
    region = np.zeros((32, 32), bool)
    region[5:10, 2:6] = True
    return region


def test_mask_of_another_resolution_is_resized_nearest_and_stays_binary(small_mvtec: Path) -> None:
    big = np.zeros((64, 64), np.uint8)
    big[10:20, 4:12] = 255
    Image.fromarray(big).save(small_mvtec / SPOT_MASK)
    item = _item(_setup(small_mvtec), SPOT_IMAGE)
    assert item.gt_mask.shape == (32, 32)
    assert torch.equal(item.gt_mask, torch.from_numpy(_mask_region()))


def test_mask_with_another_aspect_ratio_is_rejected(small_mvtec: Path) -> None:
    Image.fromarray(np.full((32, 48), 255, np.uint8)).save(small_mvtec / SPOT_MASK)
    with pytest.raises(BadImageError, match=r"000_mask\.png: is 48x32 but its image .* is 32x32") as error:
        _setup(small_mvtec)
    assert "Fix:" in str(error.value)


@pytest.mark.parametrize("convention", ["class-ids", "lossy-0-255", "coloured"])
def test_masks_with_values_other_than_0_255_are_binarised_correctly(small_mvtec: Path, convention: str) -> None:
    region = _mask_region()
    if convention == "class-ids":  # VisA raw: ids 1..K look black
        values = np.where(region, 3, 0).astype(np.uint8)
        values[20:22, 20:22] = 1
        region = region.copy()
        region[20:22, 20:22] = True
        Image.fromarray(values).save(small_mvtec / SPOT_MASK)
    elif convention == "lossy-0-255":  # JPEG-like noise in the background, anti-aliased grey edge
        values = np.where(region, 250, 3).astype(np.uint8)
        values[4, 2:6] = 90  # grey edge below the 128 threshold: background
        values[10, 2:6] = 200  # grey edge above it: defect
        region = region.copy()
        region[10, 2:6] = True
        Image.fromarray(values).save(small_mvtec / SPOT_MASK)
    else:  # annotation tool colours: a red and a white defect; red's luma (76) is below the 8-bit threshold
        values = np.zeros((32, 32, 3), np.uint8)
        values[region] = (255, 0, 0)
        values[20:24, 20:24] = (255, 255, 255)
        region = region.copy()
        region[20:24, 20:24] = True
        Image.fromarray(values).save(small_mvtec / SPOT_MASK)
    item = _item(_setup(small_mvtec), SPOT_IMAGE)
    assert torch.equal(item.gt_mask, torch.from_numpy(region))


def test_explicit_mask_threshold_overrides_the_automatic_rule(small_mvtec: Path) -> None:
    values = np.where(_mask_region(), 250, 3).astype(np.uint8)
    Image.fromarray(values).save(small_mvtec / SPOT_MASK)
    item = _item(_setup(small_mvtec, mask_threshold=0), SPOT_IMAGE)
    assert bool(item.gt_mask.all()), "threshold 0: every non-zero pixel, noise included, is a defect"


def test_empty_mask_of_an_anomalous_image_is_rejected(small_mvtec: Path) -> None:
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(small_mvtec / SPOT_MASK)
    with pytest.raises(BadImageError, match=r"000_mask\.png: has no anomalous pixel.*Fix: fix the mask, or move"):
        _setup(small_mvtec)


def test_anomalous_image_without_mask_is_rejected_naming_the_expected_mask(small_mvtec: Path) -> None:
    (small_mvtec / SPOT_MASK).unlink()
    with pytest.raises(DatasetLayoutError, match=r"spot/000\.png: is anomalous but has no mask") as error:
        _setup(small_mvtec)
    assert "ground_truth/spot/000_mask.png" in str(error.value)


def test_mask_without_image_is_rejected(small_mvtec: Path) -> None:
    shutil.copy(small_mvtec / SPOT_MASK, small_mvtec / "alpha/ground_truth/spot/007_mask.png")
    with pytest.raises(DatasetLayoutError, match=r"007_mask\.png: is a mask without an image"):
        _setup(small_mvtec)


# -- folders ----------------------------------------------------------------------------------------------------------


def test_missing_root_shows_the_expected_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"Gogan .* not found.*does not exist") as error:
        Gogan(root=tmp_path / "nowhere", category="nunozumi").prepare_data()
    message = str(error.value)
    assert "ground_truth/<defect>/     <name>_mask.png" in message and "not public" in message
    with pytest.raises(DatasetNotFoundError, match="download=True"):
        MVTecAD(root=tmp_path / "nowhere", category="bottle").prepare_data()
    with pytest.raises(DatasetNotFoundError, match="VisA not found"):
        CrossDataset(train={"dataset": "visa", "root": tmp_path / "v"}, test={"dataset": "mvtec", "root": "."}).setup()


def test_failed_download_becomes_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import anomalib.data.datamodules.image.mvtecad as anomalib_mvtec

    def offline(*_args, **_kwargs) -> None:
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(anomalib_mvtec, "download_and_extract", offline)
    with pytest.raises(DatasetNotFoundError, match=r"Could not download/prepare MVTec AD.*name resolution") as error:
        MVTecAD(root=tmp_path / "mvtec", category="bottle", download=True).prepare_data()
    assert "mvtec.com" in str(error.value)


def test_unknown_category_lists_the_existing_ones(small_mvtec: Path, gogan_like_root: Path) -> None:
    with pytest.raises(DatasetLayoutError, match=r"Unknown MVTec AD category 'alhpa'.*\['alpha'\]"):
        MVTecAD(root=small_mvtec, category="alhpa").prepare_data()
    with pytest.raises(DatasetLayoutError, match=r"Unknown Gogan .* category 'nunozumii'.*nunozumi', 'tanizumi'"):
        Gogan(root=gogan_like_root, category="nunozumii").prepare_data()
    with pytest.raises(DatasetLayoutError, match="looks like a category folder itself: pass its parent"):
        Gogan(root=gogan_like_root / "nunozumi", category="nunozumi").prepare_data()
    datamodule = CrossDataset(
        train={"dataset": "mvtec", "root": small_mvtec},
        test={"dataset": "gogan", "root": gogan_like_root, "categories": ["tanizumi", "other"]},
    )
    with pytest.raises(DatasetLayoutError, match="'other'"):
        datamodule.setup()


def test_empty_category_is_rejected_not_dropped(small_mvtec: Path) -> None:
    for split in ("train/good", "test/good"):
        (small_mvtec / "beta" / split).mkdir(parents=True)
    cross = CrossDataset(
        train={"dataset": "mvtec", "root": small_mvtec}, test={"dataset": "mvtec", "root": small_mvtec}
    )
    assert cross.category_names == ["alpha", "beta"], "an empty category folder is still a category"
    with pytest.raises(DatasetLayoutError, match=r"Empty MVTec AD category 'beta'.*Fix:"):
        cross.setup()


def test_category_without_training_images_is_rejected_by_the_unified_protocol(small_mvtec: Path) -> None:
    for image in (small_mvtec / "alpha/train/good").iterdir():
        image.unlink()
    with pytest.raises(DatasetLayoutError, match=r"'alpha': no image in its train/ folder"):
        UnifiedDataset(dataset="mvtec", root=small_mvtec).setup()


def test_symlinked_category_folder_is_followed(small_mvtec: Path, tmp_path: Path, count_images) -> None:
    linked_root = tmp_path / "linked"
    linked_root.mkdir()
    (linked_root / "alpha").symlink_to(small_mvtec / "alpha", target_is_directory=True)
    datamodule = _setup(linked_root)
    on_disk = count_images(linked_root / "alpha")
    assert (len(datamodule.train_data), len(datamodule.test_data)) == (on_disk["train"], on_disk["test"])


def test_symlinked_folder_inside_a_category_is_rejected(small_mvtec: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    shutil.move(small_mvtec / "alpha/train/good", elsewhere)
    (small_mvtec / "alpha/train/good").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(DatasetLayoutError, match=r"train/good: is a symlinked folder .*silently drop") as error:
        _setup(small_mvtec)
    assert "symlink the whole category folder" in str(error.value)


def test_symlinked_file_pointing_outside_is_rejected(small_mvtec: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    shutil.move(small_mvtec / TRAIN_IMAGE, outside)
    os.symlink(outside, small_mvtec / TRAIN_IMAGE)
    with pytest.raises(DatasetLayoutError, match=r"000\.png: is a symlink to .*outside the category"):
        _setup(small_mvtec)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda root: shutil.copy(root / TRAIN_IMAGE, root / "alpha/train/good/009.bmp"),
            r"009\.bmp: has an image format",
        ),
        (lambda root: (root / "alpha/test/spot/extra").mkdir(), r"spot/extra: is a folder nested"),
        (
            lambda root: shutil.copytree(root / "alpha/train/good", root / "alpha/train/bad"),
            r"train/bad: is a defect folder in train/",
        ),
        (
            lambda root: shutil.copy(root / TRAIN_IMAGE, root / "alpha/test/000.png"),
            r"test/000\.png: lies directly in test/",
        ),
        (
            lambda root: shutil.copy(root / TRAIN_IMAGE, root / "alpha/stray.png"),
            r"stray\.png: is not in train/<label>/",
        ),
    ],
    ids=["unsupported-format", "nested-folder", "defect-in-train", "file-in-split", "stray-image"],
)
def test_files_the_parser_would_drop_or_misfile_are_rejected(small_mvtec: Path, change, message: str) -> None:
    change(small_mvtec)
    with pytest.raises(DatasetLayoutError, match=message):
        _setup(small_mvtec)


def test_hidden_files_are_ignored(small_mvtec: Path, count_images) -> None:
    (small_mvtec / "alpha/train/good/.DS_Store").write_bytes(b"\0")
    datamodule = _setup(small_mvtec)
    assert len(datamodule.train_data) == count_images(small_mvtec / "alpha")["train"]


def test_raw_visa_without_split_file_is_rejected(tmp_path: Path) -> None:
    root = make_visa_like(tmp_path / "visa", categories=("candle",), size=16)
    shutil.rmtree(root / "split_csv")
    with pytest.raises(DatasetNotFoundError, match=r"split file .*1cls\.csv.* is missing"):
        Visa(root=root, category="candle").prepare_data()
