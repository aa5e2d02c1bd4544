"""``zsad.data.Images``: any folder / glob / file list of pictures, read upright and in RGB, bad files named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsad.data import BadImageError, DatasetNotFoundError, Images
from zsad.data.images import list_images


def _picture(width: int = 64, height: int = 40, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    """PNG + JPEG of the same stem, a grey PNG, an EXIF-rotated JPEG, a BMP and a TIFF in a subfolder."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    _picture(seed=1).save(root / "img1.png")
    _picture(seed=1).save(root / "img1.jpg", quality=95)
    _picture(seed=2).convert("L").save(root / "sub" / "grey.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90° clockwise (portrait)
    _picture(seed=3).save(root / "rotated.jpg", exif=exif, quality=95)
    _picture(seed=4).save(root / "sub" / "b.bmp")
    _picture(seed=5).save(root / "sub" / "t.tiff")
    (root / "notes.txt").write_text("not an image")
    (root / ".thumbs").mkdir()
    _picture(seed=6).save(root / ".thumbs" / "hidden.png")
    return root


def test_folder_glob_and_list_designate_the_same_images(photo_folder: Path) -> None:
    expected = sorted(
        ["img1.png", "img1.jpg", "sub/grey.png", "rotated.jpg", "sub/b.bmp", "sub/t.tiff"],
    )
    found = sorted(str(p.relative_to(photo_folder)) for p in list_images(photo_folder))
    assert found == expected  # recursive, text file and hidden folder left out
    assert list_images(str(photo_folder / "**" / "*.png")) == [photo_folder / "img1.png", photo_folder / "sub/grey.png"]
    files = [photo_folder / "img1.jpg", str(photo_folder / "sub" / "b.bmp")]
    assert list_images(files) == [photo_folder / "img1.jpg", photo_folder / "sub" / "b.bmp"]


def test_images_are_read_upright_rgb_and_resized(photo_folder: Path) -> None:
    datamodule = Images(root=str(photo_folder), image_size=32, batch_size=8)
    batch = next(iter(datamodule.predict_dataloader()))
    assert batch.image.shape == (6, 3, 32, 32)
    assert batch.gt_label is None and batch.gt_mask is None
    names = [Path(p).name for p in batch.image_path]
    assert len(set(batch.image_path)) == 6 and names.count("img1.png") == 1 and names.count("img1.jpg") == 1
    # EXIF orientation 6: what a viewer shows is the stored picture rotated 90° clockwise.
    raw = Images(root=[str(photo_folder / "rotated.jpg"), str(photo_folder / "sub" / "grey.png")])
    raw.setup()  # no image_size, no model: file resolution
    rotated, grey = raw.data[0].image, raw.data[1].image
    with Image.open(photo_folder / "rotated.jpg") as stored:
        upright = np.asarray(stored.convert("RGB").transpose(Image.Transpose.ROTATE_270), dtype=np.float32) / 255
    assert rotated.shape == (3, 64, 40)
    np.testing.assert_allclose(rotated.permute(1, 2, 0).numpy(), upright, atol=1e-6)
    assert grey.shape == (3, 40, 64) and bool((grey[0] == grey[1]).all() and (grey[1] == grey[2]).all())


def test_bad_files_are_reported_once_naming_each(photo_folder: Path) -> None:
    (photo_folder / "empty.png").write_bytes(b"")
    data = (photo_folder / "img1.png").read_bytes()
    (photo_folder / "sub" / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError) as info:
        Images(root=str(photo_folder)).setup()
    message = str(info.value)
    assert message.startswith("2 of 8 image(s) cannot be read")
    assert "empty.png" in message and "cut.png" in message and "img1.png:" not in message


def test_missing_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        list_images([str(tmp_path / "nowhere"), str(tmp_path / "*.png")])
    with pytest.raises(DatasetNotFoundError, match="No image found"):
        list_images(tmp_path)
