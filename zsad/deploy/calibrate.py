"""``zsad calibrate``: decision thresholds for a trained model, written into a new checkpoint.

Two ways, chosen explicitly (a zero-shot user never calibrates on the target's test labels by accident):

* ``--target_fpr 0.01``: on **normal** images of the target (e.g. a few good parts in a folder,
  ``--data zsad.data.Images``), the image threshold flags at most 1 % of their scores and the pixel threshold at most
  1 % of their pixels (``--pixel_target_fpr`` sets the pixel rate apart). On a labelled datamodule only its normal
  images (``gt_label == 0``) are used.
* ``--metric f1``: on **labelled** images (anomalib / zsad datamodules with labels and masks), the F1-max thresholds
  of image scores and of pixels, as the evaluator's F1-max.

The scores come from ``zsad predict`` machinery (any datamodule, same pre-processing), the thresholds are stored
under ``zsad_thresholds`` (:mod:`zsad.deploy.thresholds`) in a copy of the checkpoint; ``zsad predict`` and
``zsad export`` then use them.

Examples:
    zsad calibrate --ckpt_path last.ckpt --data zsad.data.Images --data.root good_parts/ --target_fpr 0.01
    zsad calibrate --ckpt_path last.ckpt --data zsad.data.MVTecAD --data.root mvtec --data.category bottle --metric f1
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from zsad.atomic import atomic_path
from zsad.cli import ZSADCLI, build_cli
from zsad.deploy.thresholds import CHECKPOINT_KEY, Thresholds, flag_rate, threshold_at_fpr, threshold_f1
from zsad.deploy.writer import PredictionWriter


class ScoreCollector(Callback):
    """Keep every predicted score and map (CPU, model resolution) with the labels and masks when the data has them."""

    def __init__(self) -> None:
        self.scores: list[np.ndarray] = []
        self.maps: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.paths: list[str] = []

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,  # noqa: ANN401
        batch: Any,  # noqa: ANN401
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Store the batch's predictions and ground truth."""
        del trainer, pl_module, outputs, batch_idx, dataloader_idx
        scores = batch.pred_score.detach().float().cpu().reshape(-1).numpy()
        self.scores.append(scores)
        maps = getattr(batch, "anomaly_map", None)
        if maps is not None:
            self.maps.append(maps.detach().float().cpu().reshape(len(scores), *maps.shape[-2:]).numpy())
        labels = getattr(batch, "gt_label", None)
        if labels is not None:
            self.labels.append(labels.detach().cpu().reshape(-1).numpy().astype(bool))
        masks = getattr(batch, "gt_mask", None)
        if masks is not None:
            self.masks.append(masks.detach().cpu().reshape(len(scores), *masks.shape[-2:]).numpy().astype(bool))
        self.paths.extend(str(p) for p in (getattr(batch, "image_path", None) or []))

    def arrays(self) -> dict[str, np.ndarray | None]:
        """Concatenated scores, maps, labels and masks (``None`` where the data had none for some batch)."""
        n_batches = len(self.scores)

        def cat(parts: list[np.ndarray]) -> np.ndarray | None:
            return np.concatenate(parts) if parts and len(parts) == n_batches else None

        return {
            "scores": cat(self.scores),
            "maps": cat(self.maps),
            "labels": cat(self.labels),
            "masks": cat(self.masks),
        }


class CalibrateCLI(ZSADCLI):
    """``zsad predict`` whose only output is the collected scores (the predictions writer is left out)."""

    collector: ScoreCollector

    def before_predict(self) -> None:
        """Swap the predictions writer for the score collector."""
        self.trainer.callbacks = [c for c in self.trainer.callbacks if not isinstance(c, PredictionWriter)]
        self.trainer.callbacks.append(self.collector)


