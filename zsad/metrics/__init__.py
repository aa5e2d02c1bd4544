"""Exact per-category evaluation for zero-shot anomaly detection.

* :mod:`zsad.metrics.functional` — exact AUROC / AP / F1-max / AU-PRO on tensors (+ the repositories' ``pro_repo``).
* :mod:`zsad.metrics.metric` — torchmetrics classes over it (DDP-synced list states).
* :class:`ZSADEvaluator` — the evaluator every method returns from ``configure_evaluator()``: per-category metrics
  and their unweighted mean, logged keys ``{stage}/{dataset}/{category|mean}/{metric}``, ``metrics.csv/json/md``,
  overlays, ROC / PRO curves and W&B.
"""

from zsad.metrics.evaluator import ZSADEvaluator, dataset_name
from zsad.metrics.functional import (
    IMAGE_METRICS,
    PIXEL_METRICS,
    PRO_REPO_METRIC,
    PixelScores,
    SortedScores,
    UndefinedMetricWarning,
    aupro,
    auroc,
    average_precision,
    f1_max,
    f1_max_threshold,
    image_metrics,
    pixel_metrics,
    pro_repo,
)
from zsad.metrics.metric import ExactAUPRO, ExactAUROC, ExactAveragePrecision, ExactF1Max, ProRepo
from zsad.metrics.per_category import PerCategoryMetrics, metric_columns

__all__ = [
    "IMAGE_METRICS",
    "PIXEL_METRICS",
    "PRO_REPO_METRIC",
    "ExactAUPRO",
    "ExactAUROC",
    "ExactAveragePrecision",
    "ExactF1Max",
    "PerCategoryMetrics",
    "PixelScores",
    "ProRepo",
    "SortedScores",
    "UndefinedMetricWarning",
    "ZSADEvaluator",
    "aupro",
    "auroc",
    "average_precision",
    "dataset_name",
    "f1_max",
    "f1_max_threshold",
    "image_metrics",
    "metric_columns",
    "pixel_metrics",
    "pro_repo",
]
