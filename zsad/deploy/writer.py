"""``zsad predict`` output: ``predictions.csv``, ``predictions.jsonl`` with regions, anomaly maps and overlays.

:class:`PredictionWriter` is a Lightning :class:`~lightning.pytorch.callbacks.BasePredictionWriter`; the CLI adds it
to every run (``--predictions.*`` options), so ``zsad predict`` on any datamodule writes, per input image:

* a CSV row ``image_path, pred_score, pred_label, calibrated, image_threshold, n_regions, anomaly_map, overlay``;
  ``pred_label`` is empty and ``calibrated`` false when the model carries no thresholds (see
  :mod:`zsad.deploy.thresholds`): a label is never made up;
* a JSON line with the same fields plus the image size, the pixel threshold and the ``regions`` (connected
  components of ``anomaly_map >= pixel_threshold``, each with bounding box, area in pixels and maximum score);
* on request the anomaly map (``.npy`` float32, or a 16-bit PNG of the map clipped to ``[0, 1]``) and an overlay PNG.

Maps, regions and overlays are at the image's own resolution by default (``map_resolution="native"``: the model's
``S x S`` map resized bilinearly to the EXIF-oriented image size), so boxes are pixel coordinates of the user's file.
Output files are named after the input path relative to the datamodule's ``root`` folder (or the working directory)
with the suffix kept, so ``a/img1.png`` and ``a/img1.jpg`` never overwrite each other.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from scipy import ndimage

from zsad.data.files import read_image_size
from zsad.deploy.thresholds import CHECKPOINT_KEY, Thresholds

logger = logging.getLogger(__name__)

CSV_COLUMNS = (
    "image_path",
    "pred_score",
    "pred_label",
    "calibrated",
    "image_threshold",
    "n_regions",
    "anomaly_map",
    "overlay",
)
MapFormat = Literal["none", "npy", "png16"]


def connected_regions(anomaly_map: np.ndarray, threshold: float) -> list[dict[str, Any]]:
    """Connected components of ``anomaly_map >= threshold`` (SciPy's default 4-connectivity), in label order.

    Args:
        anomaly_map: ``[H, W]`` scores.
        threshold: Pixel threshold (compared in float32, like everywhere else).

    Returns:
        One dict per region: ``bbox`` ``[x_min, y_min, x_max, y_max]`` (inclusive pixel indices), ``area`` (pixels)
        and ``max_score``.
    """
    scores = np.asarray(anomaly_map, dtype=np.float32)
    labels, count = ndimage.label(scores >= np.float32(threshold))
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    areas = np.bincount(labels.reshape(-1), minlength=count + 1)[1:]
    maxima = ndimage.maximum(scores, labels, index)
    regions = []
    for box, area, peak in zip(ndimage.find_objects(labels), areas, maxima, strict=True):
        rows, cols = box
        regions.append(
            {
                "bbox": [int(cols.start), int(rows.start), int(cols.stop - 1), int(rows.stop - 1)],
                "area": int(area),
                "max_score": float(peak),
            }
        )
    return regions


def output_name(image_path: str, root: Path | None = None) -> Path:
    """Relative output name of an input: its path below ``root`` (else the working directory), suffix kept.

    The name is a function of the path alone, so it is unique per input and stable across runs; ``img1.png`` and
    ``img1.jpg`` map to ``img1.png`` / ``img1.jpg`` (+ the output's own suffix).
    """
    path = Path(image_path).resolve()
    for base in (root, Path.cwd()):
        if base is not None:
            try:
                return path.relative_to(Path(base).resolve())
            except ValueError:
                continue
    return Path(*path.parts[1:])  # outside both: the absolute path without its anchor


def resize_map(anomaly_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``) of an ``[h, w]`` map to ``size``."""
    if tuple(anomaly_map.shape[-2:]) == tuple(size):
        return anomaly_map
    return F.interpolate(anomaly_map[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]


def save_map(anomaly_map: np.ndarray, path: Path, fmt: MapFormat) -> Path:
    """Write a map as ``.npy`` (float32) or as a 16-bit PNG of ``clip(map, 0, 1) * 65535``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "npy":
        np.save(path, anomaly_map.astype(np.float32))
    else:
        from PIL import Image

        scaled = np.round(np.clip(anomaly_map, 0.0, 1.0) * 65535.0).astype(np.uint16)
        Image.fromarray(scaled).save(path)
    return path


class PredictionWriter(BasePredictionWriter):
    """Write scores, labels, regions, maps and overlays of ``zsad predict`` (see the module docstring).

    Args:
        output_dir: Folder of the outputs; default ``<run log dir>/predictions``.
        save_maps: ``"none"``, ``"npy"`` (float32 arrays) or ``"png16"`` (16-bit PNG of the map clipped to [0, 1]).
        save_overlays: Also write an image | heat-map overlay PNG per input (regions outlined when calibrated).
        map_resolution: ``"native"`` (each image's own size, EXIF-oriented) or ``"input"`` (the model's ``S x S``).
        image_threshold: Overrides the model's calibrated image threshold.
        pixel_threshold: Overrides the model's calibrated pixel threshold.
        enabled: ``False`` writes nothing (e.g. when only the evaluator's overlays are wanted).
    """

    def __init__(
        self,
        output_dir: str | None = None,
        save_maps: MapFormat = "none",
        save_overlays: bool = False,
        map_resolution: Literal["native", "input"] = "native",
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        enabled: bool = True,
    ) -> None:
        super().__init__(write_interval="batch")
        if save_maps not in ("none", "npy", "png16"):
            msg = f"save_maps must be 'none', 'npy' or 'png16', got {save_maps!r}."
            raise ValueError(msg)
        if map_resolution not in ("native", "input"):
            msg = f"map_resolution must be 'native' or 'input', got {map_resolution!r}."
            raise ValueError(msg)
        self.output_dir = output_dir
        self.save_maps = save_maps
        self.save_overlays = save_overlays
        self.map_resolution = map_resolution
        self.overrides = Thresholds(image_threshold, pixel_threshold, {"method": "given on the command line"})
        self.enabled = enabled
        self.thresholds = Thresholds()
        self.out_dir: Path | None = None
        self.csv_path: Path | None = None
        self.jsonl_path: Path | None = None
        self.rows = 0
        self._root: Path | None = None

    # -- set-up -----------------------------------------------------------------------------------------------------

    def _resolve_thresholds(self, pl_module: LightningModule) -> Thresholds:
        stored = Thresholds.from_dict(getattr(pl_module, CHECKPOINT_KEY, None))
        image = self.overrides.image_threshold
        pixel = self.overrides.pixel_threshold
        if image is None and pixel is None:
            return stored
        return Thresholds(
            image if image is not None else stored.image_threshold,
            pixel if pixel is not None else stored.pixel_threshold,
            {"method": "command line", "stored": stored.to_dict()},
        )

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Open the CSV / JSONL files (rank 0 writes ``predictions``, other ranks ``predictions.rank<r>``)."""
        if not self.enabled:
            return
        base = self.output_dir or os.path.join(trainer.log_dir or trainer.default_root_dir, "predictions")
        self.out_dir = Path(base)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        suffix = "" if trainer.global_rank == 0 else f".rank{trainer.global_rank}"
        self.csv_path = self.out_dir / f"predictions{suffix}.csv"
        self.jsonl_path = self.out_dir / f"predictions{suffix}.jsonl"
        with self.csv_path.open("w", newline="") as handle:
            csv.writer(handle).writerow(CSV_COLUMNS)
        self.jsonl_path.write_text("")
        self.rows = 0
        self.thresholds = self._resolve_thresholds(pl_module)
        datamodule = getattr(trainer, "datamodule", None)
        root = getattr(datamodule, "root_dir", None) or getattr(datamodule, "root", None)
        self._root = Path(root) if isinstance(root, str | Path) and Path(root).is_dir() else None
        if not self.thresholds.calibrated:
            logger.warning(
                "The model has no calibrated thresholds: pred_label stays empty (calibrated=false). Run `zsad "
                "calibrate --ckpt_path <ckpt> --data ... --target_fpr 0.01` on a few normal images first."
            )

    # -- per batch --------------------------------------------------------------------------------------------------

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,  # noqa: ANN401
        batch_indices: Sequence[int] | None,
        batch: Any,  # noqa: ANN401
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Append a CSV row and a JSON line per image (+ map / overlay files)."""
        del trainer, pl_module, prediction, batch_indices, dataloader_idx
        if not self.enabled or self.csv_path is None:
            return
        scores = batch.pred_score.detach().float().cpu().reshape(-1)
        maps = getattr(batch, "anomaly_map", None)
        maps = None if maps is None else maps.detach().float().cpu().reshape(len(scores), *maps.shape[-2:])
        paths = list(getattr(batch, "image_path", None) or [None] * len(scores))
        rows, lines = [], []
        for i, score in enumerate(scores.tolist()):
            image_path = paths[i] or f"sample_{batch_idx:05d}_{i:03d}"
            record = self._record(image_path, score, None if maps is None else maps[i], batch, i)
            lines.append(json.dumps(record))
            rows.append([record.get(column) for column in CSV_COLUMNS])
        with self.csv_path.open("a", newline="") as handle:
            csv.writer(handle).writerows(
                [["" if v is None else str(v).lower() if isinstance(v, bool) else v for v in row] for row in rows]
            )
        with self.jsonl_path.open("a") as handle:
            handle.write("\n".join(lines) + "\n")
        self.rows += len(rows)

    def _record(self, image_path: str, score: float, amap: torch.Tensor | None, batch: Any, i: int) -> dict:  # noqa: ANN401
        t = self.thresholds
        record: dict[str, Any] = {
            "image_path": image_path,
            "pred_score": score,
            "pred_label": None
            if t.image_threshold is None
            else int(np.float32(score) >= np.float32(t.image_threshold)),
            "calibrated": t.calibrated,
            "image_threshold": t.image_threshold,
            "pixel_threshold": t.pixel_threshold,
        }
        if amap is None:
            record.update(n_regions=None, regions=None, anomaly_map=None, overlay=None)
            return record
        native = self.map_resolution == "native" and os.path.isfile(image_path)
        size = read_image_size(image_path) if native else tuple(amap.shape)
        full = resize_map(amap, size).numpy()
        record["height"], record["width"] = int(size[0]), int(size[1])
        regions = None if t.pixel_threshold is None else connected_regions(full, t.pixel_threshold)
        record["n_regions"] = None if regions is None else len(regions)
        record["regions"] = regions
        name = output_name(image_path, self._root)
        record["anomaly_map"] = None
        if self.save_maps != "none":
            suffix = ".npy" if self.save_maps == "npy" else ".png"
            written = save_map(full, self.out_dir / "maps" / f"{name}{suffix}", self.save_maps)
            record["anomaly_map"] = str(written)
        record["overlay"] = None
        if self.save_overlays:
            record["overlay"] = str(self._overlay(image_path, full, batch, i, score, record["pred_label"], name))
        return record

    def _overlay(
        self,
        image_path: str,
        full: np.ndarray,
        batch: Any,
        i: int,
        score: float,
        label: int | None,
        name: Path,  # noqa: ANN401
    ) -> Path:
        from zsad.data.files import read_image
        from zsad.viz import denormalize_image, overlay_figure, save_figure

        if os.path.isfile(image_path) and self.map_resolution == "native":
            picture = (read_image(image_path).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
        else:
            picture = denormalize_image(batch.image[i])
        verdict = "not calibrated" if label is None else ("anomalous" if label else "normal")
        title = f"{image_path}  (score {score:.4g}, {verdict})"
        fig = overlay_figure(picture, full, None, self.thresholds.pixel_threshold, title=title)
        return save_figure(fig, self.out_dir / "overlays" / f"{name}.png")

    # -- end --------------------------------------------------------------------------------------------------------

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Say where the predictions are (the CSV path is printed for scripts)."""
        del trainer, pl_module
        if not self.enabled or self.csv_path is None:
            return
        state = "calibrated" if self.thresholds.calibrated else "NOT calibrated (pred_label empty)"
        print(f"wrote {self.rows} predictions ({state}) to {self.csv_path} and {self.jsonl_path.name}")  # noqa: T201
        if self.save_maps != "none" or self.save_overlays:
            print(f"maps / overlays under {self.out_dir}")  # noqa: T201


def read_predictions(jsonl_path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``predictions.jsonl`` file."""
    return [json.loads(line) for line in Path(jsonl_path).read_text().splitlines() if line.strip()]
