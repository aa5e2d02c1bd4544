"""Transforms: the CLIP preprocessing convention, albumentations on image + mask, the mosaic, native masks."""

from __future__ import annotations

import logging
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from torchvision.transforms.v2 import Normalize, Resize
from torchvision.tv_tensors import Image, Mask

from zsad.data import (
    Albumentations,
    CrossDataset,
    MVTecAD,
    clip_transform,
    make_mvtec_like,
    read_native_masks,
    resize_transform,
    tile_mosaic,
)


def test_clip_transform_is_bicubic_resize_then_openai_normalisation() -> None:
    from zsad.backbone.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    transform = clip_transform(518)
    resize, normalize = transform.transforms
    assert isinstance(resize, Resize) and tuple(resize.size) == (518, 518) and resize.antialias
    assert resize.interpolation.value == "bicubic"
    assert isinstance(normalize, Normalize)
    assert tuple(normalize.mean) == OPENAI_CLIP_MEAN and tuple(normalize.std) == OPENAI_CLIP_STD


def test_resize_keeps_masks_binary() -> None:
    mask = Mask((torch.rand(37, 53) > 0.7).to(torch.uint8))
    image, resized = resize_transform(24)(Image(torch.rand(3, 37, 53)), mask)
    assert image.shape == (3, 24, 24) and resized.shape == (24, 24)
    assert set(resized.unique().tolist()) <= {0, 1}


def test_albumentations_moves_image_and_mask_together() -> None:
    image = Image(torch.rand(3, 16, 16))
    mask = Mask(torch.zeros(16, 16, dtype=torch.uint8))
    mask[:, :4] = 1
    flipped, flipped_mask = Albumentations(A.HorizontalFlip(p=1.0))(image, mask)
    assert isinstance(flipped, Image) and isinstance(flipped_mask, Mask)
    assert torch.allclose(flipped, image.flip(-1))
    assert torch.equal(flipped_mask, mask.flip(-1))


def test_albumentations_is_deterministic_under_the_datasets_seeding(tmp_path: Path) -> None:
    root = make_mvtec_like(tmp_path / "m", n_train=1, n_test_good=1, n_test_defect=1, size=16, defects=("spot",))
    augment = Albumentations(
        A.Compose([A.HorizontalFlip(p=0.5), A.Affine(rotate=(-30, 30), p=1.0), A.RandomBrightnessContrast(p=1.0)])
    )
    draws = []
    for _ in range(2):
        datamodule = CrossDataset(
            train={"dataset": "mvtec", "root": root},
            test={"dataset": "mvtec", "root": root},
            train_augmentations=augment,
            image_size=16,
            seed=4,
        )
        datamodule.setup()
        draws.append([datamodule.train_data[i] for i in range(len(datamodule.train_data))])
    for first, second in zip(*draws, strict=True):
        assert torch.equal(first.image, second.image) and torch.equal(first.gt_mask, second.gt_mask)
        assert set(first.gt_mask.unique().tolist()) <= {False, True}
    assert any(item.gt_mask.any() for item in draws[0])


def test_albumentations_rejects_other_objects() -> None:
    with pytest.raises(TypeError, match="albumentations"):
        Albumentations(Resize(8))


def test_tile_mosaic_places_four_tiles_and_their_masks() -> None:
    images = [torch.full((3, 4, 6), float(i) / 4) for i in range(4)]
    masks = [torch.full((4, 6), i % 2, dtype=torch.uint8) for i in range(4)]
    image, mask = tile_mosaic(images, masks)
    assert image.shape == (3, 8, 12) and mask.shape == (8, 12)
    assert image[0, 0, 0] == 0.0 and image[0, 0, 6] == 0.25 and image[0, 4, 0] == 0.5 and image[0, 4, 6] == 0.75
    assert mask[:4, 6:].all() and not mask[:4, :6].any()
    # A tile of another size is resized to the first one's.
    image, _ = tile_mosaic([images[0], torch.rand(3, 8, 12), images[2], images[3]], masks)
    assert image.shape == (3, 8, 12)
    with pytest.raises(ValueError, match="4 images"):
        tile_mosaic(images[:3], masks[:3])


def test_native_masks_are_read_at_file_resolution(tmp_path: Path) -> None:
    root = make_mvtec_like(tmp_path / "m", categories=("alpha",), n_train=1, n_test_good=1, n_test_defect=1)
    datamodule = MVTecAD(root=root, category="alpha", num_workers=0, image_size=32, eval_batch_size=64)
    datamodule.setup()
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.gt_mask.shape[-2:] == (32, 32)
    native = read_native_masks(batch.image_path, batch.mask_path, batch.gt_label)
    assert all(mask.shape == (64, 64) for mask in native)
    for mask, mask_path, label in zip(native, batch.mask_path, batch.gt_label, strict=True):
        if label:
            assert torch.equal(mask, torch.from_numpy(np.asarray(PILImage.open(mask_path)) > 0))
        else:
            assert not mask.any()
    with pytest.raises(ValueError, match="no mask file"):
        read_native_masks(batch.image_path[:1], [None], [1])


def test_a_defect_erased_by_downsampling_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_mvtec_like(
        tmp_path / "m", categories=("alpha",), n_train=1, n_test_good=0, n_test_defect=1, defects=("spot",)
    )
    mask_path = root / "alpha/ground_truth/spot/000_mask.png"
    thin = np.zeros((64, 64), np.uint8)
    thin[:, 1] = 255  # a one-pixel crack in a column nearest downsampling to 8 px does not sample
    PILImage.fromarray(thin).save(mask_path)
    datamodule = MVTecAD(root=root, category="alpha", num_workers=0, image_size=8)
    datamodule.setup()
    with caplog.at_level(logging.WARNING, logger="zsad.data.dataset"):
        item = datamodule.test_data[0]
    assert bool(item.gt_label) and not item.gt_mask.any()
    assert "empty after the transforms (output 8x8)" in caplog.text
