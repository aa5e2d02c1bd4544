"""Per-category accumulation of scored batches and exact metrics, correct under DDP.

:class:`PerCategoryMetrics` is the one state the evaluator keeps per stage. For every sample it records, as
torchmetrics list states synced across ranks, a 63-bit hash of ``image_path``, the category (UTF-8 bytes), the image
score and label, and where its pixels live (rank, local index). The pixels themselves (float32 map + bit-packed mask,
~4.1 bytes per pixel) stay in host RAM on the rank that saw them and are gathered **one category at a time** at
compute, so the peak is the stored maps plus one category's working set (``evaluation.md`` §4).

DDP exactness: Lightning's ``DistributedSampler`` pads the ranks to equal length by repeating samples. Duplicates are
dropped by ``image_path`` hash (first occurrence in rank order), so 2-process metrics equal 1-process metrics; the
samples of a category are then put in a canonical order (by hash) so even float summation order matches. Samples
without ``image_path`` cannot be de-duplicated (a warning says so under DDP).

Example:
    >>> state = PerCategoryMetrics()
    >>> state.update(batch)  # doctest: +SKIP
    >>> out = state.compute()  # doctest: +SKIP
    >>> out["metrics"]["bottle"]["pixel_aupro"]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torchmetrics.utilities.distributed import gather_all_tensors

from zsad.data.dataclasses import batch_categories
from zsad.metrics import functional as F
from zsad.metrics.metric import TypedListStatesMixin

__all__ = [
    "CATEGORY_BYTES",
    "DEFECT_AUROC_PREFIX",
    "PerCategoryMetrics",
    "defect_type",
    "metric_columns",
    "unweighted_mean",
]

logger = logging.getLogger(__name__)

# Category names travel between ranks as fixed-width UTF-8 bytes (tensor states only carry numbers).
CATEGORY_BYTES = 64
NO_KEY = -1
#: Column prefix of the per-defect-type image AUROC: ``image_auroc_<defect folder>``.
DEFECT_AUROC_PREFIX = "image_auroc_"


def defect_type(image_path: str | None) -> str:
    """The defect type of an image: its parent folder (``<category>/test/<defect>/<name>``, MVTec / Gogan layout).

    ``""`` when the path is unknown.
    """
    if not image_path:
        return ""
    return Path(str(image_path)).parent.name


def metric_columns(compute_pixel: bool = True, report_pro_repo: bool = False) -> list[str]:
    """Result columns in table order: image metrics, pixel metrics, optionally the repositories' PRO."""
    columns = list(F.IMAGE_METRICS)
    if compute_pixel:
        columns += list(F.PIXEL_METRICS)
        if report_pro_repo:
            columns.append(F.PRO_REPO_METRIC)
    return columns


def unweighted_mean(per_category: dict[str, dict[str, float]], columns: Sequence[str]) -> dict[str, float]:
    """Mean over categories, each weighing the same (the papers' convention).

    A category where a metric is undefined (NaN, e.g. AUROC without anomalies) is left out of that metric's mean.
    """
    mean = {}
    for column in columns:
        values = [row[column] for row in per_category.values() if not math.isnan(row.get(column, math.nan))]
        mean[column] = float(np.mean(values)) if values else math.nan
    return mean


