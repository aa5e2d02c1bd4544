"""The exact metrics against independent references: scikit-learn, and AU-PRO / repository PRO written out naively."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from metrics_refs import reference_aupro, reference_cal_pro_score, sklearn_f1_max, synthetic_maps, tied_scores
from sklearn.metrics import average_precision_score, roc_auc_score

from zsad.metrics import functional as F
from zsad.metrics.functional import UndefinedMetricWarning

TOL = 1e-6


# --------------------------------------------------------------------------------------------------------------------
# Binary metrics vs scikit-learn
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_binary_metrics_equal_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(10, 3000))
    scores = tied_scores(rng, n, levels=int(rng.integers(2, 40)))
    labels = rng.random(n) < rng.uniform(0.05, 0.9)
    labels[:2] = [True, False]

    assert F.auroc(torch.from_numpy(scores), torch.from_numpy(labels)) == pytest.approx(
        roc_auc_score(labels, scores), abs=TOL
    )
    assert F.average_precision(scores, labels.astype(np.int64)) == pytest.approx(
        average_precision_score(labels, scores), abs=TOL
    )
    assert F.f1_max(scores, labels) == pytest.approx(sklearn_f1_max(labels, scores), abs=TOL)


def test_pixel_metrics_equal_sklearn_on_flattened_maps() -> None:
    maps, masks = synthetic_maps(seed=3, n=8, size=24)
    out = F.pixel_metrics(torch.from_numpy(maps), torch.from_numpy(masks))
    flat_scores, flat_labels = maps.ravel(), masks.ravel()
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(flat_labels, flat_scores), abs=TOL)
    assert out["pixel_ap"] == pytest.approx(average_precision_score(flat_labels, flat_scores), abs=TOL)
    assert out["pixel_f1max"] == pytest.approx(sklearn_f1_max(flat_labels, flat_scores), abs=TOL)
    assert out["pixel_aupro"] == pytest.approx(reference_aupro(maps, masks, 0.3), abs=TOL)


def test_scores_are_never_squashed() -> None:
    """Unbounded scores (distances, summed maps) must not pass through a sigmoid: 50 vs 51 are distinct scores."""
    scores = torch.tensor([50.0, 51.0, 52.0, 53.0, 400.0])
    labels = torch.tensor([0, 0, 1, 1, 1])
    assert F.auroc(scores, labels) == 1.0
    assert F.average_precision(-scores, labels) == pytest.approx(average_precision_score(labels, -scores.numpy()))


def test_f1_max_threshold_reproduces_the_f1() -> None:
    rng = np.random.default_rng(0)
    scores = tied_scores(rng, 500, levels=9)
    labels = rng.random(500) < 0.3
    best, threshold = F.f1_max_threshold(scores, labels)
    predicted = scores >= threshold
    tp = np.sum(predicted & labels)
    assert 2 * tp / (predicted.sum() + labels.sum()) == pytest.approx(best)


# --------------------------------------------------------------------------------------------------------------------
# AU-PRO vs the per-threshold official definition
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "levels", "limit"),
    [(0, 12, 0.3), (1, 5, 0.3), (2, None, 0.3), (3, 30, 0.05), (4, None, 1.0), (5, 3, 0.3)],
)
def test_aupro_equals_official_definition(seed: int, levels: int | None, limit: float) -> None:
    maps, masks = synthetic_maps(seed, levels=levels)
    assert F.aupro(torch.from_numpy(maps), torch.from_numpy(masks), fpr_limit=limit) == pytest.approx(
        reference_aupro(maps, masks, limit), abs=TOL
    )


def test_aupro_accepts_maps_of_different_sizes() -> None:
    maps_a, masks_a = synthetic_maps(seed=7, n=3, size=16)
    maps_b, masks_b = synthetic_maps(seed=8, n=3, size=12)
    maps, masks = list(maps_a) + list(maps_b), list(masks_a) + list(masks_b)
    assert F.aupro(maps, masks) == pytest.approx(reference_aupro(maps, masks, 0.3), abs=TOL)


def test_aupro_when_the_limit_falls_exactly_on_a_curve_point() -> None:
    """10 normal pixels with distinct scores: FPR = 3/10 is a curve point, so nothing is interpolated there."""
    maps = np.zeros((1, 4, 4), dtype=np.float32)
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, :2, :3] = True  # 6 anomalous pixels, one region
    maps[0, :2, :3] = np.array([[0.95, 0.5, 0.45], [0.35, 0.25, 0.05]])
    maps[0, ~masks[0]] = np.linspace(0.1, 1.0, 10)
    fpr_limit = 3 / 10
    assert fpr_limit == 0.3
    assert F.aupro(maps, masks, fpr_limit) == pytest.approx(reference_aupro(maps, masks, fpr_limit), abs=TOL)


def test_aupro_is_region_macro_averaged() -> None:
    """A tiny missed scratch weighs as much as a large found stain: PRO = (1 + 0) / 2 at every useful threshold."""
    maps = np.zeros((1, 40, 40), dtype=np.float32)
    masks = np.zeros((1, 40, 40), dtype=bool)
    masks[0, 5:35, 5:25] = True  # 600-pixel stain, found
    maps[0, 5:35, 5:25] = 1.0
    masks[0, 2, 30:33] = True  # 3-pixel scratch, missed (score 0 like the background)
    # Curve (0,0) -> (0,0.5) -> (1,1): mean height on [0, 0.3] = (0.5 * 0.3 + 0.5 * 0.3**2 / 2) / 0.3 = 0.575.
    # Pixel-weighted overlap would give ~600/603 instead.
    assert F.aupro(maps, masks) == pytest.approx(0.575, abs=TOL)
    assert F.aupro(maps, masks) == pytest.approx(reference_aupro(maps, masks, 0.3), abs=TOL)


# --------------------------------------------------------------------------------------------------------------------
# The repositories' PRO
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "levels"), [(0, None), (1, 40)])
def test_pro_repo_equals_anomalyclip_cal_pro_score(seed: int, levels: int | None) -> None:
    maps, masks = synthetic_maps(seed, n=5, size=16, levels=levels)
    expected = reference_cal_pro_score(masks.astype(np.int64), maps)
    assert F.pro_repo(torch.from_numpy(maps), torch.from_numpy(masks)) == pytest.approx(expected, abs=TOL)


# --------------------------------------------------------------------------------------------------------------------
# Degenerate inputs
# --------------------------------------------------------------------------------------------------------------------


def test_no_anomalies_gives_nan_with_warning() -> None:
    scores = np.array([0.1, 0.5, 0.2], dtype=np.float32)
    labels = np.zeros(3, dtype=bool)
    for fn in (F.auroc, F.average_precision, F.f1_max):
        with pytest.warns(UndefinedMetricWarning):
            assert math.isnan(fn(scores, labels))
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(F.aupro(np.random.rand(2, 5, 5), np.zeros((2, 5, 5), dtype=bool)))


def test_all_anomalous_gives_defined_precision_metrics() -> None:
    scores = np.array([0.1, 0.5, 0.2], dtype=np.float32)
    labels = np.ones(3, dtype=bool)
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(F.auroc(scores, labels))
    assert F.average_precision(scores, labels) == 1.0
    assert F.f1_max(scores, labels) == 1.0
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(F.aupro(np.random.rand(1, 4, 4), np.ones((1, 4, 4), dtype=bool)))


def test_constant_scores() -> None:
    labels = np.array([0, 0, 0, 1], dtype=bool)
    scores = np.full(4, 0.7, dtype=np.float32)
    assert F.auroc(scores, labels) == 0.5
    assert F.average_precision(scores, labels) == pytest.approx(0.25)
    assert F.f1_max(scores, labels) == pytest.approx(2 * 0.25 / 1.25)
    maps = np.full((2, 6, 6), 0.3, dtype=np.float32)
    masks = np.zeros((2, 6, 6), dtype=bool)
    masks[1, :2, :2] = True
    # A single threshold: the curve is the diagonal (0,0)-(1,1), whose mean height on [0, 0.3] is 0.15.
    assert F.aupro(maps, masks) == pytest.approx(0.15)
    assert F.aupro(maps, masks) == pytest.approx(reference_aupro(maps, masks, 0.3))
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(F.pro_repo(maps, masks))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_scores_raise(bad: float) -> None:
    maps = np.random.rand(2, 4, 4).astype(np.float32)
    maps[1, 2, 2] = bad
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[1, 1, 1] = True
    with pytest.raises(ValueError, match="NaN or infinite"):
        F.aupro(maps, masks)
    with pytest.raises(ValueError, match="NaN or infinite"):
        F.auroc(maps, masks)


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="binary"):
        F.auroc(np.random.rand(4), np.array([0, 255, 0, 255]))
    with pytest.raises(ValueError, match="differ in size"):
        F.auroc(np.random.rand(4), np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="empty"):
        F.auroc(np.array([]), np.array([], dtype=bool))
    with pytest.raises(ValueError, match="fpr_limit"):
        F.aupro(np.random.rand(1, 4, 4), np.ones((1, 4, 4), dtype=bool), fpr_limit=0.0)
    with pytest.raises(ValueError, match="H x W"):
        F.aupro(np.random.rand(1, 4, 4), np.ones((1, 4, 5), dtype=bool))


def test_half_precision_maps_are_evaluated_as_float32() -> None:
    maps, masks = synthetic_maps(seed=5)
    half = torch.from_numpy(maps).to(torch.bfloat16)
    assert F.aupro(half, torch.from_numpy(masks)) == pytest.approx(
        reference_aupro(half.float().numpy(), masks, 0.3), abs=TOL
    )


def test_curves_are_exact_points() -> None:
    maps, masks = synthetic_maps(seed=2, levels=None)
    pixels = F.PixelScores.from_maps(maps, masks)
    fpr, tpr = pixels.scores.roc_curve(max_points=64)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # The plotted points lie on the exact curve, so their trapezoid is close to the exact area.
    assert np.trapezoid(tpr, fpr) == pytest.approx(pixels.scores.auroc(), abs=0.02)
    fpr, pro = pixels.pro_curve(max_points=400)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-12)
    keep = fpr <= 0.3
    assert np.trapezoid(pro[keep], fpr[keep]) / fpr[keep][-1] == pytest.approx(pixels.aupro(), abs=0.02)