def compute_thresholds(
    arrays: dict[str, np.ndarray | None],
    target_fpr: float | None = None,
    pixel_target_fpr: float | None = None,
    metric: str | None = None,
) -> Thresholds:
    """Image and pixel thresholds from collected predictions (see the module docstring for the two modes).

    Args:
        arrays: ``scores`` ``[N]``, ``maps`` ``[N, H, W]`` or ``None``, ``labels`` ``[N]`` or ``None``, ``masks``
            ``[N, H, W]`` or ``None``.
        target_fpr: Image false-positive rate on the normal images (mode 1).
        pixel_target_fpr: Pixel false-positive rate (default: ``target_fpr``).
        metric: ``"f1"`` (mode 2).

    Returns:
        The thresholds with their provenance (counts and achieved rates on the calibration data).
    """
    scores, maps, labels, masks = arrays["scores"], arrays["maps"], arrays["labels"], arrays["masks"]
    if scores is None or scores.size == 0:
        msg = "the datamodule produced no predictions to calibrate on."
        raise ValueError(msg)
    if (target_fpr is None) == (metric is None):
        msg = "choose exactly one of --target_fpr (normal images) and --metric f1 (labelled images)."
        raise ValueError(msg)
    if metric is not None:
        if metric != "f1":
            msg = f"metric must be 'f1', got {metric!r}."
            raise ValueError(msg)
        if labels is None or not labels.any() or labels.all():
            msg = "--metric f1 needs labelled normal and anomalous images (a datamodule with gt_label)."
            raise ValueError(msg)
        image = threshold_f1(scores, labels)
        pixel = None
        if maps is not None and masks is not None and masks.any():
            pixel = threshold_f1(maps, masks)
        info = {"method": "f1", "n_images": int(scores.size), "n_anomalous": int(labels.sum())}
        return Thresholds(image, pixel, info)
    pixel_rate = target_fpr if pixel_target_fpr is None else pixel_target_fpr
    normal = np.ones(scores.size, bool) if labels is None else ~labels
    if not normal.any():
        msg = "--target_fpr needs normal images; every image of the datamodule is labelled anomalous."
        raise ValueError(msg)
    image = threshold_at_fpr(scores[normal], target_fpr)
    info: dict[str, Any] = {
        "method": "target_fpr",
        "target_fpr": float(target_fpr),
        "n_images": int(normal.sum()),
        "image_fpr": flag_rate(scores[normal], image),
        "labels_used": labels is not None,
    }
    pixel = None
    if maps is not None:
        pixel = threshold_at_fpr(maps[normal], pixel_rate)
        info.update(
            pixel_target_fpr=float(pixel_rate),
            n_pixels=int(maps[normal].size),
            pixel_fpr=flag_rate(maps[normal], pixel),
        )
    return Thresholds(image, pixel, info)


def write_calibrated(ckpt_path: str | Path, thresholds: Thresholds, output: str | Path) -> Path:
    """Copy a checkpoint with ``zsad_thresholds`` set (loaded and saved as plain data, ``weights_only``-safe)."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    checkpoint[CHECKPOINT_KEY] = thresholds.to_dict()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        torch.save(checkpoint, tmp)
    return output


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """``zsad calibrate``'s own options; the rest (``--data ...``, ``--trainer ...``) goes to the Lightning CLI."""
    parser = argparse.ArgumentParser(
        prog="zsad calibrate",
        description="Calibrate image and pixel decision thresholds of a trained model and write them into a new "
        "checkpoint. Other options (--data ..., --trainer ...) are those of `zsad predict`.",
    )
    parser.add_argument("--ckpt_path", required=True, help="Checkpoint of a zsad run.")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--target_fpr", type=float, help="False-positive rate allowed on NORMAL images, e.g. 0.01.")
    mode.add_argument("--metric", choices=["f1"], help="F1-max thresholds on LABELLED images (uses their labels).")
    parser.add_argument("--pixel_target_fpr", type=float, default=None, help="Pixel FPR (default: --target_fpr).")
    parser.add_argument("--output", default=None, help="New checkpoint (default: <ckpt stem>-calibrated.ckpt).")
    return parser.parse_known_args(list(argv))


def main(argv: Sequence[str] | None = None) -> Path:
    """Entry point of ``zsad calibrate``."""
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    ckpt = Path(args.ckpt_path)
    if not ckpt.is_file():
        raise SystemExit(f"{ckpt} does not exist; pass the checkpoint of a `zsad fit` run.")
    output = Path(args.output) if args.output else ckpt.with_name(f"{ckpt.stem}-calibrated.ckpt")
    CalibrateCLI.collector = ScoreCollector()
    lightning_args = ["predict", "--ckpt_path", str(ckpt), "--return_predictions=false", *rest]
    build_cli(lightning_args, cli_class=CalibrateCLI)
    thresholds = compute_thresholds(
        CalibrateCLI.collector.arrays(), args.target_fpr, args.pixel_target_fpr, args.metric
    )
    info = dict(thresholds.calibration, checkpoint=str(ckpt), date=datetime.now(UTC).isoformat(timespec="seconds"))
    thresholds = Thresholds(thresholds.image_threshold, thresholds.pixel_threshold, info)
    written = write_calibrated(ckpt, thresholds, output)
    rates = ", ".join(f"{k}={info[k]:.4g}" for k in ("image_fpr", "pixel_fpr") if k in info)
    print(  # noqa: T201
        f"image threshold {thresholds.image_threshold!r}, pixel threshold {thresholds.pixel_threshold!r} "
        f"({info['method']} on {info['n_images']} images{'; ' + rates if rates else ''}); wrote {written}",
    )
    return written


if __name__ == "__main__":
    main()
