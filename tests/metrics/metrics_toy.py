"""A tiny deterministic "method" and dataset for exercising the evaluator with a plain Lightning Trainer.

The dataset stores the answer in the image: channel 0 is the anomaly map, channel 1 is filled with the image score.
The toy model copies them into ``anomaly_map`` / ``pred_score``, so every process (DDP ranks included) produces the
same outputs, and the expected metrics can be computed straight from the dataset with the functional API.
"""

from __future__ import annotations

from typing import Any

import lightning
import numpy as np
import torch
from anomalib import LearningType
from anomalib.models import AnomalibModule
from torch.utils.data import DataLoader, Dataset

from zsad.data.dataclasses import ZSADBatch, ZSADItem
from zsad.metrics import ZSADEvaluator

CATEGORIES = ("bottle", "cable", "screw")


def make_sample(index: int, n: int, size: int) -> dict[str, Any]:
    """Deterministic sample ``index``: category by index, every third image good, maps with ties."""
    rng = np.random.default_rng(1000 + index)
    category = CATEGORIES[index % len(CATEGORIES)]
    anomalous = (index // len(CATEGORIES)) % 3 != 0  # each category: one good image in three
    mask = np.zeros((size, size), dtype=bool)
    if anomalous:
        for _ in range(rng.integers(1, 3)):
            r, c = rng.integers(0, size - 5, 2)
            h, w = rng.integers(1, 6, 2)
            mask[r : r + h, c : c + w] = True
    amap = np.round((rng.random((size, size)) + 0.5 * mask) * 16) / 16  # quantised: ties within and across images
    score = float(np.round(mask.mean() * 20 + rng.normal(0, 0.6), 1))  # informative but imperfect, ties
    defect = "scratch" if anomalous else "good"
    return {
        "category": category,
        "map": amap.astype(np.float32),
        "mask": mask,
        "label": int(anomalous),
        "score": np.float32(score),
        "path": f"/toy/{category}/test/{defect}/{index:03d}.png",
    }


class ToyDataset(Dataset):
    """``n`` samples of ``size`` x ``size`` over three categories."""

    def __init__(self, n: int = 25, size: int = 24) -> None:
        self.samples = [make_sample(i, n, size) for i in range(n)]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> ZSADItem:
        s = self.samples[index]
        image = torch.zeros(3, *s["map"].shape)
        image[0] = torch.from_numpy(s["map"])
        image[1] = float(s["score"])
        return ZSADItem(
            image=image,
            gt_label=torch.tensor(s["label"]),
            gt_mask=torch.from_numpy(s["mask"]),
            image_path=s["path"],
            category=s["category"],
        )


class ToyDataModule(lightning.LightningDataModule):
    """Test loader over :class:`ToyDataset`; ``name`` gives the dataset part of the logged keys."""

    name = "toy"

    def __init__(self, n: int = 25, size: int = 24, batch_size: int = 4) -> None:
        super().__init__()
        self.dataset = ToyDataset(n, size)
        self.batch_size = batch_size

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=ZSADBatch.collate)

    def val_dataloader(self) -> DataLoader:
        return self.test_dataloader()


class ToyModel(AnomalibModule):
    """Copies the answer out of the image, like a method filling ``pred_score`` / ``anomaly_map`` in place."""

    def __init__(self, evaluator: ZSADEvaluator) -> None:
        super().__init__(pre_processor=False, post_processor=False, evaluator=evaluator, visualizer=False)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # Lightning wants a parameter for DDP

    @property
    def learning_type(self) -> LearningType:
        return LearningType.ZERO_SHOT

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        return {}

    def _score(self, batch: ZSADBatch) -> ZSADBatch:
        batch.update(anomaly_map=batch.image[:, 0].clone(), pred_score=batch.image[:, 1].mean(dim=(1, 2)))
        return batch

    def validation_step(self, batch: ZSADBatch, batch_idx: int) -> ZSADBatch:
        return self._score(batch)

    def test_step(self, batch: ZSADBatch, batch_idx: int) -> ZSADBatch:
        return self._score(batch)


def expected_metrics(dataset: ToyDataset, report_pro_repo: bool = False) -> dict[str, dict[str, float]]:
    """Per-category metrics straight from the functional API (the independent path the evaluator must match)."""
    from zsad.metrics import functional as F

    out = {}
    for category in sorted({s["category"] for s in dataset.samples}):
        samples = [s for s in dataset.samples if s["category"] == category]
        row = F.image_metrics(np.array([s["score"] for s in samples]), np.array([s["label"] for s in samples]))
        row.update(
            F.pixel_metrics(
                np.stack([s["map"] for s in samples]),
                np.stack([s["mask"] for s in samples]),
                report_pro_repo=report_pro_repo,
            )
        )
        out[category] = row
    return out


def run_test(
    evaluator: ZSADEvaluator,
    root: str,
    n: int = 25,
    size: int = 24,
    batch_size: int = 4,
    **trainer_kwargs: Any,
) -> list[dict[str, float]]:
    """``Trainer.test`` of the toy model with ``evaluator``; returns Lightning's logged metrics."""
    trainer_kwargs = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": root,
        **trainer_kwargs,
    }
    trainer = lightning.Trainer(**trainer_kwargs)
    return trainer.test(ToyModel(evaluator), datamodule=ToyDataModule(n, size, batch_size), verbose=False)


def toy_batch(indices: list[int], with_masks: bool = True, n: int = 25) -> ZSADBatch:
    """Samples ``indices`` of the toy dataset collated and scored, as the evaluator receives them."""
    dataset = ToyDataset(n)
    batch = ZSADBatch.collate([dataset[i] for i in indices])
    batch.update(anomaly_map=batch.image[:, 0].clone(), pred_score=batch.image[:, 1].mean(dim=(1, 2)))
    if not with_masks:
        batch.gt_mask = None
    return batch
