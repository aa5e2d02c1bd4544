"""Exact, threshold-free anomaly-detection metrics on raw scores.

Every metric here is exact — no binning, no sigmoid, no normalisation of scores — and costs one sort of the scores:

* :func:`auroc`, :func:`average_precision`, :func:`f1_max` on per-image scores or per-pixel maps (ties handled exactly
  as scikit-learn's ``roc_auc_score``, ``average_precision_score`` and ``precision_recall_curve`` do).
* :func:`aupro`: the official MVTec AD AU-PRO (8-connected ground-truth regions, FPR over every GT-negative pixel,
  trapezoid up to the FPR limit with linear interpolation at the limit, divided by the limit).
* :func:`pro_repo`: the 200-threshold, min-max-rescaled "PRO" of the AnomalyCLIP / APRIL-GAN repositories
  (``cal_pro_score``, from cflow-ad), named apart because it is *not* AU-PRO; use it only to set numbers beside those
  papers' tables.
* :func:`pixel_metrics` / :func:`image_metrics`: all of the above from a single sort.

How the sort is shared (``evaluation.md`` §4): scores are split by class and each class is sorted by value (no
argsort, no int64 index array). AUROC is the Mann-Whitney statistic (two ``searchsorted`` per distinct positive
score), AP and F1-max only need thresholds at distinct positive scores, and AU-PRO needs the ordered negatives only up
to the FPR limit plus one ``searchsorted``/``bincount`` of the positive pixels with their region weights. Peak memory
is about 4 bytes per pixel on top of the maps plus ~16 bytes per anomalous pixel.

Degenerate inputs return NaN with an :class:`UndefinedMetricWarning` (no positives, no negatives, no ground-truth
region); NaN or infinite scores, labels outside {0, 1} and empty inputs raise ``ValueError``.

Example:
    >>> import torch
    >>> scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    >>> labels = torch.tensor([0, 0, 1, 1])
    >>> auroc(scores, labels)
    0.75
    >>> maps = torch.zeros(2, 4, 4)
    >>> masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    >>> masks[1, 1:3, 1:3] = True
    >>> maps[1, 1:3, 1:3] = 1.0
    >>> aupro(maps, masks)
    1.0
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "IMAGE_METRICS",
    "PIXEL_METRICS",
    "PRO_REPO_METRIC",
    "PixelScores",
    "SortedScores",
    "UndefinedMetricWarning",
    "aupro",
    "auroc",
    "average_precision",
    "f1_max",
    "f1_max_threshold",
    "image_metrics",
    "pixel_metrics",
    "pro_repo",
    "validate_fpr_limit",
]

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")
PRO_REPO_METRIC = "pixel_pro_repo"

# MVTec's official evaluation labels ground-truth regions with a full 3x3 structure (8-connectivity).
EIGHT_CONNECTIVITY = np.ones((3, 3), dtype=bool)
DEFAULT_FPR_LIMIT = 0.3
# AnomalyCLIP / APRIL-GAN ``cal_pro_score(max_step=200)``.
PRO_REPO_THRESHOLDS = 200

ArrayLike = torch.Tensor | np.ndarray


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for this input (e.g. AUROC without anomalous samples) and NaN is returned."""


# --------------------------------------------------------------------------------------------------------------------
# Input conversion
# --------------------------------------------------------------------------------------------------------------------


