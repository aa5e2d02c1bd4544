"""Perlin synthetic anomalies (CLIP-ADA): masks are exactly the changed pixels, draws are seeded."""

from __future__ import annotations

import copy

import pytest
import torch

from zsad.data import PerlinAnomalies, UnifiedDataset


def test_mask_is_exactly_the_changed_pixels_and_label_follows_it() -> None:
    synth = PerlinAnomalies(probability=1.0)
    clean = torch.rand(3, 48, 48)
    labels = []
    for seed in range(12):
        image, mask, label = synth(clean, seed=seed)
        changed = (image != clean).any(dim=0)
        assert torch.equal(changed, mask.bool()), f"seed {seed}"
        assert label == int(changed.any())
        assert image.min() >= 0.0 and image.max() <= 1.0
        labels.append(label)
    assert sum(labels) >= 10, "probability 1.0 inserts an anomaly (anomalib retries empty masks)"


def test_draws_are_deterministic_for_a_seed_and_leave_the_input_alone() -> None:
    synth = PerlinAnomalies(probability=1.0)
    clean = torch.rand(3, 32, 32)
    before = clean.clone()
    first, mask_first, _ = synth(clean, seed=7)
    second, mask_second, _ = PerlinAnomalies(probability=1.0)(clean, seed=7)
    assert torch.equal(first, second) and torch.equal(mask_first, mask_second)
    assert torch.equal(clean, before)
    other, _, _ = synth(clean, seed=8)
    assert not torch.equal(first, other)


def test_probability_zero_never_changes_an_image() -> None:
    synth = PerlinAnomalies(probability=0.0)
    clean = torch.rand(3, 16, 16)
    for seed in range(5):
        image, mask, label = synth(clean, seed=seed)
        assert torch.equal(image, clean) and not mask.any() and label == 0


def test_invalid_arguments_are_rejected(tmp_path) -> None:
    with pytest.raises(ValueError, match="probability"):
        PerlinAnomalies(probability=1.5)
    with pytest.raises(FileNotFoundError, match="anomaly_source_path"):
        PerlinAnomalies(anomaly_source_path=tmp_path / "no_dtd_here")


def test_unified_training_samples_get_exact_synthetic_anomalies(gogan_like_root) -> None:
    datamodule = UnifiedDataset(dataset="gogan", root=gogan_like_root, image_size=32, synthetic_anomalies=True, seed=3)
    datamodule.setup()
    dataset = datamodule.train_data
    clean_dataset = copy.copy(dataset)
    clean_dataset.anomalies = None  # same seed, same augmentations: the image before synthesis
    labels = []
    for index in range(len(dataset)):
        item, clean = dataset[index], clean_dataset[index]
        assert torch.equal((item.image != clean.image).any(0), item.gt_mask), "mask == changed pixels"
        assert int(item.gt_label) == int(item.gt_mask.any())
        assert item.category == clean.category
        labels.append(int(item.gt_label))
        again = dataset[index]
        assert torch.equal(again.image, item.image), "deterministic for (seed, epoch, index)"
    assert 0 < sum(labels) < len(labels), "about half of the samples get an anomaly (probability 0.5)"
    # A new epoch draws new anomalies for the same index.
    dataset.set_epoch(1)
    epoch_1 = [dataset[i].gt_mask for i in range(len(dataset))]
    dataset.set_epoch(0)
    epoch_0 = [dataset[i].gt_mask for i in range(len(dataset))]
    assert any(not torch.equal(a, b) for a, b in zip(epoch_0, epoch_1, strict=True))
    # The test split never gets synthetic anomalies.
    assert datamodule.test_data.anomalies is None
