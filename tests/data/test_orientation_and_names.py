"""Photos and folders as users have them: EXIF-rotated phone JPEGs, non-ASCII folder names, same-stem files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsad.data import DatasetLayoutError, Gogan, read_image
from zsad.data.files import probe_image, read_image_size
from zsad.data.synthetic import make_gogan_like

ORIENTATION = 0x0112


def _upright_scene(height: int = 48, width: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A portrait picture with a bright defect in its upper-left quarter, and that defect's mask."""
    image = np.full((height, width, 3), 60, np.uint8)
    mask = np.zeros((height, width), np.uint8)
    image[4:14, 3:11] = 250
    mask[4:14, 3:11] = 255
    return image, mask


def _save_as_phone_jpeg(upright: np.ndarray, path: Path) -> None:
    """Store the pixels rotated the way a phone sensor does, tagged Orientation=6 (viewers rotate 90° clockwise)."""
    stored = np.rot90(upright, k=1)  # counter-clockwise; a 90° clockwise turn on display restores ``upright``
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(np.ascontiguousarray(stored)).save(path, quality=98, exif=exif.tobytes())


def test_exif_rotated_jpeg_is_read_upright(tmp_path: Path) -> None:
    upright, _ = _upright_scene()
    path = tmp_path / "phone.jpg"
    _save_as_phone_jpeg(upright, path)
    assert Image.open(path).size == (48, 32)  # stored landscape (W, H)

    image = read_image(path)
    assert tuple(image.shape) == (3, 48, 32)
    assert np.abs(image.permute(1, 2, 0).numpy() * 255 - upright).mean() < 3
    assert read_image_size(path) == (48, 32)
    assert probe_image(path).size == (48, 32)

    from zsad.viz import _load_image  # the picture under an overlay is the same upright picture

    assert np.abs(_load_image(str(path), 48, 32).astype(float) - upright).mean() < 3


def _gogan_with_photo(root: Path) -> Path:
    """A Gogan category whose first defect image is replaced by an EXIF-rotated photo with an upright mask."""
    make_gogan_like(
        root, categories=("nunozumi",), n_train=2, n_test_good=2, n_test_defect=1, size=32, image_format="jpg"
    )
    category = root / "nunozumi"
    image_path = sorted((category / "test/crack_joint_opening").glob("*.jpg"))[0]
    mask_path = category / "ground_truth/crack_joint_opening" / f"{image_path.stem}_mask.png"
    upright, mask = _upright_scene()
    _save_as_phone_jpeg(upright, image_path)
    Image.fromarray(mask).save(mask_path)
    return image_path


def test_exif_rotated_photo_lines_up_with_its_mask(tmp_path: Path) -> None:
    # Before: the stored 32x48 photo was "probably the wrong mask" for its 48x32 (upright) mask and setup failed.
    image_path = _gogan_with_photo(tmp_path / "gogan")
    datamodule = Gogan(root=tmp_path / "gogan", category="nunozumi", image_size=48, num_workers=0)
    datamodule.setup()
    dataset = datamodule.test_data
    item = dataset[[Path(p).resolve() for p in dataset.samples.image_path].index(image_path.resolve())]
    bright = item.image.mean(dim=0) > item.image.mean()
    mask = item.gt_mask.bool()
    # the defect's bright pixels and its mask cover the same region (the transforms resize both alike)
    assert (bright & mask).sum() / (bright | mask).sum() > 0.8


def test_non_ascii_root_and_category_folders(tmp_path: Path) -> None:
    # Before: anomalib's parser raised "Path contains non-printable characters" for Gogan's native names.
    ascii_root = make_gogan_like(
        tmp_path / "ascii", categories=("nunozumi",), n_train=2, n_test_good=2, n_test_defect=1, size=32
    )
    native_root = tmp_path / "Données_布積み"
    shutil.copytree(ascii_root, native_root)
    (native_root / "nunozumi").rename(native_root / "布積み")

    def rows(root: Path, category: str) -> list[tuple[str, int, bool]]:
        datamodule = Gogan(root=root, category=category, image_size=32, num_workers=0)
        datamodule.setup()
        out = []
        for split in ("train_data", "test_data"):
            samples = getattr(datamodule, split).samples
            for row in samples.itertuples(index=False):
                relative = str(Path(row.image_path).relative_to(Path(row.path)))
                out.append((relative, int(row.label_index), isinstance(row.mask_path, str) and bool(row.mask_path)))
        return out

    native = rows(native_root, "布積み")
    assert native == rows(ascii_root, "nunozumi")
    datamodule = Gogan(root=native_root, category="布積み", image_size=32, num_workers=0)
    datamodule.setup()
    assert datamodule.test_data[0].image.shape[-2:] == (32, 32)


def test_same_stem_images_in_a_defect_folder_name_the_files(tmp_path: Path) -> None:
    # Before: a bare pandas "Must have equal len keys and value" from anomalib's positional mask pairing.
    root = make_gogan_like(
        tmp_path / "gogan", categories=("nunozumi",), n_train=2, n_test_good=2, n_test_defect=1, size=32
    )
    defect = root / "nunozumi/test/crack_joint_opening"
    png = sorted(defect.glob("*.png"))[0]
    Image.open(png).convert("RGB").save(png.with_suffix(".jpg"))
    with pytest.raises(DatasetLayoutError, match=rf"{png.stem}\.jpg, {png.stem}\.png.*rename or delete") as error:
        Gogan(root=root, category="nunozumi", image_size=32, num_workers=0).setup()
    assert str(defect) in str(error.value)
