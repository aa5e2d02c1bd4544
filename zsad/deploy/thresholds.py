"""Decision thresholds: how they are calibrated, where they are stored, how they are applied.

A zero-shot model's scores have no natural cut-off, so zsad never invents one: ``pred_label`` / ``pred_mask`` exist
only once ``zsad calibrate`` has stored an image and a pixel threshold. The rule everywhere (CSV, JSONL, regions,
overlays, exports) is the one of :func:`zsad.metrics.functional.f1_max_threshold`: **anomalous where
``score >= threshold``**.

Storage: a checkpoint entry ``zsad_thresholds`` (plain floats and strings, so ``weights_only=True`` loading keeps
working) named like anomalib's ``PostProcessor`` buffers (``image_threshold``, ``pixel_threshold``). They are not put
into anomalib's post-processor itself: it also min-max normalises scores with statistics a zero-shot model never
saw, which zsad disables (:meth:`zsad.methods.base.ZSADModule.configure_post_processor`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from zsad.metrics.functional import f1_max_threshold

#: Checkpoint key of the stored thresholds.
CHECKPOINT_KEY = "zsad_thresholds"


@dataclass(frozen=True)
class Thresholds:
    """An image and a pixel threshold (either may be ``None``: not calibrated) and how they were obtained.

    Attributes:
        image_threshold: ``pred_label = pred_score >= image_threshold``.
        pixel_threshold: ``pred_mask = anomaly_map >= pixel_threshold``.
        calibration: Provenance: method (``target_fpr`` / ``f1``), target, data, counts, achieved rates.
    """

    image_threshold: float | None = None
    pixel_threshold: float | None = None
    calibration: dict[str, Any] = field(default_factory=dict)

    @property
    def calibrated(self) -> bool:
        """Whether an image threshold exists (labels can be given)."""
        return self.image_threshold is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form stored in checkpoints and export metadata."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Thresholds:
        """Inverse of :meth:`to_dict`; ``None`` or ``{}`` gives uncalibrated thresholds."""
        if not data:
            return cls()

        def number(value: object) -> float | None:
            return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)

        return cls(
            image_threshold=number(data.get("image_threshold")),
            pixel_threshold=number(data.get("pixel_threshold")),
            calibration=dict(data.get("calibration") or {}),
        )


def threshold_at_fpr(normal_scores: np.ndarray, target_fpr: float) -> float:
    """Smallest float32 threshold at which at most ``target_fpr`` of the normal scores are flagged (``>=``).

    With ``k = floor(target_fpr * n)`` the threshold lies just above the ``(k+1)``-th largest score, so exactly
    ``k`` scores reach it when there are no ties at that value (fewer with ties: never more than the target).

    Args:
        normal_scores: Scores of normal samples (any shape, flattened).
        target_fpr: Allowed false-positive rate in ``[0, 1)``.

    Returns:
        The threshold (a float32 value, so comparisons in float32 and float64 agree).
    """
    if not 0.0 <= target_fpr < 1.0:
        msg = f"target_fpr must be in [0, 1), got {target_fpr}."
        raise ValueError(msg)
    scores = np.asarray(normal_scores, dtype=np.float32).reshape(-1)
    if scores.size == 0:
        msg = "no normal scores to calibrate on."
        raise ValueError(msg)
    if not np.isfinite(scores).all():
        msg = "normal scores contain NaN or inf; the model output is broken."
        raise ValueError(msg)
    n = scores.size
    k = math.floor(target_fpr * n + 1e-9)
    kth_largest = np.partition(scores, n - k - 1)[n - k - 1]  # the (k+1)-th largest score
    return float(np.nextafter(np.float32(kth_largest), np.float32(np.inf)))


def threshold_f1(scores: np.ndarray, labels: np.ndarray) -> float:
    """The F1-max threshold on labelled scores (``score >= t``), as the evaluator's F1-max."""
    _, threshold = f1_max_threshold(np.asarray(scores).reshape(-1), np.asarray(labels).reshape(-1))
    if math.isnan(threshold):
        msg = "F1 calibration needs anomalous samples (labels 1); the data has none."
        raise ValueError(msg)
    return threshold


def flag_rate(scores: np.ndarray, threshold: float) -> float:
    """Fraction of ``scores`` at or above ``threshold`` (compared in float32, as applied)."""
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    return float((scores >= np.float32(threshold)).mean()) if scores.size else math.nan