def _path_key(path: str | None) -> int:
    """Stable 63-bit non-negative hash of an image path (Python's ``hash`` is salted per process)."""
    if not path:
        return NO_KEY
    digest = hashlib.blake2b(str(path).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _encode_category(name: str) -> list[int]:
    raw = name.encode("utf-8")
    if len(raw) > CATEGORY_BYTES:
        raise ValueError(f"category name longer than {CATEGORY_BYTES} bytes: {name!r}")
    return list(raw) + [0] * (CATEGORY_BYTES - len(raw))


def _decode_categories(codes: torch.Tensor) -> np.ndarray:
    return np.array([bytes(row).rstrip(b"\0").decode("utf-8") for row in codes.to(torch.uint8).numpy()], dtype=object)


def _world() -> tuple[int, int]:
    """(world size, rank) of the default process group, (1, 0) outside DDP."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor (sizes may differ) in rank order, on the CPU."""
    if _world()[0] == 1:
        return tensor
    # NCCL only moves CUDA tensors; gloo (CPU DDP) takes CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    parts = gather_all_tensors(tensor.to(device))
    return torch.cat([part.cpu() for part in parts])


class PerCategoryMetrics(TypedListStatesMixin):
    """All samples of a stage, evaluated per category with exact image and pixel metrics.

    Args:
        compute_pixel: Keep maps and masks and compute pixel metrics (skipped for samples without ``gt_mask``).
        fpr_limit: AU-PRO integration limit.
        report_pro_repo: Also compute the repositories' 200-threshold PRO (``pixel_pro_repo``).
        num_examples: Samples per category kept (on this rank) for overlays; anomalous ones first.
        curve_points: Points of the ROC / PRO curves returned per category (0: no curves).
        per_defect_type: Also compute, per category and defect type (the anomalous images' parent folder), the
            image AUROC of that type's images against the category's normal images (``image_auroc_<defect>``).
        **kwargs: torchmetrics ``Metric`` arguments.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        compute_pixel: bool = True,
        fpr_limit: float = F.DEFAULT_FPR_LIMIT,
        report_pro_repo: bool = False,
        num_examples: int = 0,
        curve_points: int = 0,
        per_defect_type: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.compute_pixel = compute_pixel
        self.fpr_limit = F.validate_fpr_limit(fpr_limit)
        self.report_pro_repo = report_pro_repo
        self.num_examples = int(num_examples)
        self.curve_points = int(curve_points)
        self.add_list_state("sample_key", (), torch.int64)
        self.add_list_state("category_code", (CATEGORY_BYTES,), torch.uint8)
        self.add_list_state("score", (), torch.float32)
        self.add_list_state("label", (), torch.uint8)
        self.add_list_state("has_score", (), torch.uint8)
        self.add_list_state("pixel_rank", (), torch.int64)  # -1: no pixels for this sample
        self.add_list_state("pixel_index", (), torch.int64)
        self.per_defect_type = bool(per_defect_type)
        if self.per_defect_type:  # defect names travel between ranks like category names
            self.add_list_state("defect_code", (CATEGORY_BYTES,), torch.uint8)
        self._clear_local()

    @property
    def columns(self) -> list[str]:
        """Metric names computed by this state, in table order."""
        return metric_columns(self.compute_pixel, self.report_pro_repo)

    def _clear_local(self) -> None:
        # Pixel data is deliberately not a torchmetrics state: syncing it all at once would gather the whole test set
        # onto every rank; compute() gathers it category by category instead.
        self._maps: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []  # np.packbits of the flattened mask
        self._shapes: list[tuple[int, int]] = []
        self._keys: list[int] = []
        self._examples: dict[str, dict[int, list[dict[str, Any]]]] = {}

    def reset(self) -> None:
        """Clear synced states and the locally held pixels."""
        super().reset()
        self._clear_local()

    # ----------------------------------------------------------------------------------------------------------------
    # update
    # ----------------------------------------------------------------------------------------------------------------

    def update(self, batch: Any) -> None:  # noqa: ANN401 - any anomalib ImageBatch
        """Record a scored batch.

        Args:
            batch: anomalib ``ImageBatch`` / ``ZSADBatch`` after the model's step: ``pred_score`` (B,) and/or
                ``anomaly_map`` (B, H, W) raw float scores, ``gt_label`` (B,), ``gt_mask`` (B, H, W) or None,
                ``image_path``, ``category`` (ZSADBatch) and ``image`` (only for overlays).

        Raises:
            ValueError: On NaN/inf scores or maps (naming the image), map/mask size mismatch, or no labels.
        """
        categories = batch_categories(batch)
        size = len(categories)
        paths = list(getattr(batch, "image_path", None) or [None] * size)
        scores = getattr(batch, "pred_score", None)
        maps = getattr(batch, "anomaly_map", None) if self.compute_pixel else None
        masks = getattr(batch, "gt_mask", None)
        labels = getattr(batch, "gt_label", None)

        if maps is not None:
            maps = maps.detach()
            maps = maps.squeeze(1) if maps.ndim == 4 else maps
            maps = maps.reshape(size, *maps.shape[-2:]).to("cpu", torch.float32)
        if masks is not None:
            masks = masks.detach()
            masks = masks.squeeze(1) if masks.ndim == 4 else masks
            masks = masks.reshape(size, *masks.shape[-2:]).to("cpu").bool()
        if labels is None:
            if masks is None:
                raise ValueError("batch has neither gt_label nor gt_mask: nothing to evaluate against")
            labels = masks.flatten(1).any(dim=1)
        labels = labels.detach().reshape(-1).to("cpu")
        if scores is not None:
            scores = scores.detach().reshape(-1).to("cpu", torch.float32)
            if not torch.isfinite(scores).all():
                bad = [paths[i] for i in torch.nonzero(~torch.isfinite(scores)).flatten().tolist()]
                raise ValueError(f"pred_score is NaN or infinite for {bad}")

        keys = [_path_key(p) for p in paths]
        _, rank = _world()
        pixel_rank, pixel_index = [-1] * size, [-1] * size
        if maps is not None and masks is not None:
            if maps.shape != masks.shape:
                raise ValueError(
                    f"anomaly_map {tuple(maps.shape)} and gt_mask {tuple(masks.shape)} differ: the method must return "
                    "maps at the mask resolution"
                )
            finite = torch.isfinite(maps.flatten(1)).all(dim=1)
            if not finite.all():
                bad = [paths[i] for i in torch.nonzero(~finite).flatten().tolist()]
                raise ValueError(f"anomaly_map contains NaN or infinite values for {bad}")
            for i in range(size):
                pixel_rank[i], pixel_index[i] = rank, len(self._maps)
                self._maps.append(maps[i].numpy().copy())  # own copy: do not keep the batch alive
                self._masks.append(np.packbits(masks[i].numpy().reshape(-1)))
                self._shapes.append((int(maps.shape[1]), int(maps.shape[2])))
                self._keys.append(keys[i])
            if self.num_examples and rank == 0:  # only rank 0 draws pictures
                self._keep_examples(batch, categories, paths, labels, maps, masks, scores)

        device = self.device
        self.sample_key.append(torch.tensor(keys, dtype=torch.int64, device=device))
        self.category_code.append(
            torch.tensor([_encode_category(c) for c in categories], dtype=torch.uint8, device=device)
        )
        self.score.append((scores if scores is not None else torch.zeros(size)).to(device))
        self.label.append(labels.to(device=device, dtype=torch.uint8))
        self.has_score.append(torch.full((size,), int(scores is not None), dtype=torch.uint8, device=device))
        self.pixel_rank.append(torch.tensor(pixel_rank, dtype=torch.int64, device=device))
        self.pixel_index.append(torch.tensor(pixel_index, dtype=torch.int64, device=device))
        if self.per_defect_type:
            self.defect_code.append(
                torch.tensor([_encode_category(defect_type(p)) for p in paths], dtype=torch.uint8, device=device)
            )

    def _keep_examples(
        self,
        batch: Any,  # noqa: ANN401
        categories: list[str],
        paths: list[str | None],
        labels: torch.Tensor,
        maps: torch.Tensor,
        masks: torch.Tensor,
        scores: torch.Tensor | None,
    ) -> None:
        """Keep the first ``num_examples`` anomalous and normal samples per category for the overlays."""
        from zsad.viz import denormalize_image

        images = getattr(batch, "image", None)
        for i, category in enumerate(categories):
            label = int(labels[i])
            kept = self._examples.setdefault(category, {0: [], 1: []})[label]
            if len(kept) >= self.num_examples or images is None:
                continue
            kept.append(
                {
                    "image": denormalize_image(images[i]),
                    "anomaly_map": maps[i].numpy().copy(),
                    "gt_mask": masks[i].numpy().copy(),
                    "image_path": paths[i],
                    "label": label,
                    "score": None if scores is None else float(scores[i]),
                }
            )

    # ----------------------------------------------------------------------------------------------------------------
    # compute
    # ----------------------------------------------------------------------------------------------------------------

    def compute(self) -> dict[str, Any]:
        """Per-category metrics (synced over ranks, duplicates dropped), plus what the pictures need.

        Returns:
            ``metrics`` {category: {metric: value}} (no mean; see :func:`unweighted_mean`), ``counts`` {category:
            {"images", "anomalous"}}, ``thresholds`` {category: pixel F1-max threshold}, ``ranges`` {category:
            (min, max) of the maps}, ``curves`` {category: {"image_roc"|"pixel_roc"|"pro": (x, y)}} and
            ``examples`` {category: [sample dicts]} (this rank's); with ``per_defect_type`` also ``defect_columns``
            (the sorted ``image_auroc_<defect>`` columns present in some category). Every rank returns the same
            numbers.
        """
        world, rank = _world()
        keys = self.cat_state("sample_key")
        categories = _decode_categories(self.cat_state("category_code"))
        scores = self.cat_state("score").numpy()
        labels = self.cat_state("label").numpy().astype(bool)
        has_score = self.cat_state("has_score").numpy().astype(bool)
        pixel_rank = self.cat_state("pixel_rank").numpy()
        pixel_index = self.cat_state("pixel_index").numpy()

        keep = self._first_occurrences(keys.numpy(), world)
        defects = _decode_categories(self.cat_state("defect_code")) if self.per_defect_type else None
        out: dict[str, Any] = {k: {} for k in ("metrics", "counts", "thresholds", "ranges", "curves", "examples")}
        for category in sorted(set(categories[keep].tolist())):
            selected = keep & (categories == category)
            row: dict[str, float] = {}
            curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            self._image_metrics(category, selected, has_score, scores, labels, row, curves)
            if defects is not None:
                row.update(self._defect_aurocs(selected & has_score, defects, scores, labels))
            if self.compute_pixel:
                self._pixel_metrics(category, selected, pixel_rank, pixel_index, rank, out, row, curves)
            out["metrics"][category] = row
            out["counts"][category] = {"images": int(selected.sum()), "anomalous": int(labels[selected].sum())}
            if curves:
                out["curves"][category] = curves
            if category in self._examples:
                chosen = self._examples[category][1] + self._examples[category][0]
                out["examples"][category] = chosen[: self.num_examples]
        if defects is not None:
            names = {c for row in out["metrics"].values() for c in row if c.startswith(DEFECT_AUROC_PREFIX)}
            out["defect_columns"] = sorted(names)
        return out

    @staticmethod
    def _defect_aurocs(
        usable: np.ndarray, defects: np.ndarray, scores: np.ndarray, labels: np.ndarray
    ) -> dict[str, float]:
        """``{image_auroc_<defect>: AUROC}``: each defect type's images against all normal images of the category."""
        normal = usable & ~labels
        row = {}
        for name in sorted(set(defects[usable & labels].tolist())):
            if not name:
                continue  # anomalous images without a path: no defect type
            chosen = normal | (usable & labels & (defects == name))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", F.UndefinedMetricWarning)  # no normal images: NaN in the table
                row[f"{DEFECT_AUROC_PREFIX}{name}"] = F.SortedScores.from_arrays(scores[chosen], labels[chosen]).auroc()
        return row

    @staticmethod
    def _first_occurrences(keys: np.ndarray, world: int) -> np.ndarray:
        """Mask of samples to evaluate: the first occurrence of each image-path hash; samples without a path kept."""
        keep = np.ones(keys.shape[0], dtype=bool)
        with_key = np.flatnonzero(keys != NO_KEY)
        _, first = np.unique(keys[with_key], return_index=True)
        keep[with_key] = False
        keep[with_key[first]] = True
        duplicates = int(with_key.size - first.size)
        if duplicates and world == 1:
            # Padding cannot explain duplicates in one process: the test set itself lists an image twice.
            warnings.warn(f"{duplicates} duplicate image paths evaluated once each", stacklevel=3)
        if world > 1 and with_key.size < keys.shape[0]:
            warnings.warn(
                "samples without image_path cannot be de-duplicated: DDP sampler padding may count some twice",
                stacklevel=3,
            )
        return keep

    def _image_metrics(
        self,
        category: str,
        selected: np.ndarray,
        has_score: np.ndarray,
        scores: np.ndarray,
        labels: np.ndarray,
        row: dict[str, float],
        curves: dict[str, tuple[np.ndarray, np.ndarray]],
    ) -> None:
        usable = selected & has_score
        if not usable.any():
            row.update(dict.fromkeys(F.IMAGE_METRICS, math.nan))
            return
        if usable.sum() < selected.sum():
            logger.warning("%s: %d images without pred_score left out of image metrics", category, selected.sum())
        n_anomalous = int(labels[usable].sum())
        if n_anomalous in (0, int(usable.sum())):
            # One class only: AUROC is undefined, and AP / F1-max would read 100 for *any* scores when every image is
            # anomalous — a perfect-looking number that measures nothing. All three are reported as NaN instead.
            missing = "normal (test/good/)" if n_anomalous else "anomalous (test/<defect>/)"
            logger.warning(
                "%s: no %s test images, so image AUROC/AP/F1-max are undefined and reported as NaN. Fix: add such "
                "images to the category's test split, or leave the category out.",
                category,
                missing,
            )
            row.update(dict.fromkeys(F.IMAGE_METRICS, math.nan))
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", F.UndefinedMetricWarning)  # NaN is reported in the table instead
            sorted_scores = F.SortedScores.from_arrays(scores[usable], labels[usable])
            row["image_auroc"] = sorted_scores.auroc()
            row["image_ap"] = sorted_scores.average_precision()
            row["image_f1max"] = sorted_scores.f1_max()[0]
        if self.curve_points:
            curves["image_roc"] = sorted_scores.roc_curve(self.curve_points)

    def _pixel_metrics(
        self,
        category: str,
        selected: np.ndarray,
        pixel_rank: np.ndarray,
        pixel_index: np.ndarray,
        rank: int,
        out: dict[str, Any],
        row: dict[str, float],
        curves: dict[str, tuple[np.ndarray, np.ndarray]],
    ) -> None:
        with_pixels = selected & (pixel_rank >= 0)
        # Every decision here depends only on synced states, so all ranks take the same branch (no collective
        # call can be left unmatched).
        if not with_pixels.any():
            row.update(dict.fromkeys(self.columns[len(F.IMAGE_METRICS) :], math.nan))
            return
        if with_pixels.sum() < selected.sum():
            logger.warning(
                "%s: %d of %d images have no anomaly_map/gt_mask and are left out of pixel metrics",
                category,
                int(selected.sum() - with_pixels.sum()),
                int(selected.sum()),
            )
        maps, masks = self._gather_pixels(np.sort(pixel_index[with_pixels & (pixel_rank == rank)]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", F.UndefinedMetricWarning)
            pixels = F.PixelScores.from_maps(maps, masks)
            del maps, masks
            row["pixel_auroc"] = pixels.scores.auroc()
            row["pixel_ap"] = pixels.scores.average_precision()
            row["pixel_f1max"], out["thresholds"][category] = pixels.scores.f1_max()
            row["pixel_aupro"] = pixels.aupro(self.fpr_limit)
            if self.report_pro_repo:
                row[F.PRO_REPO_METRIC] = pixels.pro_repo(self.fpr_limit)
        ends = [a[[0, -1]] for a in (pixels.scores.negatives, pixels.scores.positives) if a.size]
        out["ranges"][category] = (float(min(e[0] for e in ends)), float(max(e[1] for e in ends)))
        if self.curve_points:
            curves["pixel_roc"] = pixels.scores.roc_curve(self.curve_points)
            curves["pro"] = pixels.pro_curve(self.curve_points, self.fpr_limit)

    def _gather_pixels(self, local_indices: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """One category's maps and masks from every rank, in canonical (path-hash) order."""
        local = local_indices.tolist()
        if _world()[0] == 1:  # no copy of the stored maps: they are read in place
            masks = [
                np.unpackbits(self._masks[i], count=h * w).view(bool).reshape(h, w)
                for i, (h, w) in ((i, self._shapes[i]) for i in local)
            ]
            order = np.argsort(np.array([self._keys[i] for i in local], dtype=np.int64), kind="stable")
            return [self._maps[local[i]] for i in order], [masks[i] for i in order]
        shapes = torch.tensor([self._shapes[i] for i in local], dtype=torch.int64).reshape(-1, 2)
        keys = torch.tensor([self._keys[i] for i in local], dtype=torch.int64)
        flat_maps = torch.from_numpy(
            np.concatenate([self._maps[i].reshape(-1) for i in local]) if local else np.empty(0, np.float32)
        )
        packed = torch.from_numpy(np.concatenate([self._masks[i] for i in local]) if local else np.empty(0, np.uint8))
        shapes, keys, flat_maps, packed = (_gather_cat(t) for t in (shapes, keys, flat_maps, packed))

        maps, masks, map_offset, mask_offset = [], [], 0, 0
        flat_maps_np, packed_np = flat_maps.numpy(), packed.numpy()
        for height, width in shapes.tolist():
            n_pixels, n_bytes = height * width, (height * width + 7) // 8
            maps.append(flat_maps_np[map_offset : map_offset + n_pixels].reshape(height, width))
            bits = np.unpackbits(packed_np[mask_offset : mask_offset + n_bytes], count=n_pixels)
            masks.append(bits.view(bool).reshape(height, width))
            map_offset, mask_offset = map_offset + n_pixels, mask_offset + n_bytes
        # Same order whatever the rank layout, so even floating-point sums are reproduced bit for bit.
        order = np.argsort(keys.numpy(), kind="stable")
        return [maps[i] for i in order], [masks[i] for i in order]