def _as_numpy(x: ArrayLike | Sequence[float]) -> np.ndarray:
    """A NumPy view of ``x`` (no copy for CPU tensors); half precisions become float32 (NumPy has no bfloat16)."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.cpu().numpy()
    return np.asarray(x)


def _as_scores(x: ArrayLike | Sequence[float], what: str = "scores") -> np.ndarray:
    """Flattened float scores, rejecting NaN/inf (their order, hence every metric, would be meaningless)."""
    arr = _as_numpy(x)
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    elif not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    arr = arr.reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{what} are empty")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contain NaN or infinite values; fix the model output (metrics need ordered scores)")
    return arr


def _as_binary(x: ArrayLike | Sequence[int], what: str = "labels") -> np.ndarray:
    """Flattened boolean targets; anything other than {0, 1} (e.g. 0/255 masks) is an error, not silently cast."""
    arr = _as_numpy(x).reshape(-1)
    if arr.dtype != np.bool_:
        if not ((arr == 0) | (arr == 1)).all():
            raise ValueError(f"{what} must be binary (bool or 0/1); binarise masks (e.g. `mask > 0`) first")
        arr = arr.astype(bool)
    return arr


def validate_fpr_limit(fpr_limit: float) -> float:
    """``fpr_limit`` as a float, checked to lie in (0, 1]."""
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return fpr_limit


def _undefined(metric: str, reason: str) -> float:
    warnings.warn(f"{metric} is undefined ({reason}); returning NaN", UndefinedMetricWarning, stacklevel=3)
    return math.nan


def _distinct(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct values of an ascending array with their counts and first positions."""
    n = sorted_values.size
    if n == 0:
        empty = np.empty(0, dtype=np.int64)
        return sorted_values[:0], empty, empty
    starts = np.flatnonzero(sorted_values[1:] != sorted_values[:-1])
    starts += 1
    starts = np.concatenate((np.zeros(1, dtype=starts.dtype), starts))
    counts = np.diff(np.append(starts, n))
    return sorted_values[starts], counts, starts


