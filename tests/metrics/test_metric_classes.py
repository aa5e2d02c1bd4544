"""torchmetrics classes: batched updates give the functional values; sync works on a rank without data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from metrics_refs import reference_aupro, synthetic_maps
from sklearn.metrics import roc_auc_score

from zsad.metrics import ExactAUPRO, ExactAUROC, ExactAveragePrecision, ExactF1Max, ProRepo
from zsad.metrics import functional as F


def test_binary_metrics_accumulate_batches() -> None:
    rng = np.random.default_rng(0)
    scores = (rng.integers(0, 20, 400) / 7).astype(np.float32)
    labels = rng.random(400) < 0.3
    metrics = [ExactAUROC(), ExactAveragePrecision(), ExactF1Max()]
    for start in range(0, 400, 64):
        for metric in metrics:
            metric.update(torch.from_numpy(scores[start : start + 64]), torch.from_numpy(labels[start : start + 64]))
    auroc, ap, f1 = (float(m.compute()) for m in metrics)
    assert auroc == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert ap == pytest.approx(F.average_precision(scores, labels), abs=1e-12)
    assert f1 == pytest.approx(F.f1_max(scores, labels), abs=1e-12)


def test_map_metrics_accept_batches_of_different_sizes() -> None:
    maps_a, masks_a = synthetic_maps(seed=1, n=3, size=16)
    maps_b, masks_b = synthetic_maps(seed=2, n=2, size=12)
    aupro, pro = ExactAUPRO(), ProRepo()
    for metric in (aupro, pro):
        metric.update(torch.from_numpy(maps_a), torch.from_numpy(masks_a))
        metric.update(torch.from_numpy(maps_b)[:, None], torch.from_numpy(masks_b)[:, None])  # (B, 1, H, W) too
    maps, masks = list(maps_a) + list(maps_b), list(masks_a) + list(masks_b)
    assert float(aupro.compute()) == pytest.approx(reference_aupro(maps, masks, 0.3), abs=1e-6)
    assert float(pro.compute()) == pytest.approx(F.PixelScores.from_maps(maps, masks).pro_repo(), abs=1e-12)


def test_empty_state_gets_a_typed_placeholder_before_sync() -> None:
    """A rank that saw no data must still send int64/uint8 tensors of the right rank to all_gather."""
    metric = ExactAUPRO()
    metric.sync(distributed_available=lambda: False)
    assert metric.shapes[0].shape == (0, 2) and metric.shapes[0].dtype == torch.int64
    assert metric.masks[0].dtype == torch.uint8
