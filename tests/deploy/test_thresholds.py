"""Calibrated thresholds and regions: exact FPR on the calibration scores, F1-max, connected components."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from zsad.deploy.calibrate import compute_thresholds
from zsad.deploy.thresholds import Thresholds, threshold_at_fpr
from zsad.deploy.writer import connected_regions


@pytest.mark.parametrize("target_fpr", [0.0, 0.01, 0.1, 0.25, 0.5])
def test_threshold_at_fpr_flags_exactly_the_target_share_of_distinct_scores(target_fpr: float) -> None:
    scores = np.random.default_rng(0).random(400).astype(np.float32)
    threshold = threshold_at_fpr(scores, target_fpr)
    flagged = int((scores >= np.float32(threshold)).sum())
    assert flagged == math.floor(target_fpr * 400)
    # and it is the smallest such threshold: the next lower score would be flagged too
    assert (scores >= np.float32(threshold)).sum() < (scores >= np.sort(scores)[::-1][flagged]).sum()


def test_threshold_at_fpr_never_exceeds_the_target_with_ties() -> None:
    scores = np.array([0.1] * 5 + [0.9] * 5, dtype=np.float32)
    assert (scores >= threshold_at_fpr(scores, 0.3)).mean() == 0.0  # 0.9 ties: flagging them all would be 50 %
    assert (scores >= threshold_at_fpr(scores, 0.5)).mean() == 0.5


def test_target_fpr_calibration_uses_only_the_normal_images_of_labelled_data() -> None:
    rng = np.random.default_rng(1)
    scores = np.concatenate([rng.random(20), 10 + rng.random(5)]).astype(np.float32)
    labels = np.array([False] * 20 + [True] * 5)
    maps = rng.random((25, 8, 8)).astype(np.float32)
    maps[20:] += 5
    thresholds = compute_thresholds({"scores": scores, "maps": maps, "labels": labels, "masks": None}, 0.1)
    assert (scores[:20] >= thresholds.image_threshold).sum() == 2
    assert (maps[:20] >= thresholds.pixel_threshold).sum() == math.floor(0.1 * 20 * 64)
    assert thresholds.calibration["n_images"] == 20 and thresholds.calibration["image_fpr"] == 0.1


def test_f1_calibration_picks_the_f1_max_threshold() -> None:
    rng = np.random.default_rng(2)
    labels = rng.random(60) < 0.3
    scores = (rng.random(60) + 0.6 * labels).astype(np.float32)
    maps = rng.random((60, 4, 4)).astype(np.float32)
    masks = maps > 0.8
    thresholds = compute_thresholds({"scores": scores, "maps": maps, "labels": labels, "masks": masks}, metric="f1")

    def f1(t: float, s: np.ndarray, y: np.ndarray) -> float:
        pred = s >= t
        tp = (pred & y).sum()
        return 2 * tp / (pred.sum() + y.sum())

    best = max(f1(t, scores, labels) for t in scores)  # brute force over every candidate threshold
    assert f1(thresholds.image_threshold, scores, labels) == pytest.approx(best)
    assert f1(thresholds.pixel_threshold, maps.ravel(), masks.ravel()) == pytest.approx(1.0)


def test_calibration_mode_must_be_chosen_explicitly() -> None:
    arrays = {"scores": np.ones(3, np.float32), "maps": None, "labels": None, "masks": None}
    with pytest.raises(ValueError, match="exactly one"):
        compute_thresholds(arrays)
    with pytest.raises(ValueError, match="labelled"):
        compute_thresholds(arrays, metric="f1")  # unlabelled folder: no F1 without labels


def test_thresholds_round_trip_and_uncalibrated_default() -> None:
    assert not Thresholds.from_dict(None).calibrated
    stored = Thresholds(0.5, 0.25, {"method": "target_fpr"}).to_dict()
    assert Thresholds.from_dict(stored) == Thresholds(0.5, 0.25, {"method": "target_fpr"})


def test_regions_equal_scipy_label_on_the_thresholded_map() -> None:
    rng = np.random.default_rng(3)
    anomaly_map = ndimage.gaussian_filter(rng.random((40, 50)), 2).astype(np.float32)
    threshold = float(np.quantile(anomaly_map, 0.8))
    regions = connected_regions(anomaly_map, threshold)
    labels, count = ndimage.label(anomaly_map >= threshold)
    assert count > 1 and len(regions) == count
    for index, region in enumerate(regions, start=1):
        rows, cols = np.nonzero(labels == index)
        assert region["bbox"] == [cols.min(), rows.min(), cols.max(), rows.max()]
        assert region["area"] == rows.size
        assert region["max_score"] == pytest.approx(float(anomaly_map[rows, cols].max()))
    assert connected_regions(anomaly_map, float(anomaly_map.max()) + 1) == []