# --------------------------------------------------------------------------------------------------------------------
# Binary scores: AUROC, AP, F1-max
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SortedScores:
    """Scores split by class, each sorted ascending: the one sort every binary metric is read from.

    Attributes:
        negatives: Scores of the negative (normal) samples or pixels, ascending.
        positives: Scores of the positive (anomalous) samples or pixels, ascending.
    """

    negatives: np.ndarray
    positives: np.ndarray

    @classmethod
    def from_arrays(cls, scores: ArrayLike, labels: ArrayLike) -> SortedScores:
        """Split and sort ``scores`` by ``labels``.

        Args:
            scores: Scores of any shape (flattened); higher means more anomalous.
            labels: Targets of the same number of elements, bool or 0/1.

        Returns:
            The sorted class partition.

        Raises:
            ValueError: On empty, non-finite or shape-mismatched input or non-binary labels.
        """
        s = _as_scores(scores)
        y = _as_binary(labels)
        if s.size != y.size:
            raise ValueError(f"scores ({s.size}) and labels ({y.size}) differ in size")
        negatives = s[~y]
        negatives.sort()
        positives = s[y]
        positives.sort()
        return cls(negatives, positives)

    @property
    def n_negatives(self) -> int:
        """Number of negatives."""
        return int(self.negatives.size)

    @property
    def n_positives(self) -> int:
        """Number of positives."""
        return int(self.positives.size)

    def auroc(self) -> float:
        """Area under the ROC curve, exact with ties (= sklearn ``roc_auc_score``).

        Mann-Whitney: AUROC = P(s+ > s-) + P(s+ = s-) / 2, which equals the trapezoidal area under the ROC curve whose
        points are the distinct thresholds (sklearn's construction). Integer counts keep it exact.
        """
        n_pos, n_neg = self.n_positives, self.n_negatives
        if n_pos == 0 or n_neg == 0:
            return _undefined("AUROC", "only one class present")
        values, counts, _ = _distinct(self.positives)
        below = np.searchsorted(self.negatives, values, side="left")  # negatives strictly below each positive value
        below_or_tied = np.searchsorted(self.negatives, values, side="right")
        twice_wins = int(np.dot(counts, below + below_or_tied))  # int64: <= 2 * n_pos * n_neg, far from overflow
        return twice_wins / (2.0 * n_pos * n_neg)

    def _precision_recall_at_positives(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Thresholds at distinct positive scores (ascending) with TP, FP and the positives tied at each.

        Other thresholds never matter: between two positive values only false positives are added, so recall is
        unchanged (no AP contribution) and F1 can only drop.
        """
        values, counts, starts = _distinct(self.positives)
        tp = self.n_positives - starts  # positives >= threshold
        fp = self.n_negatives - np.searchsorted(self.negatives, values, side="left")  # negatives >= threshold
        return values, tp, fp, counts

    def average_precision(self) -> float:
        """Step-wise average precision AP = sum_n (R_n - R_{n-1}) P_n (= sklearn ``average_precision_score``)."""
        if self.n_positives == 0:
            return _undefined("AP", "no positive samples")
        _, tp, fp, counts = self._precision_recall_at_positives()
        precision = tp / (tp + fp)
        return float(np.dot(counts, precision) / self.n_positives)

    def f1_max(self) -> tuple[float, float]:
        """Maximum F1 over all thresholds ``score >= t`` and the (highest) threshold attaining it.

        Returns:
            ``(f1_max, threshold)``; both NaN when there is no positive.
        """
        if self.n_positives == 0:
            return _undefined("F1-max", "no positive samples"), math.nan
        values, tp, fp, _ = self._precision_recall_at_positives()
        f1 = 2.0 * tp / (self.n_positives + tp + fp)  # = 2PR / (P + R); the denominator is never 0 here
        best = f1.size - 1 - int(np.argmax(f1[::-1]))  # among equal maxima prefer the highest threshold
        return float(f1[best]), float(values[best])

    def roc_curve(self, max_points: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """Exact ROC points at up to ``max_points`` thresholds (for plots), from (0, 0) to (1, 1).

        Thresholds are taken at evenly spaced ranks of both classes, so the points lie exactly on the ROC curve.
        """
        if self.n_positives == 0 or self.n_negatives == 0:
            return np.array([0.0, 1.0]), np.array([0.0, 1.0])
        half = max(max_points // 2, 2)
        thresholds = np.unique(
            np.concatenate(
                (
                    self.negatives[np.linspace(0, self.n_negatives - 1, half).astype(np.int64)],
                    self.positives[np.linspace(0, self.n_positives - 1, half).astype(np.int64)],
                )
            )
        )[::-1]
        fpr = (self.n_negatives - np.searchsorted(self.negatives, thresholds, side="left")) / self.n_negatives
        tpr = (self.n_positives - np.searchsorted(self.positives, thresholds, side="left")) / self.n_positives
        return np.concatenate(([0.0], fpr, [1.0])), np.concatenate(([0.0], tpr, [1.0]))


# --------------------------------------------------------------------------------------------------------------------
# Pixel scores: + regions for AU-PRO
# --------------------------------------------------------------------------------------------------------------------


def _iter_maps(anomaly_maps: ArrayLike | Iterable[ArrayLike], masks: ArrayLike | Iterable[ArrayLike]):
    """Pairs of 2-D (map, mask) NumPy arrays from N x H x W tensors/arrays or from sequences of H x W ones."""
    if isinstance(anomaly_maps, torch.Tensor | np.ndarray):
        maps_np = _as_numpy(anomaly_maps)
        if maps_np.ndim == 2:
            maps_np = maps_np[None]
        if maps_np.ndim == 4 and maps_np.shape[1] == 1:
            maps_np = maps_np[:, 0]
        anomaly_maps = maps_np
    if isinstance(masks, torch.Tensor | np.ndarray):
        masks_np = _as_numpy(masks)
        if masks_np.ndim == 2:
            masks_np = masks_np[None]
        if masks_np.ndim == 4 and masks_np.shape[1] == 1:
            masks_np = masks_np[:, 0]
        masks = masks_np
    if len(anomaly_maps) != len(masks):  # type: ignore[arg-type]
        raise ValueError(f"{len(anomaly_maps)} anomaly maps but {len(masks)} masks")  # type: ignore[arg-type]
    for amap, mask in zip(anomaly_maps, masks, strict=True):
        yield _as_numpy(amap), _as_numpy(mask)


@dataclass(frozen=True)
class PixelScores:
    """Pixel scores sorted by class plus the ground-truth region of every anomalous pixel.

    Attributes:
        scores: The class-partitioned sorted scores (pixel AUROC / AP / F1-max).
        positives: Anomalous-pixel scores in image order (not sorted), aligned with ``regions``.
        regions: Region index (0..K-1, unique over all images) of each anomalous pixel.
        region_sizes: Pixel count of each of the K regions.
    """

    scores: SortedScores
    positives: np.ndarray
    regions: np.ndarray
    region_sizes: np.ndarray

    @classmethod
    def from_maps(
        cls,
        anomaly_maps: ArrayLike | Iterable[ArrayLike],
        masks: ArrayLike | Iterable[ArrayLike],
    ) -> PixelScores:
        """Collect the pixels of a set of images (one category) and label the ground-truth regions.

        Args:
            anomaly_maps: N x H x W maps (tensor or array) or a sequence of H x W maps (sizes may differ between
                images). Raw scores; float16/bfloat16 are evaluated as float32.
            masks: Matching ground-truth masks, bool or 0/1.

        Returns:
            The pixel partition.

        Raises:
            ValueError: On NaN/inf scores, non-binary or mismatched masks, or no pixels at all.
        """
        pairs = []
        n_pos = n_total = 0
        dtype: np.dtype | None = None
        for index, (amap, mask) in enumerate(_iter_maps(anomaly_maps, masks)):
            if amap.shape != mask.shape or amap.ndim != 2:
                raise ValueError(f"image {index}: anomaly map {amap.shape} and mask {mask.shape} must be equal H x W")
            mask = _as_binary(mask, what="masks").reshape(mask.shape)
            pairs.append((amap, mask))
            n_pos += int(np.count_nonzero(mask))
            n_total += mask.size
            dtype = amap.dtype if dtype is None else np.promote_types(dtype, amap.dtype)
        if not pairs or n_total == 0:
            raise ValueError("anomaly maps are empty")
        if dtype == np.float16:
            dtype = np.dtype(np.float32)
        elif dtype is None or not np.issubdtype(dtype, np.floating):
            dtype = np.dtype(np.float64)
        # Preallocate and fill image by image: no concatenated copy of all maps, no int64 index array.
        negatives = np.empty(n_total - n_pos, dtype=dtype)
        positives = np.empty(n_pos, dtype=dtype)
        regions = np.empty(n_pos, dtype=np.int32 if n_pos < 2**31 else np.int64)
        i_neg = i_pos = n_regions = 0
        for index, (amap, mask) in enumerate(pairs):
            if not np.isfinite(amap).all():
                raise ValueError(f"anomaly map {index} contains NaN or infinite values; fix the model output")
            k_pos = int(np.count_nonzero(mask))
            negatives[i_neg : i_neg + mask.size - k_pos] = amap[~mask]
            i_neg += mask.size - k_pos
            if k_pos:
                labelled, k_regions = ndimage.label(mask, structure=EIGHT_CONNECTIVITY)
                positives[i_pos : i_pos + k_pos] = amap[mask]
                regions[i_pos : i_pos + k_pos] = labelled[mask] - 1 + n_regions
                i_pos += k_pos
                n_regions += k_regions
        region_sizes = np.bincount(regions, minlength=n_regions).astype(np.int64)
        negatives.sort()
        return cls(SortedScores(negatives, np.sort(positives)), positives, regions, region_sizes)

    @property
    def n_regions(self) -> int:
        """Number of 8-connected ground-truth regions over all images."""
        return int(self.region_sizes.size)

    def _region_weights(self, positives_mask: np.ndarray | None = None) -> np.ndarray:
        """Per anomalous pixel 1 / (K * |G_k|): summing it over detected pixels gives the macro-averaged overlap."""
        per_region = 1.0 / (self.region_sizes.astype(np.float64) * self.n_regions)
        regions = self.regions if positives_mask is None else self.regions[positives_mask]
        return per_region[regions]

    def _pro_at(self, thresholds: np.ndarray, strict: bool) -> np.ndarray:
        """PRO at ascending ``thresholds``: mean over regions of the fraction of pixels with score >= t (or > t)."""
        return self._pro_from(thresholds, self.positives, self._region_weights(), strict)

    def aupro(self, fpr_limit: float = DEFAULT_FPR_LIMIT) -> float:
        """Official MVTec AU-PRO: (1 / limit) * integral of PRO d(FPR) from 0 to ``fpr_limit``.

        Every distinct score is a threshold (``score >= t``); the curve starts at (0, 0); trapezoids; the point at
        FPR = limit is interpolated linearly. Only thresholds where FPR grows span area, so the integral is a sum over
        distinct *negative* scores v (descending) of trapezoids from (FPR(> v), PRO(> v)) to (FPR(>= v), PRO(>= v)),
        and only the negatives above the limit are ever needed.

        Args:
            fpr_limit: Upper integration limit in (0, 1].

        Returns:
            AU-PRO in [0, 1]; NaN (with a warning) without ground-truth regions or without normal pixels.
        """
        fpr_limit = validate_fpr_limit(fpr_limit)
        negatives = self.scores.negatives
        n_neg = negatives.size
        if self.n_regions == 0:
            return _undefined("AU-PRO", "no ground-truth region")
        if n_neg == 0:
            return _undefined("AU-PRO", "no normal pixel")
        # The k largest negatives (k a little above limit * N, so float rounding cannot cut the crossing segment).
        k = min(n_neg, math.floor(fpr_limit * n_neg) + 2)
        start = int(np.searchsorted(negatives, negatives[n_neg - k], side="left"))
        values, counts, starts = _distinct(negatives[start:])
        at_or_above = n_neg - (start + starts)  # negatives >= v, int64
        fpr_b = at_or_above / n_neg
        fpr_a = (at_or_above - counts) / n_neg  # negatives > v
        # Positives below the lowest value used never reach the curve segment we integrate.
        keep = self.positives >= values[0]
        positives = self.positives[keep]
        weights = self._region_weights(keep)
        pro_b = self._pro_from(values, positives, weights, strict=False)
        pro_a = self._pro_from(values, positives, weights, strict=True)
        return _integrate_segments(fpr_a, pro_a, fpr_b, pro_b, fpr_limit) / fpr_limit

    @staticmethod
    def _pro_from(thresholds: np.ndarray, positives: np.ndarray, weights: np.ndarray, strict: bool) -> np.ndarray:
        """PRO at ascending thresholds from the given anomalous pixels and their region weights."""
        # A pixel counts for every threshold below (or at) its score; its searchsorted index is how many there are.
        index = np.searchsorted(thresholds, positives, side="left" if strict else "right")
        # float64 even when no positive is left (numpy's bincount of an empty index returns int64 despite weights).
        hist = np.bincount(index, weights=weights, minlength=thresholds.size + 1).astype(np.float64, copy=False)
        # pro[i] = sum of the weights with index > i: a reverse cumulative sum shifted by one.
        pro = np.cumsum(hist[::-1])[::-1][1:]
        return np.minimum(pro, 1.0, out=pro)  # float round-off only, as the official code clips

    def pro_curve(self, max_points: int = 512, fpr_limit: float = DEFAULT_FPR_LIMIT) -> tuple[np.ndarray, np.ndarray]:
        """Exact (FPR, PRO) points for plots, half of them in [0, fpr_limit], from (0, 0) to (1, 1)."""
        n_neg = self.scores.n_negatives
        if n_neg == 0 or self.n_regions == 0:
            return np.array([0.0, 1.0]), np.array([0.0, 1.0])
        half = max(max_points // 2, 2)
        grid = np.unique(np.concatenate((np.linspace(0, fpr_limit, half), np.linspace(fpr_limit, 1.0, half))))
        ranks = np.clip(np.ceil(grid * n_neg).astype(np.int64), 1, n_neg)  # k-th largest negative reaches FPR k/N
        thresholds = np.unique(self.scores.negatives[n_neg - ranks])
        fpr = (n_neg - np.searchsorted(self.scores.negatives, thresholds, side="left")) / n_neg
        pro = self._pro_at(thresholds, strict=False)
        return np.concatenate(([0.0], fpr[::-1], [1.0])), np.concatenate(([0.0], pro[::-1], [1.0]))

    def pro_repo(self, fpr_limit: float = DEFAULT_FPR_LIMIT, num_thresholds: int = PRO_REPO_THRESHOLDS) -> float:
        """The AnomalyCLIP / APRIL-GAN ``cal_pro_score`` value (cflow-ad lineage), computed exactly but vectorised.

        Thresholds ``np.arange(min, max, (max - min) / num_thresholds)`` uniform in score space, pixels ``score > t``,
        PRO = mean over all regions, keep points with FPR < ``fpr_limit``, min-max rescale those FPRs to [0, 1] and
        take the trapezoidal area. This is *not* AU-PRO (no (0, 0) point, no interpolation at the limit, rescaled
        x-axis); it exists so tables can be compared with those papers.

        Returns:
            The repositories' PRO; NaN (with a warning) for constant maps (the reference raises), fewer than two
            thresholds below the limit, or no ground-truth region.
        """
        fpr_limit = validate_fpr_limit(fpr_limit)
        if self.n_regions == 0:
            return _undefined("PRO (repo)", "no ground-truth region")
        negatives, positives = self.scores.negatives, self.scores.positives
        n_neg = negatives.size
        if n_neg == 0:
            return _undefined("PRO (repo)", "no normal pixel")
        # Same scalar types as the reference (float32 maps -> float32 min/max/step, float64 arange).
        low = min(negatives[0], positives[0])
        high = max(negatives[-1], positives[-1])
        if low == high:
            return _undefined("PRO (repo)", "constant anomaly maps")
        step = (high - low) / num_thresholds
        thresholds = np.arange(low, high, step)
        fpr = (n_neg - np.searchsorted(negatives, thresholds, side="right")) / n_neg  # negatives > t
        pro = self._pro_at(thresholds, strict=True)
        keep = fpr < fpr_limit
        if np.count_nonzero(keep) < 2:
            return _undefined("PRO (repo)", f"fewer than two thresholds with FPR < {fpr_limit}")
        fpr, pro = fpr[keep], pro[keep]
        span = fpr.max() - fpr.min()
        if span == 0:
            return _undefined("PRO (repo)", "no FPR spread below the limit")
        fpr = (fpr - fpr.min()) / span
        # FPR decreases with the threshold; sklearn.metrics.auc integrates that direction with a sign flip.
        return float(abs(np.trapezoid(pro, fpr)))


def _integrate_segments(
    fpr_a: np.ndarray, pro_a: np.ndarray, fpr_b: np.ndarray, pro_b: np.ndarray, limit: float
) -> float:
    """Trapezoids (fpr_a, pro_a) -> (fpr_b, pro_b) up to ``limit``, interpolating the segment that crosses it."""
    full = fpr_b <= limit
    area = float(np.sum((fpr_b[full] - fpr_a[full]) * (pro_a[full] + pro_b[full])) / 2.0)
    crossing = np.flatnonzero((fpr_a < limit) & (fpr_b > limit))
    if crossing.size:
        i = int(crossing[0])
        f_a, f_b, p_a, p_b = float(fpr_a[i]), float(fpr_b[i]), float(pro_a[i]), float(pro_b[i])
        p_limit = p_a + (p_b - p_a) * (limit - f_a) / (f_b - f_a)
        area += (limit - f_a) * (p_a + p_limit) / 2.0
    return area


# --------------------------------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------------------------------


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Exact area under the ROC curve (sklearn ``roc_auc_score``), NaN if only one class is present.

    Args:
        scores: Raw scores of any shape (flattened); higher = more anomalous. Never normalised.
        labels: Binary targets (bool or 0/1) with as many elements.

    Returns:
        AUROC in [0, 1].
    """
    return SortedScores.from_arrays(scores, labels).auroc()


def average_precision(scores: ArrayLike, labels: ArrayLike) -> float:
    """Exact step-wise average precision (sklearn ``average_precision_score``), NaN without positives.

    Args:
        scores: Raw scores of any shape (flattened).
        labels: Binary targets (bool or 0/1) with as many elements.

    Returns:
        AP in [0, 1].
    """
    return SortedScores.from_arrays(scores, labels).average_precision()


def f1_max(scores: ArrayLike, labels: ArrayLike) -> float:
    """Maximum F1 over all thresholds ``score >= t`` (max of sklearn's ``precision_recall_curve`` F1).

    Args:
        scores: Raw scores of any shape (flattened).
        labels: Binary targets (bool or 0/1) with as many elements.

    Returns:
        F1-max in [0, 1]; NaN without positives.
    """
    return SortedScores.from_arrays(scores, labels).f1_max()[0]


def f1_max_threshold(scores: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """F1-max and the threshold ``t`` (predict anomalous where ``score >= t``) that attains it.

    Args:
        scores: Raw scores of any shape (flattened).
        labels: Binary targets (bool or 0/1) with as many elements.

    Returns:
        ``(f1_max, threshold)``.
    """
    return SortedScores.from_arrays(scores, labels).f1_max()


def aupro(anomaly_maps: ArrayLike, masks: ArrayLike, fpr_limit: float = DEFAULT_FPR_LIMIT) -> float:
    """Official MVTec AD AU-PRO, exact, normalised by ``fpr_limit``.

    Args:
        anomaly_maps: N x H x W raw anomaly maps (or a sequence of H x W maps).
        masks: N x H x W ground-truth masks, bool or 0/1.
        fpr_limit: Integration limit of the FPR axis, in (0, 1]. Official: 0.3.

    Returns:
        AU-PRO in [0, 1]; NaN without ground-truth regions or without normal pixels.
    """
    return PixelScores.from_maps(anomaly_maps, masks).aupro(fpr_limit)


def pro_repo(
    anomaly_maps: ArrayLike,
    masks: ArrayLike,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
    num_thresholds: int = PRO_REPO_THRESHOLDS,
) -> float:
    """The "PRO" reported by the AnomalyCLIP / APRIL-GAN code (200 score-uniform thresholds, min-max FPR rescale).

    Not AU-PRO: see :meth:`PixelScores.pro_repo` and ``evaluation.md`` §3. Use only next to those papers' tables.

    Args:
        anomaly_maps: N x H x W raw anomaly maps.
        masks: N x H x W ground-truth masks, bool or 0/1.
        fpr_limit: FPR cut (``expect_fpr`` in the reference).
        num_thresholds: ``max_step`` in the reference.

    Returns:
        The repositories' PRO value.
    """
    return PixelScores.from_maps(anomaly_maps, masks).pro_repo(fpr_limit, num_thresholds)


def image_metrics(scores: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """``image_auroc``, ``image_ap``, ``image_f1max`` from one sort.

    Args:
        scores: Per-image scores (N,), as defined by the method.
        labels: Per-image labels (N,), bool or 0/1.

    Returns:
        Metric name to value.
    """
    sorted_scores = SortedScores.from_arrays(scores, labels)
    return {
        "image_auroc": sorted_scores.auroc(),
        "image_ap": sorted_scores.average_precision(),
        "image_f1max": sorted_scores.f1_max()[0],
    }


def pixel_metrics(
    anomaly_maps: ArrayLike,
    masks: ArrayLike,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
    report_pro_repo: bool = False,
) -> dict[str, float]:
    """``pixel_auroc``, ``pixel_ap``, ``pixel_f1max``, ``pixel_aupro`` (and ``pixel_pro_repo``) from one sort.

    Args:
        anomaly_maps: N x H x W raw anomaly maps (or a sequence of H x W maps).
        masks: Matching ground-truth masks, bool or 0/1.
        fpr_limit: AU-PRO integration limit.
        report_pro_repo: Also compute the repositories' 200-threshold PRO.

    Returns:
        Metric name to value.
    """
    pixels = PixelScores.from_maps(anomaly_maps, masks)
    out = {
        "pixel_auroc": pixels.scores.auroc(),
        "pixel_ap": pixels.scores.average_precision(),
        "pixel_f1max": pixels.scores.f1_max()[0],
        "pixel_aupro": pixels.aupro(fpr_limit),
    }
    if report_pro_repo:
        out[PRO_REPO_METRIC] = pixels.pro_repo(fpr_limit)
    return out
