"""torchmetrics ``Metric`` classes over :mod:`zsad.metrics.functional`: exact, no sigmoid, DDP-synced list states.

Use them wherever a plain torchmetrics metric is wanted (a validation monitor, a notebook). The evaluator
(:class:`zsad.metrics.ZSADEvaluator`) does not use one metric object per score: it keeps every sample once in
:class:`zsad.metrics.per_category.PerCategoryMetrics` and computes all seven metrics per category from one sort.

Scores are stored as float32 on the metric's device (``compute_on_cpu=True`` moves them to host RAM after each
update) and compared exactly; in DDP every rank gathers all states (``dist_reduce_fx="cat"``) before ``compute``. These
classes do not de-duplicate the samples that ``DistributedSampler`` repeats to even out the ranks; the evaluator does.

Example:
    >>> import torch
    >>> metric = ExactAUROC()
    >>> metric.update(torch.tensor([0.1, 0.9, 0.4]), torch.tensor([0, 1, 1]))
    >>> float(metric.compute())
    1.0
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from zsad.metrics import functional as F

__all__ = ["ExactAUPRO", "ExactAUROC", "ExactAveragePrecision", "ExactF1Max", "ProRepo", "TypedListStatesMixin"]


class TypedListStatesMixin(Metric):
    """Declares list states with a fixed dtype and trailing shape so that DDP sync works on ranks without data.

    torchmetrics replaces an empty list state by ``torch.tensor([], dtype=self.dtype)`` before gathering: a float
    1-D tensor, which breaks ``all_gather`` when the other ranks hold int64 or (n, k) tensors. Appending a correctly
    typed zero-length tensor just before syncing avoids that without touching torchmetrics internals.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._list_specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    def add_list_state(self, name: str, trailing_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Register a ``cat``-reduced list state whose tensors are ``(n, *trailing_shape)`` of ``dtype``."""
        self.add_state(name, default=[], dist_reduce_fx="cat")
        self._list_specs[name] = (trailing_shape, dtype)

    def sync(self, *args: Any, **kwargs: Any) -> None:
        """Give empty list states a typed zero-length element, then sync as torchmetrics does."""
        for name, (trailing_shape, dtype) in self._list_specs.items():
            value = getattr(self, name)
            if isinstance(value, list) and not value:
                value.append(torch.empty((0, *trailing_shape), dtype=dtype, device=self.device))
        super().sync(*args, **kwargs)

    def cat_state(self, name: str) -> torch.Tensor:
        """A list state concatenated on the CPU (typed empty tensor when nothing was added)."""
        value = getattr(self, name)
        if isinstance(value, torch.Tensor):
            return value.cpu()
        if not value:
            trailing_shape, dtype = self._list_specs[name]
            return torch.empty((0, *trailing_shape), dtype=dtype)
        return dim_zero_cat([v.cpu() for v in value])


class _ExactBinaryMetric(TypedListStatesMixin):
    """Stores (score, target) pairs; subclasses compute one value from the sorted class partition."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_list_state("preds", (), torch.float32)
        self.add_list_state("target", (), torch.uint8)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add scores and binary targets of any (matching) shape; scores are kept raw, as float32.

        Args:
            preds: Raw scores; higher = more anomalous.
            target: Binary targets (bool or 0/1).
        """
        preds = preds.detach().reshape(-1).to(torch.float32)
        target = target.detach().reshape(-1)
        if preds.numel() != target.numel():
            raise ValueError(f"preds ({preds.numel()}) and target ({target.numel()}) differ in size")
        self.preds.append(preds)
        self.target.append(target.to(torch.uint8))

    def _sorted(self) -> F.SortedScores:
        return F.SortedScores.from_arrays(self.cat_state("preds"), self.cat_state("target"))


class ExactAUROC(_ExactBinaryMetric):
    """Exact AUROC (= sklearn ``roc_auc_score``) over everything seen; NaN if one class is missing."""

    def compute(self) -> torch.Tensor:
        """AUROC as a float64 scalar tensor."""
        return torch.tensor(self._sorted().auroc(), dtype=torch.float64)


class ExactAveragePrecision(_ExactBinaryMetric):
    """Exact step-wise average precision (= sklearn ``average_precision_score``)."""

    def compute(self) -> torch.Tensor:
        """AP as a float64 scalar tensor."""
        return torch.tensor(self._sorted().average_precision(), dtype=torch.float64)


class ExactF1Max(_ExactBinaryMetric):
    """Maximum F1 over all thresholds ``score >= t``."""

    def compute(self) -> torch.Tensor:
        """F1-max as a float64 scalar tensor."""
        return torch.tensor(self._sorted().f1_max()[0], dtype=torch.float64)


class _MapMetric(TypedListStatesMixin):
    """Stores anomaly maps and masks flattened (+ per-image shapes), so images of different sizes can mix."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, fpr_limit: float = F.DEFAULT_FPR_LIMIT, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fpr_limit = F.validate_fpr_limit(fpr_limit)
        self.add_list_state("maps", (), torch.float32)
        self.add_list_state("masks", (), torch.uint8)
        self.add_list_state("shapes", (2,), torch.int64)

    def update(self, anomaly_maps: torch.Tensor, masks: torch.Tensor) -> None:
        """Add a batch of maps and masks.

        Args:
            anomaly_maps: (B, H, W) or (B, 1, H, W) raw maps.
            masks: Matching binary masks.
        """
        if anomaly_maps.ndim == 4:
            anomaly_maps = anomaly_maps.squeeze(1)
        if masks.ndim == 4:
            masks = masks.squeeze(1)
        if anomaly_maps.shape != masks.shape or anomaly_maps.ndim != 3:
            raise ValueError(
                f"anomaly maps {tuple(anomaly_maps.shape)} and masks {tuple(masks.shape)} must be B x H x W"
            )
        batch, height, width = anomaly_maps.shape
        self.maps.append(anomaly_maps.detach().reshape(-1).to(torch.float32))
        self.masks.append(masks.detach().reshape(-1).to(torch.uint8))
        self.shapes.append(torch.tensor([[height, width]] * batch, dtype=torch.int64, device=self.device))

    def _pixels(self) -> F.PixelScores:
        maps, masks, shapes = self.cat_state("maps").numpy(), self.cat_state("masks").numpy(), self.cat_state("shapes")
        split_maps, split_masks, offset = [], [], 0
        for height, width in shapes.tolist():
            split_maps.append(maps[offset : offset + height * width].reshape(height, width))
            split_masks.append(masks[offset : offset + height * width].reshape(height, width))
            offset += height * width
        return F.PixelScores.from_maps(split_maps, split_masks)


class ExactAUPRO(_MapMetric):
    """Official MVTec AU-PRO up to ``fpr_limit`` (normalised by it), exact.

    Args:
        fpr_limit: Integration limit of the FPR axis.
        **kwargs: torchmetrics ``Metric`` arguments (``compute_on_cpu``, ``process_group``, ...).
    """

    def compute(self) -> torch.Tensor:
        """AU-PRO as a float64 scalar tensor."""
        return torch.tensor(self._pixels().aupro(self.fpr_limit), dtype=torch.float64)


class ProRepo(_MapMetric):
    """The AnomalyCLIP / APRIL-GAN repositories' 200-threshold PRO (not AU-PRO; for comparing with those papers).

    Args:
        fpr_limit: FPR cut (``expect_fpr``).
        num_thresholds: Score-uniform thresholds (``max_step``).
        **kwargs: torchmetrics ``Metric`` arguments.
    """

    def __init__(
        self, fpr_limit: float = F.DEFAULT_FPR_LIMIT, num_thresholds: int = F.PRO_REPO_THRESHOLDS, **kwargs: Any
    ) -> None:
        super().__init__(fpr_limit=fpr_limit, **kwargs)
        self.num_thresholds = num_thresholds

    def compute(self) -> torch.Tensor:
        """The repositories' PRO as a float64 scalar tensor."""
        return torch.tensor(self._pixels().pro_repo(self.fpr_limit, self.num_thresholds), dtype=torch.float64)
