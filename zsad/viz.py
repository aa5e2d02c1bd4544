"""Pictures of results: anomaly-map overlays and ROC / PRO curves (matplotlib, Agg canvas, no pyplot state).

An overlay has three panels, as in the qualitative figures of the ZSAD papers (seed 000, Fig. 4): (a) the input image,
(b) the image with the ground-truth contour, (c) the anomaly map as a heat map over the image with the contour of the
decision region ``map >= threshold`` in red (the evaluator uses the category's pixel F1-max threshold) and the
ground truth in green. Maps are raw method scores: the colour scale is only a display range (``vmin``/``vmax``,
per category in the evaluator so images of a category compare), never a normalisation of the scores.

Example:
    >>> from zsad.viz import save_overlays
    >>> paths = save_overlays(batch, "runs/demo/images", threshold=0.51)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from zsad.backbone.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from zsad.data.dataclasses import batch_categories

__all__ = [
    "curves_figure",
    "denormalize_image",
    "figure_to_array",
    "overlay_figure",
    "save_figure",
    "sample_name",
    "save_overlays",
]

logger = logging.getLogger(__name__)

GT_COLOR = "lime"
THRESHOLD_COLOR = "red"
HEAT_CMAP = "jet"
HEAT_ALPHA = 0.5


def denormalize_image(
    image: torch.Tensor | np.ndarray,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> np.ndarray:
    """Undo the CLIP normalisation of a (3, H, W) image and return it as uint8 (H, W, 3).

    Args:
        image: Normalised image, channels first.
        mean: Per-channel mean used for normalisation (OpenAI CLIP by default).
        std: Per-channel standard deviation used for normalisation.

    Returns:
        The RGB image in [0, 255].
    """
    array = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, np.float32)
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise ValueError(f"expected a (3, H, W) image, got {array.shape}")
    array = array * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    array = np.clip(array, 0.0, 1.0)
    if array.shape[0] == 1:
        array = np.repeat(array, 3, axis=0)
    return (array.transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)


def _resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a uint8 (H, W, 3) image to the map size (images may be larger than the evaluated maps)."""
    if image.shape[:2] == (height, width):
        return image
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    tensor = torch.nn.functional.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)
    return tensor[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def overlay_figure(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    gt_mask: np.ndarray | None = None,
    threshold: float | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    title: str | None = None,
) -> Figure:
    """Three panels: image | image + ground-truth contour | heat map + threshold contour.

    Args:
        image: uint8 (H, W, 3) image (resized to the map if needed).
        anomaly_map: (H, W) raw anomaly map.
        gt_mask: Optional (H, W) ground-truth mask.
        threshold: Optional decision threshold; the region ``map >= threshold`` is outlined in red.
        vmin: Lower end of the colour scale (default: the map's minimum).
        vmax: Upper end of the colour scale (default: the map's maximum).
        title: Optional figure title (e.g. the image path and score).

    Returns:
        A matplotlib figure on an Agg canvas.
    """
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    height, width = anomaly_map.shape
    image = _resize_image(np.asarray(image), height, width)
    fig = Figure(figsize=(9.0, 3.3), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(image)
    axes[1].set_title("ground truth")
    axes[2].imshow(image)
    heat = axes[2].imshow(
        anomaly_map,
        cmap=HEAT_CMAP,
        alpha=HEAT_ALPHA,
        vmin=float(anomaly_map.min()) if vmin is None else vmin,
        vmax=float(anomaly_map.max()) if vmax is None else vmax,
    )
    fig.colorbar(heat, ax=axes[2], fraction=0.046, pad=0.02)
    axes[2].set_title("anomaly map" if threshold is None else f"anomaly map, t = {threshold:.4g}")
    if gt_mask is not None:
        mask = np.asarray(gt_mask, dtype=np.float32)
        if mask.any():
            for ax in (axes[1], axes[2]):
                ax.contour(mask, levels=[0.5], colors=GT_COLOR, linewidths=1.0)
    if threshold is not None:
        decision = (anomaly_map >= threshold).astype(np.float32)
        if decision.any() and not decision.all():
            axes[2].contour(decision, levels=[0.5], colors=THRESHOLD_COLOR, linewidths=1.2)
    for ax in axes:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a figure to a uint8 (H, W, 3) array (for W&B images)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write a figure as PNG, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _load_image(path: str, height: int, width: int) -> np.ndarray:
    # The datasets' own reader, so the picture under the map is oriented (EXIF) and scaled exactly like the input.
    from zsad.data.files import read_image

    rgb = read_image(path).permute(1, 2, 0).numpy()
    return _resize_image((rgb * 255.0 + 0.5).astype(np.uint8), height, width)


def sample_name(image_path: str | None, index: int) -> str:
    """``<defect>_<stem>`` (MVTec-style names repeat across defect folders) or ``sample_<index>``."""
    if not image_path:
        return f"sample_{index:05d}"
    path = Path(image_path)
    return f"{path.parent.name}_{path.stem}" if path.parent.name else path.stem


def save_overlays(
    batch: object,
    out_dir: str | Path,
    threshold: float | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    start_index: int = 0,
) -> list[Path]:
    """Write one overlay PNG per sample of a scored batch to ``out_dir/<category>/<defect>_<stem>.png``.

    Args:
        batch: anomalib ``ImageBatch`` / ``ZSADBatch`` with ``anomaly_map`` filled; ``image`` (CLIP-normalised) or
            ``image_path`` for the picture, ``gt_mask`` and ``pred_score`` optional.
        out_dir: Output folder.
        threshold: Decision threshold to outline (e.g. a validation F1-max threshold); None draws no contour.
        vmin: Colour-scale minimum shared by all images (default: per image).
        vmax: Colour-scale maximum shared by all images (default: per image).
        mean: Normalisation mean of ``batch.image``.
        std: Normalisation std of ``batch.image``.
        start_index: First index for names of samples without ``image_path``.

    Returns:
        The written paths.
    """
    anomaly_maps = getattr(batch, "anomaly_map", None)
    if anomaly_maps is None:
        raise ValueError("batch has no anomaly_map to draw")
    maps = anomaly_maps.detach().float().cpu()
    if maps.ndim == 4:
        maps = maps.squeeze(1)
    masks = getattr(batch, "gt_mask", None)
    masks = None if masks is None else masks.detach().cpu().reshape(maps.shape).numpy()
    images = getattr(batch, "image", None)
    paths = list(getattr(batch, "image_path", None) or [None] * len(maps))
    scores = getattr(batch, "pred_score", None)
    categories = batch_categories(batch)  # type: ignore[arg-type]
    written = []
    for i, amap in enumerate(maps.numpy()):
        if images is not None:
            picture = denormalize_image(images[i], mean, std)
        elif paths[i]:
            picture = _load_image(paths[i], *amap.shape)
        else:
            picture = np.zeros((*amap.shape, 3), np.uint8)
        title = paths[i] or f"sample {start_index + i}"
        if scores is not None:
            title = f"{title}  (score {float(scores.reshape(-1)[i]):.4g})"
        fig = overlay_figure(picture, amap, None if masks is None else masks[i], threshold, vmin, vmax, title)
        name = sample_name(paths[i], start_index + i)
        written.append(save_figure(fig, Path(out_dir) / categories[i] / f"{name}.png"))
    return written


def curves_figure(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    metrics: dict[str, float],
    fpr_limit: float,
    title: str | None = None,
) -> Figure:
    """Image ROC, pixel ROC and PRO curve of one category side by side.

    Args:
        curves: Any of ``image_roc``, ``pixel_roc`` (FPR, TPR) and ``pro`` (FPR, PRO) point arrays.
        metrics: Values quoted in the legends (``image_auroc``, ``pixel_auroc``, ``pixel_aupro``).
        fpr_limit: AU-PRO integration limit (shaded on the PRO plot).
        title: Figure title (the category).

    Returns:
        A matplotlib figure on an Agg canvas.
    """
    panels = [
        ("image_roc", "image ROC", "FPR", "TPR", "image_auroc", "AUROC"),
        ("pixel_roc", "pixel ROC", "FPR", "TPR", "pixel_auroc", "AUROC"),
        ("pro", "PRO", "FPR", "per-region overlap", "pixel_aupro", f"AU-PRO@{fpr_limit:g}"),
    ]
    panels = [panel for panel in panels if panel[0] in curves]
    fig = Figure(figsize=(3.4 * max(len(panels), 1), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, max(len(panels), 1)))
    for ax, (key, name, xlabel, ylabel, metric, label) in zip(axes, panels, strict=False):
        x, y = curves[key]
        value = metrics.get(metric, float("nan"))
        ax.plot(x, y, lw=1.5, label=f"{label} = {100 * value:.1f}")
        if key == "pro":
            ax.axvspan(0.0, fpr_limit, color="0.9", zorder=0)
        else:
            ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.5")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel=xlabel, ylabel=ylabel, title=name)
        ax.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
