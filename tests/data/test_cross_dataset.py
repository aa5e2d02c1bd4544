"""Multi-category protocols: cross-dataset (train on A's labelled test split, test on B's) and unified one-class."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from jsonargparse import ArgumentParser

from zsad.data import CrossDataset, UnifiedDataset, ZSADBatch, make_mvtec_like


def _categories_of(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "test").is_dir())


def test_cross_dataset_trains_on_a_test_split_and_tests_on_b(mvtec_like_root, visa_like_root, count_images) -> None:
    datamodule = CrossDataset(
        train={"dataset": "visa", "root": str(visa_like_root)},
        test={"dataset": "mvtec", "root": str(mvtec_like_root)},
        train_batch_size=64,
    )
    datamodule.setup()
    visa_categories = ["candle", "capsules"]
    assert datamodule.train_category_names == visa_categories
    assert datamodule.category_names == _categories_of(mvtec_like_root)
    assert datamodule.name == "mvtec"

    # The training pool is A's *test* split of every category: normal and anomalous images, with masks.
    visa_prepared = visa_like_root / "visa_pytorch"
    assert len(datamodule.train_data) == sum(count_images(visa_prepared / c)["test"] for c in visa_categories)
    assert set(datamodule.train_data.samples.split) == {"test"}
    batch = next(iter(datamodule.train_dataloader()))
    assert isinstance(batch, ZSADBatch)
    assert set(batch.category) == set(visa_categories)
    labels = batch.gt_label.bool()
    assert labels.any() and (~labels).any()
    assert batch.gt_mask[labels].flatten(1).any(1).all()
    assert not batch.gt_mask[~labels].any()

    # The test set is all of B's test split, per category.
    test_samples = datamodule.test_data.samples
    for category in datamodule.category_names:
        assert (test_samples.category == category).sum() == count_images(mvtec_like_root / category)["test"]
    test_batch = next(iter(datamodule.test_dataloader()))
    assert set(test_batch.category) <= set(datamodule.category_names)


def test_cross_dataset_from_yaml_block_with_gogan_as_target(mvtec_like_root, gogan_like_root) -> None:
    """The documented YAML block parses (LightningCLI uses jsonargparse) and any pair works, Gogan included."""
    parser = ArgumentParser()
    parser.add_class_arguments(CrossDataset, "data")
    config = parser.parse_string(
        f"data:\n  train: {{dataset: mvtec, root: {mvtec_like_root}}}\n"
        f"  test: {{dataset: gogan, root: {gogan_like_root}, categories: [tanizumi]}}\n  image_size: 32\n"
    )
    datamodule = parser.instantiate_classes(config).data
    datamodule.setup()
    assert datamodule.name == "gogan"
    assert datamodule.category_names == ["tanizumi"]
    assert set(datamodule.test_data.samples.category) == {"tanizumi"}
    assert set(datamodule.train_data.samples.category) == {"alpha", "beta"}


def test_folder_dataset_takes_its_name_from_the_config(mvtec_like_root, mvtec_like_root_b) -> None:
    datamodule = CrossDataset(
        train={"dataset": "mvtec", "root": mvtec_like_root},
        test={"dataset": "folder", "root": mvtec_like_root_b, "name": "lab_parts"},
    )
    assert datamodule.name == "lab_parts"
    datamodule.setup()
    assert datamodule.test_data.name == "lab_parts"


def test_validation_is_off_by_default_and_available_on_request(mvtec_like_root, mvtec_like_root_b) -> None:
    source = {"dataset": "mvtec", "root": mvtec_like_root}
    target = {"dataset": "mvtec", "root": mvtec_like_root_b}

    default = CrossDataset(train=source, test=target)
    default.setup()
    assert default.val_dataloader() == []

    held_out = CrossDataset(train=source, test=target, val_split_mode="from_train", val_split_ratio=0.25)
    held_out.setup()
    pool = len(held_out.train_data) + len(held_out.val_data)
    assert pool == len(default.train_data)
    assert set(held_out.val_data.samples.label_index) == {0, 1}, "label-aware: both classes held out"
    assert not set(held_out.val_data.samples.image_path) & set(held_out.train_data.samples.image_path)

    monitored = CrossDataset(train=source, test=target, val_split_mode="same_as_test")
    monitored.setup()
    assert list(monitored.val_data.samples.image_path) == list(monitored.test_data.samples.image_path)

    with pytest.raises(ValueError, match="from_test"):
        CrossDataset(train=source, test=target, val_split_mode="from_test")


def test_cross_dataset_fits_with_a_plain_trainer_and_reseeds_every_epoch(mvtec_like_root, mvtec_like_root_b) -> None:
    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)
            self.orders: dict[int, list[str]] = {}

        def training_step(self, batch: ZSADBatch, _: int) -> torch.Tensor:
            self.orders.setdefault(self.current_epoch, []).extend(batch.image_path)
            return self.layer(batch.image.mean((2, 3))).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def run() -> tuple[dict[int, list[str]], int]:
        datamodule = CrossDataset(
            train={"dataset": "mvtec", "root": mvtec_like_root},
            test={"dataset": "mvtec", "root": mvtec_like_root_b},
            image_size=16,
            train_batch_size=64,
            seed=5,
        )
        module = Recorder()
        trainer = L.Trainer(
            max_epochs=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, datamodule=datamodule)
        return module.orders, datamodule.train_data.epoch

    orders, last_epoch = run()
    assert last_epoch == 1, "Lightning's set_epoch reached the dataset"
    assert orders[0] != orders[1], "a new order every epoch"
    assert sorted(orders[0]) == sorted(orders[1])
    assert run()[0] == orders, "the same seed gives the same orders"


def test_mosaic_tiles_four_same_category_images(tmp_path: Path) -> None:
    root = make_mvtec_like(tmp_path / "m", n_train=1, n_test_good=2, n_test_defect=1, size=16)
    datamodule = CrossDataset(
        train={"dataset": "mvtec", "root": root}, test={"dataset": "mvtec", "root": root}, mosaic_probability=1.0
    )
    datamodule.setup()
    dataset = datamodule.train_data
    for index in range(len(dataset)):
        item = dataset[index]
        assert item.image.shape == (3, 32, 32), "2x2 tiles of 16 px, before any resize"
        assert item.gt_mask.shape == (32, 32)
        # The indexed sample's label is kept (APRIL-GAN); the tiles come from its category only.
        assert int(item.gt_label) == int(dataset.samples.label_index[index])
    tiles = {tuple(dataset.load(i)[0][:, 0, 0].tolist()): dataset.samples.category[i] for i in range(len(dataset))}
    item = dataset[0]
    corners = [item.image[:, 0, 0], item.image[:, 0, 16], item.image[:, 16, 0], item.image[:, 16, 16]]
    assert {tiles[tuple(c.tolist())] for c in corners} == {dataset.samples.category[0]}


def test_unified_protocol_fits_on_normal_train_images_of_all_categories(gogan_like_root, count_images) -> None:
    datamodule = UnifiedDataset(dataset="gogan", root=gogan_like_root, image_size=32)
    datamodule.setup()
    categories = ["nunozumi", "tanizumi"]
    assert datamodule.category_names == categories and datamodule.name == "gogan"
    assert len(datamodule.train_data) == sum(count_images(gogan_like_root / c)["train"] for c in categories)
    assert set(datamodule.train_data.samples.label_index) == {0}
    assert len(datamodule.test_data) == sum(count_images(gogan_like_root / c)["test"] for c in categories)
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch.category) == set(categories) and not batch.gt_label.any()


def test_unknown_dataset_and_keys_are_rejected(mvtec_like_root) -> None:
    with pytest.raises(ValueError, match="Unknown dataset 'mvtecc'"):
        CrossDataset(train={"dataset": "mvtecc", "root": mvtec_like_root}, test={"dataset": "mvtec", "root": "."})
    with pytest.raises(ValueError, match="unknown key"):
        CrossDataset(train={"dataset": "mvtec", "roots": mvtec_like_root}, test={"dataset": "mvtec", "root": "."})


def test_validation_keys_name_the_dataset_validated_on(mvtec_like_root, visa_like_root) -> None:
    """Held out of the source pool → `val/visa/...`; validated on the target → `val/mvtec/...`; tests always B."""
    from types import SimpleNamespace

    from zsad.metrics.evaluator import dataset_name

    held_out = CrossDataset(train={"dataset": "visa", "root": str(visa_like_root)},
                            test={"dataset": "mvtec", "root": str(mvtec_like_root)}, val_split_mode="from_train")
    on_target = CrossDataset(train={"dataset": "visa", "root": str(visa_like_root)},
                             test={"dataset": "mvtec", "root": str(mvtec_like_root)}, val_split_mode="same_as_test")
    assert dataset_name(SimpleNamespace(datamodule=held_out), "val") == "visa"
    assert dataset_name(SimpleNamespace(datamodule=held_out), "test") == "mvtec"
    assert dataset_name(SimpleNamespace(datamodule=on_target), "val") == "mvtec"


def test_training_references_come_from_the_source_train_split(mvtec_like_root, visa_like_root) -> None:
    import pytest

    datamodule = CrossDataset(train={"dataset": "visa", "root": str(visa_like_root)},
                              test={"dataset": "mvtec", "root": str(mvtec_like_root)})
    datamodule.setup()
    first = datamodule.training_references("candle", 2, seed=5)
    again = datamodule.training_references("candle", 2, seed=5)
    assert first.image_path == again.image_path and len(first.image_path) == 2
    assert all("/candle/train/good/" in p.replace("\\", "/") for p in first.image_path)
    assert first.category == ["candle", "candle"] and not first.gt_label.any()
    with pytest.raises(ValueError, match="training category"):
        datamodule.training_references("alpha", 1, seed=0)  # a target category, not a source one
