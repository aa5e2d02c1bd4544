"""The one evaluator every zsad method uses: exact per-category metrics, results files, pictures and W&B.

:class:`ZSADEvaluator` is an anomalib :class:`~anomalib.metrics.Evaluator` (an ``nn.Module`` and a Lightning
``Callback``), so ``AnomalibModule(evaluator=ZSADEvaluator(...))`` and ``configure_evaluator()`` accept it and
``configure_callbacks()`` registers it. The model's ``validation_step`` / ``test_step`` fill ``pred_score`` and
``anomaly_map`` on the batch in place (raw scores, float32); the evaluator then

* accumulates each batch in ``on_{validation,test}_batch_end`` (:class:`~zsad.metrics.per_category.PerCategoryMetrics`),
* at epoch end computes, per category, image AUROC / AP / F1-max and pixel AUROC / AP / F1-max / AU-PRO (optionally the
  repositories' PRO) exactly, then the unweighted mean over categories,
* logs ``{stage}/{dataset}/{category}/{metric}`` and ``{stage}/{dataset}/mean/{metric}`` with ``pl_module.log``,
* after testing writes ``metrics.csv`` / ``metrics.json`` / ``metrics.md`` atomically to ``output_dir`` (else
  ``trainer.log_dir``, else ``trainer.default_root_dir``), prints the table, and with ``save_images > 0`` writes
  overlays (``images/<category>/``) and ROC / PRO curves (``curves/<category>.png``); if a ``WandbLogger`` is
  attached it also logs the table as a ``wandb.Table`` and the pictures.

Under DDP every rank computes the same numbers from synced, de-duplicated states; only rank 0 writes files and logs to
W&B. Sanity-check validation batches are ignored.

Example:
    >>> evaluator = ZSADEvaluator(stages=("test",), save_images=2, output_dir="runs/demo")
    >>> model = MyZSADModule(evaluator=evaluator)  # doctest: +SKIP
    >>> lightning.Trainer().test(model, datamodule=dm)  # doctest: +SKIP
    >>> evaluator.results["mean"]["pixel_aupro"]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from anomalib.metrics import Evaluator
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.types import STEP_OUTPUT

from zsad.data.dataclasses import batch_categories
from zsad.metrics import functional as F
from zsad.metrics.per_category import PerCategoryMetrics, unweighted_mean
from zsad.metrics.report import MEAN_ROW, print_results, results_rows, write_results

__all__ = ["STAGES", "ZSADEvaluator", "dataset_name"]

logger = logging.getLogger(__name__)

STAGES = ("val", "test")
CURVE_POINTS = 512


def dataset_name(trainer: Trainer, stage: str = "test") -> str:
    """The dataset part of logged keys: the datamodule's ``val_name`` (validation) or ``name``, else its class name.

    A cross-dataset run validating on a held-out part of its *source* logs ``val/<source>/...`` and tests as
    ``test/<target>/...``.
    """
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None:
        return "dataset"
    name = getattr(datamodule, "val_name", None) if stage == "val" else None
    return name or getattr(datamodule, "name", None) or type(datamodule).__name__.lower()


RESOLUTIONS = ("input", "native")


def native_resolution_samples(batch: Any, mask_threshold: int | None = None) -> list[SimpleNamespace]:  # noqa: ANN401
    """Split a scored batch into single samples at the image files' resolution.

    anomalib's ``PreProcessor`` resizes ``gt_mask`` to the model input, so native-resolution evaluation (the official
    MVTec AU-PRO; Gogan at 256x256) reads each mask from its file and resizes the anomaly map to it (bilinear,
    ``align_corners=False``), sample by sample because file sizes may differ within a batch (VisA).

    Args:
        batch: A scored anomalib / zsad batch with ``image_path``, ``mask_path``, ``gt_label`` and ``anomaly_map``.
        mask_threshold: Mask binarisation threshold (``None``: the data layer's automatic rule).

    Returns:
        One batch-like object of size 1 per sample, accepted by the per-category store.
    """
    from zsad.data.files import read_native_masks

    categories = batch_categories(batch)
    masks = read_native_masks(batch.image_path, batch.mask_path, batch.gt_label, threshold=mask_threshold)
    maps = batch.anomaly_map.detach().float()
    maps = maps.squeeze(1) if maps.ndim == 4 else maps
    scores = getattr(batch, "pred_score", None)
    image = getattr(batch, "image", None)
    samples = []
    for i, mask in enumerate(masks):
        size = tuple(mask.shape)
        native_map = torch.nn.functional.interpolate(maps[i][None, None], size=size, mode="bilinear")[0]
        native_image = None
        if image is not None:  # for the overlays, which draw image, mask and map on one grid
            native_image = torch.nn.functional.interpolate(image[i : i + 1].float(), size=size, mode="bilinear")
        samples.append(
            SimpleNamespace(
                category=[categories[i]],
                image_path=[batch.image_path[i]],
                pred_score=None if scores is None else scores[i : i + 1],
                anomaly_map=native_map,
                gt_mask=mask[None],
                gt_label=batch.gt_label[i : i + 1],
                image=native_image,
            )
        )
    return samples


class ZSADEvaluator(Evaluator):
    """Exact per-category evaluation of raw anomaly scores for validation and test.

    Args:
        stages: Stages to evaluate, a subset of ``("val", "test")``.
        compute_pixel: Compute pixel metrics (needs ``anomaly_map`` and ``gt_mask``; skipped where absent).
        fpr_limit: AU-PRO integration limit (official MVTec: 0.3).
        report_pro_repo: Add ``pixel_pro_repo``, the AnomalyCLIP/APRIL-GAN 200-threshold "PRO", for comparisons
            with those papers (it is not AU-PRO).
        save_images: Overlays per category (anomalous first) written after testing, together with the ROC / PRO
            curve plots; also logged to W&B. 0 disables all pictures.
        resolution: ``"input"`` evaluates pixels at the model input size (the papers' convention); ``"native"`` at
            each image file's size (masks read from disk, maps resized bilinearly; official AU-PRO, Gogan at 256).
        mask_threshold: Mask binarisation threshold for ``"native"`` (``None``: the data layer's automatic rule).
        output_dir: Folder of the results files; default ``<trainer.log_dir>/results`` (else under
            ``trainer.default_root_dir``).
        per_defect_type: Add per category the image AUROC of each defect type (the anomalous images' parent folder,
            as MVTec AD and Gogan lay them out) against the category's normal images: columns
            ``image_auroc_<defect>`` in the results files and logged keys; the ``mean`` row averages the
            categories having that type.

    Attributes:
        results: Last computed table ``{category: {metric: value}}`` including the ``"mean"`` row (fractions).
        results_by_stage: The last table of each stage.
    """

    def __init__(
        self,
        stages: Sequence[str] = STAGES,
        compute_pixel: bool = True,
        fpr_limit: float = F.DEFAULT_FPR_LIMIT,
        report_pro_repo: bool = False,
        save_images: int = 0,
        output_dir: str | None = None,
        resolution: str = "input",
        mask_threshold: int | None = None,
        per_defect_type: bool = False,
    ) -> None:
        super().__init__(val_metrics=None, test_metrics=None, compute_on_cpu=False)
        stages = (stages,) if isinstance(stages, str) else tuple(stages)
        unknown = set(stages) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
        if save_images < 0:
            raise ValueError(f"save_images must be >= 0, got {save_images}")
        self.stages = stages
        self.compute_pixel = compute_pixel
        self.fpr_limit = F.validate_fpr_limit(fpr_limit)
        self.report_pro_repo = report_pro_repo
        self.save_images = int(save_images)
        self.output_dir = output_dir
        if resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
        self.resolution = resolution
        self.mask_threshold = mask_threshold
        self.per_defect_type = bool(per_defect_type)
        self.val_state = PerCategoryMetrics(
            compute_pixel, self.fpr_limit, report_pro_repo, per_defect_type=self.per_defect_type
        )
        self.test_state = PerCategoryMetrics(
            compute_pixel,
            self.fpr_limit,
            report_pro_repo,
            num_examples=self.save_images,
            curve_points=CURVE_POINTS if self.save_images else 0,
            per_defect_type=self.per_defect_type,
        )
        self.results: dict[str, dict[str, float]] = {}
        self.results_by_stage: dict[str, dict[str, dict[str, float]]] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Nothing to move: pixel data is kept in host RAM by construction (anomalib's base moves metrics here)."""
        del trainer, pl_module, stage

    # ----------------------------------------------------------------------------------------------------------------
    # Lightning hooks
    # ----------------------------------------------------------------------------------------------------------------

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start from an empty validation state."""
        del trainer, pl_module
        self.val_state.reset()

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: STEP_OUTPUT | None,
        batch: Any,  # noqa: ANN401
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Accumulate a scored validation batch (sanity-check batches are ignored)."""
        del pl_module, outputs, batch_idx, dataloader_idx
        if "val" in self.stages and not trainer.sanity_checking:
            self._update(self.val_state, batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Compute and log validation metrics."""
        if "val" in self.stages and not trainer.sanity_checking:
            self._finish("val", trainer, pl_module)
        self.val_state.reset()

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start from an empty test state."""
        del trainer, pl_module
        self.test_state.reset()

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: STEP_OUTPUT | None,
        batch: Any,  # noqa: ANN401
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Accumulate a scored test batch."""
        del trainer, pl_module, outputs, batch_idx, dataloader_idx
        if "test" in self.stages:
            self._update(self.test_state, batch)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Compute and log test metrics, write the results files, pictures and W&B table."""
        if "test" in self.stages:
            self._finish("test", trainer, pl_module)
        self.test_state.reset()

    def _update(self, state: PerCategoryMetrics, batch: Any) -> None:  # noqa: ANN401
        native = self.resolution == "native" and self.compute_pixel and getattr(batch, "anomaly_map", None) is not None
        for sample in native_resolution_samples(batch, self.mask_threshold) if native else [batch]:
            state.update(sample)

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: STEP_OUTPUT | None,
        batch: Any,  # noqa: ANN401
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """``zsad predict`` with ``save_images > 0``: an overlay PNG per predicted image under ``predictions/``."""
        del pl_module, outputs, dataloader_idx
        if self.save_images and getattr(batch, "anomaly_map", None) is not None:
            from zsad.viz import save_overlays  # matplotlib only when pictures are asked for

            out_dir = Path(self.output_dir or trainer.default_root_dir) / "predictions"
            save_overlays(batch, out_dir, start_index=batch_idx * len(batch.anomaly_map))

    # ----------------------------------------------------------------------------------------------------------------
    # Epoch end
    # ----------------------------------------------------------------------------------------------------------------

    def _finish(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        state = self.val_state if stage == "val" else self.test_state
        output = state.compute()  # collective under DDP: every rank gets here
        per_category: dict[str, dict[str, float]] = output["metrics"]
        if not per_category:
            logger.warning("%s: no samples were evaluated", stage)
            return
        columns = state.columns + output.get("defect_columns", [])
        table = {**per_category, MEAN_ROW: unweighted_mean(per_category, columns)}
        self.results = table
        self.results_by_stage[stage] = table
        dataset = dataset_name(trainer, stage)
        for category, values in table.items():
            for metric, value in values.items():
                if math.isnan(value):
                    continue  # undefined (e.g. AUROC of a category without anomalies): shown in the table only
                # Identical on every rank; sync_dist=True averages equal numbers (exact) and keeps Lightning quiet.
                pl_module.log(f"{stage}/{dataset}/{category}/{metric}", value, on_epoch=True, sync_dist=True)
        if stage == "test":
            self._report(trainer, output, table, columns, dataset, stage)

    def _resolve_output_dir(self, trainer: Trainer) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        log_dir = trainer.log_dir  # a broadcast under DDP: must run on every rank
        # A subfolder: Lightning's CSVLogger writes its own metrics.csv into log_dir.
        return Path(log_dir or trainer.default_root_dir) / "results"

    def _report(
        self,
        trainer: Trainer,
        output: dict[str, Any],
        table: dict[str, dict[str, float]],
        columns: list[str],
        dataset: str,
        stage: str,
    ) -> None:
        out_dir = self._resolve_output_dir(trainer)
        if not trainer.is_global_zero:
            return
        rows = results_rows({k: v for k, v in table.items() if k != MEAN_ROW}, columns)
        written = write_results(out_dir, rows, columns)
        print_results(rows, columns, title=f"{stage} / {dataset}: {len(rows) - 1} categories -> {written['md']}")
        wandb_loggers = self._wandb_loggers(trainer)
        pictures = self._pictures(output, table, out_dir, render=bool(wandb_loggers)) if self.save_images else {}
        if wandb_loggers:
            self._log_wandb(wandb_loggers, f"{stage}/{dataset}", rows, columns, pictures)

    @staticmethod
    def _log_wandb(
        wandb_loggers: list[Any], prefix: str, rows: list[dict[str, Any]], columns: list[str], pictures: dict[str, Any]
    ) -> None:
        """One ``log`` call (one W&B step) with the results table, the overlays and the curves."""
        import wandb

        payload: dict[str, Any] = {
            f"{prefix}/results": wandb.Table(
                columns=["category", *columns],
                data=[[row["category"], *(float(row[c]) for c in columns)] for row in rows],
            )
        }
        for category, (images, captions) in pictures.get("overlays", {}).items():
            payload[f"{prefix}/{category}/overlays"] = [
                wandb.Image(image, caption=caption) for image, caption in zip(images, captions, strict=True)
            ]
        if pictures.get("curves"):
            images, captions = pictures["curves"]
            payload[f"{prefix}/curves"] = [
                wandb.Image(image, caption=caption) for image, caption in zip(images, captions, strict=True)
            ]
        for wandb_logger in wandb_loggers:
            wandb_logger.log_metrics(payload)

    @staticmethod
    def _wandb_loggers(trainer: Trainer) -> list[Any]:
        from lightning.pytorch.loggers import WandbLogger

        return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]

    def _pictures(
        self, output: dict[str, Any], table: dict[str, dict[str, float]], out_dir: Path, render: bool
    ) -> dict[str, Any]:
        """Write overlays and curve plots; return rendered arrays (for W&B) when ``render``."""
        from zsad.viz import curves_figure, figure_to_array, overlay_figure, sample_name, save_figure

        overlays: dict[str, tuple[list[np.ndarray], list[str]]] = {}
        for category, examples in output["examples"].items():
            vmin, vmax = output["ranges"].get(category, (None, None))
            threshold = output["thresholds"].get(category)
            threshold = None if threshold is None or math.isnan(threshold) else threshold
            images, captions = [], []
            for index, example in enumerate(examples):
                caption = f"{example['image_path'] or f'sample {index}'}"
                if example["score"] is not None:
                    caption += f"  (score {example['score']:.4g})"
                fig = overlay_figure(
                    example["image"], example["anomaly_map"], example["gt_mask"], threshold, vmin, vmax, caption
                )
                save_figure(fig, out_dir / "images" / category / f"{sample_name(example['image_path'], index)}.png")
                if render:
                    images.append(figure_to_array(fig))
                    captions.append(caption)
            if images:
                overlays[category] = (images, captions)
        curve_images, curve_captions = [], []
        for category, curves in output["curves"].items():
            fig = curves_figure(curves, table[category], self.fpr_limit, title=category)
            save_figure(fig, out_dir / "curves" / f"{category}.png")
            if render:
                curve_images.append(figure_to_array(fig))
                curve_captions.append(category)
        return {"overlays": overlays, "curves": (curve_images, curve_captions) if curve_images else None}
