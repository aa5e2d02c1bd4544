"""Few-shot references: k normal training images of a category, deterministic for a seed, resized, not normalised."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from anomalib.data import MVTecAD as AnomalibMVTecAD
from anomalib.pre_processing import PreProcessor

from zsad.data import CrossDataset, Gogan, clip_transform, few_shot_references, make_mvtec_like, read_image


@pytest.fixture(scope="module")
def eight_train_images(tmp_path_factory) -> Path:
    return make_mvtec_like(
        tmp_path_factory.mktemp("fewshot"), n_train=8, n_test_good=1, n_test_defect=1, size=32, defects=("spot",)
    )


def _cross(root: Path, target: Path, **kwargs) -> CrossDataset:
    return CrossDataset(train={"dataset": "mvtec", "root": root}, test={"dataset": "mvtec", "root": target}, **kwargs)


def test_references_are_deterministic_for_a_seed(eight_train_images: Path) -> None:
    datamodule = _cross(eight_train_images, eight_train_images, image_size=24)
    first = datamodule.few_shot_references("alpha", k=3, seed=10)
    again = _cross(eight_train_images, eight_train_images, image_size=24).few_shot_references("alpha", k=3, seed=10)
    assert first.image_path == again.image_path
    assert torch.equal(first.image, again.image)
    other = datamodule.few_shot_references("alpha", k=3, seed=20)
    assert other.image_path != first.image_path


def test_references_are_normal_train_images_resized_not_normalised(eight_train_images: Path) -> None:
    datamodule = _cross(eight_train_images, eight_train_images, image_size=24)
    batch = datamodule.few_shot_references("beta", k=4, seed=0)
    assert batch.image.shape == (4, 3, 24, 24)
    assert batch.category == ["beta"] * 4
    assert not batch.gt_label.any() and not batch.gt_mask.any()
    assert all("/beta/train/good/" in path for path in batch.image_path)
    assert len(set(batch.image_path)) == 4
    # Not normalised: values stay in [0, 1] and the mean brightness is the file's (CLIP normalisation would shift it).
    assert 0.0 <= batch.image.min() and batch.image.max() <= 1.0
    native = read_image(batch.image_path[0])
    assert torch.allclose(batch.image[0].mean(), native.mean(), atol=0.02)


def test_references_follow_the_models_resize(eight_train_images: Path) -> None:
    datamodule = _cross(eight_train_images, eight_train_images, image_size=24)
    datamodule.trainer = SimpleNamespace(
        model=SimpleNamespace(pre_processor=PreProcessor(transform=clip_transform(40)))
    )
    assert datamodule.few_shot_references("alpha", k=2, seed=0).image.shape == (2, 3, 40, 40)


def test_too_few_normal_images_and_unknown_category_are_clear_errors(eight_train_images: Path) -> None:
    datamodule = _cross(eight_train_images, eight_train_images)
    with pytest.raises(ValueError, match=r"'alpha' has 8 normal training image\(s\).*fewer than the k=9"):
        datamodule.few_shot_references("alpha", k=9, seed=0)
    with pytest.raises(ValueError, match="Unknown category 'gamma'"):
        datamodule.few_shot_references("gamma", k=1, seed=0)


def test_references_come_from_the_target_dataset_in_cross_dataset(mvtec_like_root, mvtec_like_root_b) -> None:
    datamodule = _cross(mvtec_like_root, mvtec_like_root_b)
    batch = datamodule.few_shot_references("alpha", k=2, seed=0)
    assert all(path.startswith(str(mvtec_like_root_b.resolve())) for path in batch.image_path)


def test_single_category_datamodules_reach_references_too(gogan_like_root: Path, mvtec_like_root: Path) -> None:
    gogan = Gogan(root=gogan_like_root, category="tanizumi", num_workers=0, image_size=32)
    assert few_shot_references(gogan, k=2, seed=1).image_path == gogan.few_shot_references("tanizumi", 2, 1).image_path
    # A plain anomalib datamodule (no zsad in it) works once set up.
    plain = AnomalibMVTecAD(root=mvtec_like_root, category="beta", num_workers=0)
    plain.setup()
    batch = few_shot_references(plain, k=3, seed=0)
    assert batch.category == ["beta"] * 3 and not batch.gt_label.any()
    assert batch.image_path == few_shot_references(plain, k=3, seed=0).image_path
