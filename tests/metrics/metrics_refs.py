"""Independent references for the metric tests: scikit-learn's F1, MVTec's AU-PRO definition evaluated one
threshold at a time, AnomalyCLIP's ``cal_pro_score`` transcribed, and synthetic maps with ties and many regions."""

from __future__ import annotations

import bisect

import numpy as np
from skimage import measure
from sklearn.metrics import auc, precision_recall_curve

# --------------------------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------------------------


def sklearn_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.nanmax(f1))


def reference_aupro(maps, masks, limit: float) -> float:
    """MVTec's definition, one threshold at a time: every distinct score, ``>=``, macro PRO, trapezoid to the limit.

    ``maps``/``masks`` are N x H x W arrays or lists of H x W arrays (sizes may differ).
    """
    regions = []
    for index, mask in enumerate(masks):
        labelled = measure.label(mask, connectivity=2)  # 8-connectivity, skimage's own implementation
        regions += [(index, labelled == k) for k in range(1, labelled.max() + 1)]
    n_normal = sum((~mask).sum() for mask in masks)
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        on = [m >= threshold for m in maps]
        fprs.append(sum((o & ~mask).sum() for o, mask in zip(on, masks, strict=True)) / n_normal)
        pros.append(np.mean([on[i][region].sum() / region.sum() for i, region in regions]))
    fprs.append(1.0)
    pros.append(1.0)
    # mvtec_ad_evaluation/generic_util.trapezoid(x, y, x_max), then / x_max.
    x, y = np.array(fprs), np.array(pros)
    correction = 0.0
    if limit not in x:
        ins = bisect.bisect(x, limit)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (limit - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (limit - x[ins - 1])
    keep = x <= limit
    x, y = x[keep], y[keep]
    return (np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction) / limit


def reference_cal_pro_score(masks: np.ndarray, amaps: np.ndarray, max_step: int = 200, expect_fpr: float = 0.3):
    """AnomalyCLIP's ``cal_pro_score`` (from cflow-ad), transcribed loop for loop."""
    binary_amaps = np.zeros_like(amaps, dtype=bool)
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / max_step
    pros, fprs = [], []
    for th in np.arange(min_th, max_th, delta):
        binary_amaps[amaps <= th], binary_amaps[amaps > th] = 0, 1
        pro = []
        for binary_amap, mask in zip(binary_amaps, masks, strict=True):
            for region in measure.regionprops(measure.label(mask)):
                tp_pixels = binary_amap[region.coords[:, 0], region.coords[:, 1]].sum()
                pro.append(tp_pixels / region.area)
        inverse_masks = 1 - masks
        fp_pixels = np.logical_and(inverse_masks, binary_amaps).sum()
        fprs.append(fp_pixels / inverse_masks.sum())
        pros.append(np.array(pro).mean())
    pros, fprs = np.array(pros), np.array(fprs)
    idxes = fprs < expect_fpr
    fprs = fprs[idxes]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return auc(fprs, pros[idxes])


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def tied_scores(rng: np.random.Generator, n: int, levels: int) -> np.ndarray:
    """Scores with many ties (few distinct levels), float32 like real maps."""
    return (rng.integers(0, levels, n) / levels + rng.normal(0, 0.3, n).round(1)).astype(np.float32)


def synthetic_maps(seed: int, n: int = 6, size: int = 20, levels: int | None = 12) -> tuple[np.ndarray, np.ndarray]:
    """Maps and masks with several regions per image (diagonal-only contacts included), a good image, and ties."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(1, n):  # image 0 stays good
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, size - 4, 2)
            h, w = rng.integers(1, 5, 2)
            masks[i, r : r + h, c : c + w] = True
    masks[1, 0, 0] = masks[1, 1, 1] = True  # touching diagonally: one region under 8-connectivity
    maps = rng.random((n, size, size)) + 0.6 * masks
    if levels is not None:
        maps = np.round(maps * levels) / levels
    return maps.astype(np.float32), masks
