"""Single-category datamodules (MVTec AD, VisA, Gogan): every file on disk is a sample, batches carry categories,
the model's Resize reaches the datasets, anomalib's config machinery accepts ``zsad.data.Gogan``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from anomalib.data import AnomalibDataModule
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Compose, Normalize, Resize

from zsad.data import Gogan, MVTecAD, Visa, ZSADBatch, batch_categories, clip_transform, make_gogan_like


def _setup(datamodule: AnomalibDataModule) -> AnomalibDataModule:
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule


def _assert_counts(datamodule: AnomalibDataModule, on_disk: dict[str, int]) -> None:
    assert len(datamodule.train_data) == on_disk["train"]
    assert len(datamodule.test_data) == on_disk["test"]
    assert int(datamodule.test_data.samples.label_index.sum()) == on_disk["test_anomalous"]


@pytest.mark.parametrize("category", ["alpha", "beta"])
def test_mvtec_counts_equal_files_on_disk(mvtec_like_root: Path, category: str, count_images) -> None:
    datamodule = _setup(MVTecAD(root=mvtec_like_root, category=category, num_workers=0))
    _assert_counts(datamodule, count_images(mvtec_like_root / category))
    assert datamodule.name == "mvtec"
    assert datamodule.category_names == [category]


@pytest.mark.parametrize("category", ["candle", "capsules"])
def test_visa_raw_download_is_converted_by_anomalib_and_counts_match(
    visa_like_root: Path, category: str, count_images
) -> None:
    datamodule = _setup(Visa(root=visa_like_root, category=category, num_workers=0))
    # The raw layout went through anomalib's own 1cls conversion: the prepared tree is what we read.
    prepared = visa_like_root / "visa_pytorch" / category
    assert prepared.is_dir()
    _assert_counts(datamodule, count_images(prepared))
    raw_anomalies = len(list((visa_like_root / category / "Data/Images/Anomaly").iterdir()))
    assert int(datamodule.test_data.samples.label_index.sum()) == raw_anomalies
    assert datamodule.name == "visa"


def test_visa_class_id_masks_are_binarised_nonzero(visa_like_root: Path) -> None:
    """Raw VisA masks hold class ids 1..K (they look black); every id must count as anomalous."""
    datamodule = _setup(Visa(root=visa_like_root, category="candle", num_workers=0))
    batch = next(iter(datamodule.test_dataloader()))
    anomalous = batch.gt_label.bool()
    assert anomalous.any()
    assert all(mask.any() for mask in batch.gt_mask[anomalous])
    assert not batch.gt_mask[~anomalous].any()


def test_visa_prepared_layout_is_read_directly(tmp_path: Path, count_images) -> None:
    from zsad.data import make_visa_like

    root = make_visa_like(tmp_path / "visa", layout="prepared", size=32)
    datamodule = _setup(Visa(root=root, category="capsules", num_workers=0))
    _assert_counts(datamodule, count_images(root / "visa_pytorch" / "capsules"))


@pytest.mark.parametrize("category", ["nunozumi", "tanizumi"])
def test_gogan_counts_equal_files_on_disk(gogan_like_root: Path, category: str, count_images) -> None:
    datamodule = _setup(Gogan(root=gogan_like_root, category=category, num_workers=0))
    _assert_counts(datamodule, count_images(gogan_like_root / category))
    defects = set(datamodule.test_data.samples.label) - {"good"}
    expected = {"crack_joint_opening", "spalling_missing", "efflorescence"} | (
        {"exudate"} if category == "nunozumi" else set()
    )
    assert defects == expected


def test_gogan_reads_jpeg_images(tmp_path: Path, count_images) -> None:
    root = make_gogan_like(tmp_path / "gogan", size=32, n_train=2, n_test_good=1, n_test_defect=1, image_format="jpg")
    datamodule = _setup(Gogan(root=root, category="nunozumi", num_workers=0, image_size=32))
    _assert_counts(datamodule, count_images(root / "nunozumi"))
    assert all(path.endswith(".jpg") for path in datamodule.test_data.samples.image_path)
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.gt_mask[batch.gt_label.bool()].flatten(1).any(1).all()


def test_batches_are_zsad_batches_with_categories_and_binary_masks(mvtec_like_root: Path) -> None:
    datamodule = _setup(
        MVTecAD(root=mvtec_like_root, category="beta", num_workers=0, image_size=128, eval_batch_size=64)
    )
    batch = next(iter(datamodule.test_dataloader()))
    assert isinstance(batch, ZSADBatch)
    assert batch.category == ["beta"] * len(batch.image)
    assert batch_categories(batch) == batch.category
    # Upsampled (nearest for masks), so even 1-pixel scratches survive and every defect mask stays non-empty.
    assert batch.image.shape[1:] == (3, 128, 128)
    assert batch.image.dtype == torch.float32 and 0.0 <= batch.image.min() and batch.image.max() <= 1.0
    assert batch.gt_mask.shape[1:] == (128, 128) and batch.gt_mask.dtype == torch.bool
    labels = batch.gt_label.bool()
    assert batch.gt_mask[labels].flatten(1).any(1).all(), "every anomalous image keeps a non-empty mask"
    assert not batch.gt_mask[~labels].any(), "normal images have all-zero masks"


def test_model_resize_reaches_the_datasets_through_anomalibs_mechanism(mvtec_like_root: Path) -> None:
    """anomalib copies trainer.model.pre_processor's Resize into the datasets; it wins over image_size."""
    datamodule = MVTecAD(root=mvtec_like_root, category="alpha", num_workers=0, image_size=40)
    datamodule.trainer = SimpleNamespace(
        model=SimpleNamespace(pre_processor=PreProcessor(transform=clip_transform(56)))
    )
    _setup(datamodule)
    transform = datamodule.test_data.augmentations
    assert isinstance(transform, Resize) and tuple(transform.size) == (56, 56)
    assert not any(isinstance(t, Normalize) for t in getattr(transform, "transforms", [transform]))
    item = datamodule.test_data[len(datamodule.test_data) - 1]
    assert item.image.shape == (3, 56, 56) and item.gt_mask.shape == (56, 56)
    assert item.image.min() >= 0.0 and item.image.max() <= 1.0, "normalisation is the model's job"
    assert set(item.gt_mask.unique().tolist()) <= {False, True}


def test_image_size_appends_a_bicubic_resize_after_user_augmentations(mvtec_like_root: Path) -> None:
    flip = torch.nn.Identity()  # any transform; Compose keeps it first
    datamodule = _setup(
        MVTecAD(root=mvtec_like_root, category="alpha", num_workers=0, image_size=24, augmentations=flip)
    )
    transform = datamodule.train_data.augmentations
    assert isinstance(transform, Compose)
    assert transform.transforms[0] is flip
    resize = transform.transforms[-1]
    assert isinstance(resize, Resize) and tuple(resize.size) == (24, 24)
    assert resize.interpolation.value == "bicubic" and resize.antialias


def test_without_resize_samples_keep_file_resolution(mvtec_like_root: Path) -> None:
    datamodule = _setup(MVTecAD(root=mvtec_like_root, category="alpha", num_workers=0))
    assert datamodule.test_data[0].image.shape == (3, 64, 64)


def test_gogan_is_accepted_by_anomalibs_config_machinery(gogan_like_root: Path, tmp_path: Path, count_images) -> None:
    """``anomalib ... --data zsad.data.Gogan`` resolves the class path the same way as from_config."""
    config = tmp_path / "gogan.yaml"
    config.write_text(
        f"class_path: zsad.data.Gogan\ninit_args:\n  root: {gogan_like_root}\n  category: tanizumi\n  num_workers: 0\n"
    )
    datamodule = AnomalibDataModule.from_config(config)
    assert isinstance(datamodule, Gogan) and datamodule.category == "tanizumi"
    _setup(datamodule)
    assert len(datamodule.test_data) == count_images(gogan_like_root / "tanizumi")["test"]


def test_a_batch_starting_with_a_normal_image_keeps_the_mask_paths_of_its_defects(tmp_path: Path) -> None:
    """anomalib collates only the first item's fields; native-resolution scoring still finds every defect's mask."""
    root = make_gogan_like(tmp_path, categories=("nunozumi",), n_train=1, n_test_good=3, n_test_defect=1, size=32)
    datamodule = _setup(Gogan(root=root, category="nunozumi", eval_batch_size=4, num_workers=0))
    batches = list(datamodule.test_dataloader())
    # Sorted paths: 3 defect folders, good/000 | good/001, good/002, spalling_missing/000.
    assert not bool(batches[1].gt_label[0]) and bool(batches[1].gt_label[-1])
    for batch in batches:
        for path, label in zip(batch.mask_path, batch.gt_label, strict=True):
            assert (Path(path).is_file() and path.endswith("_mask.png")) if bool(label) else path == "None"
