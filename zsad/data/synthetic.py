"""Generated datasets in the MVTec AD, VisA and Gogan layouts, written in well under a second for tests and demos.

Images are procedural: textures (stripes, checks) and objects (discs, rounded squares) for MVTec/VisA-like data,
concrete blocks under uncontrolled light for Gogan-like data. Normal images vary (phase, position, brightness,
noise; for Gogan also sun gradients, shadows and wet patches), anomalous ones get a drawn defect (scratch, spot,
crack, missing piece; for Gogan crack/joint opening, spalling, efflorescence, exudate). The ground-truth mask of a
defect is **exactly the set of pixels the defect changed**.

Two visually different domains (``domain="a"``: warm stripes and discs on dark backgrounds; ``"b"``: cool checks
and rounded squares on bright backgrounds) let cross-dataset training be tested: train on one, test on the other.

Example:
    >>> from zsad.data.synthetic import make_mvtec_like
    >>> root = make_mvtec_like(tmp_path / "mvtec")  # doctest: +SKIP
    >>> sorted(p.name for p in root.iterdir())  # doctest: +SKIP
    ['alpha', 'beta']
"""

from __future__ import annotations

import csv
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from zsad.data.layouts import GOGAN_CATEGORIES, GOGAN_DEFECTS

Domain = Literal["a", "b"]
MVTEC_DEFECTS = ("scratch", "spot", "crack", "missing")
VISA_LIKE_CATEGORIES = ("candle", "capsules")
# tanizumi has no exudate image in the real dataset (seed 003, table 1); the generated data keeps that gap.
GOGAN_CATEGORY_DEFECTS = {
    "nunozumi": tuple(GOGAN_DEFECTS),
    "tanizumi": ("crack_joint_opening", "spalling_missing", "efflorescence"),
}

_PALETTES = {
    # (texture colour 1, texture colour 2, object background, object colour)
    "a": ((150, 95, 55), (205, 160, 100), (28, 26, 30), (200, 140, 70)),
    "b": ((40, 95, 150), (110, 185, 205), (222, 226, 232), (60, 150, 110)),
}


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    words = [seed] + [zlib.crc32(key.encode()) if isinstance(key, str) else key for key in keys]
    return np.random.default_rng(words)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int = 6) -> np.ndarray:
    """Low-frequency noise in [0, 1] (bilinear upsampling of a coarse random grid)."""
    coarse = (rng.random((cells, cells)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR), np.float32) / 255.0


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    return yy / max(height, width), xx / max(height, width)


def _mix(colour_1: Sequence[int], colour_2: Sequence[int], t: np.ndarray) -> np.ndarray:
    c1, c2 = np.asarray(colour_1, np.float32), np.asarray(colour_2, np.float32)
    return c1 + (c2 - c1) * t[..., None]


def _shift(colour: Sequence[int], shift: np.ndarray) -> tuple[int, ...]:
    return tuple(int(v) for v in np.clip(np.asarray(colour) + shift, 0, 255))


def _texture(rng: np.random.Generator, height: int, width: int, domain: Domain, tint: np.ndarray) -> np.ndarray:
    c1, c2, _, _ = _PALETTES[domain]
    yy, xx = _grid(height, width)
    if domain == "a":  # wood-like stripes, warped by smooth noise
        angle = rng.uniform(0, np.pi)
        warp = _smooth_noise(rng, height, width) * 1.5
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (6 * (xx * np.cos(angle) + yy * np.sin(angle)) + warp) + rng.uniform(0, 6))
    else:  # fine checks
        period = rng.uniform(0.07, 0.1)
        phase_x, phase_y = rng.uniform(0, period, 2)
        t = (((xx + phase_x) // period + (yy + phase_y) // period) % 2).astype(np.float32) * 0.8 + 0.1
    image = _mix(_shift(c1, tint), _shift(c2, tint), t)
    return image + rng.normal(0, 6, image.shape)


def _object(
    rng: np.random.Generator, height: int, width: int, domain: Domain, tint: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """An object on a background; returns the image and the object's region (where defects go)."""
    _, _, background, colour = _PALETTES[domain]
    yy, xx = _grid(height, width)
    cy = height / max(height, width) / 2 + rng.uniform(-0.04, 0.04)
    cx = width / max(height, width) / 2 + rng.uniform(-0.04, 0.04)
    if domain == "a":  # disc with concentric rings
        radius = np.hypot(yy - cy, xx - cx)
        region = radius < 0.32
        shade = 0.75 + 0.25 * np.cos(radius * 60)
    else:  # rounded square with a stripe
        dist = np.maximum(np.abs(yy - cy), np.abs(xx - cx))
        region = dist < 0.3
        shade = np.where(np.abs(yy - cy) < 0.05, 0.7, 1.0)
    image = np.empty((height, width, 3), np.float32)
    image[:] = background
    image[region] = np.asarray(_shift(colour, tint), np.float32) * shade[region][:, None]
    return image + rng.normal(0, 4, image.shape), region


def _points_in(rng: np.random.Generator, region: np.ndarray, n: int) -> np.ndarray:
    """``n`` random (x, y) points inside a bool region."""
    ys, xs = np.nonzero(region)
    picks = rng.integers(0, len(ys), n)
    return np.stack([xs[picks], ys[picks]], axis=1)


def _random_walk(rng: np.random.Generator, start: np.ndarray, steps: int, step: float) -> list[tuple[float, float]]:
    points, heading = [tuple(start.astype(float))], rng.uniform(0, 2 * np.pi)
    for _ in range(steps):
        heading += rng.normal(0, 0.6)
        x, y = points[-1]
        points.append((x + step * np.cos(heading), y + step * np.sin(heading)))
    return points


def _contrast(image: np.ndarray) -> tuple[int, int, int]:
    return (245, 245, 240) if image.mean() < 128 else (15, 15, 20)


def _draw_mvtec_defect(
    image: np.ndarray, kind: str, rng: np.random.Generator, region: np.ndarray, background: tuple[int, ...] | None
) -> np.ndarray:
    """Draw one defect of ``kind`` into a uint8 image (returns a new image)."""
    height, width = image.shape[:2]
    side = min(height, width)
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    p1 = _points_in(rng, region, 1)[0]
    if kind == "scratch":
        angle, length = rng.uniform(0, np.pi), side * rng.uniform(0.25, 0.4)
        p2 = p1 + length * np.array([np.cos(angle), np.sin(angle)])
        draw.line([tuple(p1), tuple(p2)], fill=_contrast(image), width=max(1, side // 48))
    elif kind == "spot":
        r = side * rng.uniform(0.05, 0.09)
        draw.ellipse([p1[0] - r, p1[1] - r, p1[0] + r, p1[1] + r], fill=(170, 35, 40))
    elif kind == "crack":
        draw.line(_random_walk(rng, p1, 7, side * 0.06), fill=(12, 10, 10), width=max(1, side // 64))
    elif kind == "missing":
        # A chunk bitten out: the background shows through (objects) or a dark hole (textures).
        r = side * rng.uniform(0.08, 0.13)
        angles = np.sort(rng.uniform(0, 2 * np.pi, 7))
        polygon = [
            (p1[0] + r * rng.uniform(0.6, 1.2) * np.cos(a), p1[1] + r * rng.uniform(0.6, 1.2) * np.sin(a))
            for a in angles
        ]
        draw.polygon(polygon, fill=background if background is not None else (25, 22, 20))
    else:
        msg = f"unknown defect kind {kind!r}; choose from {MVTEC_DEFECTS}."
        raise ValueError(msg)
    return np.asarray(canvas)


def _with_defect(
    image: np.ndarray, draw: Callable[[np.random.Generator], np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Apply a drawing until it changes at least a few pixels; the mask is exactly the changed pixels."""
    for _ in range(20):
        defective = draw(rng)
        mask = (defective != image).any(axis=-1)
        if mask.sum() >= 4:
            return defective, mask
    msg = "could not draw a visible defect (image too small?)."
    raise RuntimeError(msg)


def _save(array: np.ndarray, path: Path, quality: int = 92) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if path.suffix.lower() in {".jpg", ".jpeg"}:
        image.save(path, quality=quality)
    else:
        image.save(path, compress_level=1)  # speed over size: these files live in temporary folders


def _save_mask(mask: np.ndarray, path: Path, values: int = 255, channels: int = 1) -> None:
    array = mask.astype(np.uint8) * values
    if channels == 3:
        array = np.repeat(array[..., None], 3, axis=-1)
    _save(array, path)


def _mvtec_like_sample(
    seed: int, category: str, index: int, domain: Domain, size: tuple[int, int], defect: str | None
) -> tuple[np.ndarray, np.ndarray]:
    rng = _rng(seed, category, index, defect or "good")
    cat_rng = _rng(seed, category, "style")
    is_object = zlib.crc32(category.encode()) % 2 == 1
    tint = cat_rng.normal(0, 25, 3)  # each category its own colours
    height, width = size
    if is_object:
        raw, region = _object(rng, height, width, domain, tint)
        background = _PALETTES[domain][2]
    else:
        raw = _texture(rng, height, width, domain, tint)
        # Defects start away from the border so that they stay visible after a centre crop or a resize.
        region = np.zeros((height, width), bool)
        region[height // 6 : height - height // 6, width // 6 : width - width // 6] = True
        background = None
    image = np.clip(raw * rng.uniform(0.95, 1.05), 0, 255).astype(np.uint8)
    if defect is None:
        return image, np.zeros(size, bool)
    return _with_defect(image, lambda r: _draw_mvtec_defect(image, defect, r, region, background), rng)


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if value < 0:
            msg = f"{name} must be >= 0, got {value}."
            raise ValueError(msg)


def make_mvtec_like(
    root: str | Path,
    categories: Sequence[str] = ("alpha", "beta"),
    domain: Domain = "a",
    n_train: int = 4,
    n_test_good: int = 3,
    n_test_defect: int = 3,
    size: int = 64,
    seed: int = 0,
    defects: Sequence[str] = MVTEC_DEFECTS,
) -> Path:
    """Write a small dataset in the MVTec AD layout.

    ``<root>/<category>/train/good/000.png``, ``test/good/``, ``test/<defect>/``,
    ``ground_truth/<defect>/000_mask.png`` (8-bit 0/255). Categories whose name hashes odd are objects, the others
    textures.

    Args:
        root: Output folder (created).
        categories: Category names.
        domain: ``"a"`` or ``"b"``, two visually different looks.
        n_train: Normal training images per category.
        n_test_good: Normal test images per category.
        n_test_defect: Anomalous test images **per defect type** and category.
        size: Image side in pixels.
        seed: Seed; the same arguments give the same files.
        defects: Defect types (folder names) among ``scratch``, ``spot``, ``crack``, ``missing``.

    Returns:
        ``root`` as a Path (pass it as the datamodule's ``root``).
    """
    _check_counts(n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect)
    root = Path(root)
    shape = (size, size)
    for category in categories:
        folder = root / category
        for i in range(n_train):
            _save(_mvtec_like_sample(seed, category, i, domain, shape, None)[0], folder / "train/good" / f"{i:03d}.png")
        for i in range(n_test_good):
            image = _mvtec_like_sample(seed, category, 10_000 + i, domain, shape, None)[0]
            _save(image, folder / "test/good" / f"{i:03d}.png")
        for defect in defects:
            for i in range(n_test_defect):
                image, mask = _mvtec_like_sample(seed, category, 20_000 + i, domain, shape, defect)
                _save(image, folder / "test" / defect / f"{i:03d}.png")
                _save_mask(mask, folder / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


def make_visa_like(
    root: str | Path,
    categories: Sequence[str] = VISA_LIKE_CATEGORIES,
    domain: Domain = "b",
    n_train: int = 4,
    n_test_good: int = 3,
    n_test_defect: int = 3,
    size: int = 64,
    seed: int = 0,
    defects: Sequence[str] = MVTEC_DEFECTS,
    layout: Literal["raw", "prepared"] = "raw",
) -> Path:
    """Write a small dataset in a VisA layout that anomalib's ``Visa`` reads without downloading.

    Images are non-square (``size`` x ``1.5 size``) JPEGs like VisA's. ``layout="raw"``: the download's layout,
    ``<root>/<category>/Data/Images/{Normal,Anomaly}/*.JPG``, class-id masks ``Data/Masks/Anomaly/*.png`` (0
    background, 1..K defect type — they look black) and ``<root>/split_csv/1cls.csv``; anomalib's
    ``Visa.prepare_data()`` converts it. ``layout="prepared"``: anomalib's converted tree
    ``<root>/visa_pytorch/<category>/{train/good, test/good, test/bad, ground_truth/bad}`` with 3-channel 0/255
    masks, as anomalib writes them.

    Args:
        root: Output folder (created).
        categories: Category names; the raw layout needs real VisA names (anomalib's conversion checks them).
        domain: ``"a"`` or ``"b"``.
        n_train: Normal training images per category.
        n_test_good: Normal test images per category.
        n_test_defect: Anomalous test images per defect type and category (all in VisA's single ``bad`` folder).
        size: Image height in pixels (width is 1.5x).
        seed: Seed.
        defects: Defect types drawn (their index + 1 is the class id in raw masks).
        layout: ``"raw"`` or ``"prepared"``.

    Returns:
        ``root`` as a Path (pass it as the datamodule's ``root``).
    """
    _check_counts(n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect)
    if layout not in ("raw", "prepared"):
        msg = f"layout must be 'raw' or 'prepared', got {layout!r}."
        raise ValueError(msg)
    root = Path(root)
    shape = (size, size * 3 // 2)
    rows: list[tuple[str, str, str, str, str]] = []
    for category in categories:
        normals = [_mvtec_like_sample(seed, category, i, domain, shape, None)[0] for i in range(n_train + n_test_good)]
        anomalies = [
            (class_id, *_mvtec_like_sample(seed, category, 20_000 + i, domain, shape, defect))
            for class_id, defect in enumerate(defects, start=1)
            for i in range(n_test_defect)
        ]
        if layout == "raw":
            data = root / category / "Data"
            for i, image in enumerate(normals):
                relative = f"{category}/Data/Images/Normal/{i:04d}.JPG"
                _save(image, root / relative)
                rows.append((category, "train" if i < n_train else "test", "normal", relative, ""))
            for i, (class_id, image, mask) in enumerate(anomalies):
                relative, mask_relative = (
                    f"{category}/Data/Images/Anomaly/{i:03d}.JPG",
                    f"{category}/Data/Masks/Anomaly/{i:03d}.png",
                )
                _save(image, root / relative)
                _save_mask(mask, root / mask_relative, values=class_id)
                rows.append((category, "test", "anomaly", relative, mask_relative))
            with (data.parent / "image_anno.csv").open("w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["image", "label", "mask"])
                writer.writerows([(r[3], "normal" if not r[4] else "anomaly", r[4]) for r in rows if r[0] == category])
        else:
            folder = root / "visa_pytorch" / category
            for i, image in enumerate(normals):
                split = "train" if i < n_train else "test"
                _save(image, folder / split / "good" / f"{i:04d}.JPG")
            for i, (_, image, mask) in enumerate(anomalies):
                _save(image, folder / "test/bad" / f"{i:03d}.JPG")
                _save_mask(mask, folder / "ground_truth/bad" / f"{i:03d}.png", channels=3)
    if layout == "raw":
        (root / "split_csv").mkdir(parents=True, exist_ok=True)
        with (root / "split_csv" / "1cls.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["object", "split", "label", "image", "mask"])
            writer.writerows(rows)
    return root


# -- Gogan ---------------------------------------------------------------------------------------------------------


def _concrete_block(rng: np.random.Generator, size: int, category: str) -> np.ndarray:
    """One concrete block under uncontrolled outdoor light (the normal variation Gogan is about)."""
    yy, xx = _grid(size, size)
    grey = rng.uniform(115, 165)
    image = grey + 22 * (_smooth_noise(rng, size, size, 8) - 0.5) + rng.normal(0, 7, (size, size))
    # Mortar joints around the block face: coursed (nunozumi) = horizontal/vertical, valley (tanizumi) = diagonal.
    if category == "tanizumi":
        edge = np.abs(np.abs(yy - 0.5) + np.abs(xx - 0.5) - 0.46)
    else:
        edge = np.minimum(
            np.minimum(np.abs(yy - 0.06), np.abs(yy - 0.94)), np.minimum(np.abs(xx - 0.03), np.abs(xx - 0.97))
        )
    image = np.where(edge < 0.025, image * 0.55, image)
    # Sun direction, shadows and wet patches: normal, yet far from an industrial setup.
    angle = rng.uniform(0, 2 * np.pi)
    image = image * (1 + rng.uniform(0.05, 0.25) * ((xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle)) * 2)
    if rng.random() < 0.4:
        image = np.where(xx * np.cos(angle) + yy * np.sin(angle) > rng.uniform(0.3, 0.9), image * 0.62, image)
    if rng.random() < 0.3:
        cy, cx, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.1, 0.2)]
        image = np.where(np.hypot(yy - cy, xx - cx) < r, image * 0.8, image)
    tint = np.array([1.0, 0.99, 0.96]) * rng.uniform(0.95, 1.05)
    return np.clip(image[..., None] * tint, 0, 255).astype(np.uint8)


def _draw_gogan_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    size = image.shape[0]
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    start = rng.uniform(0.2, 0.8, 2) * size
    if kind == "crack_joint_opening":
        draw.line(_random_walk(rng, start, 9, size * 0.05), fill=(25, 24, 22), width=max(1, size // 100))
        return np.asarray(canvas)
    overlay = Image.new("L", canvas.size, 0)
    shape = ImageDraw.Draw(overlay)
    if kind == "spalling_missing":
        r = size * rng.uniform(0.08, 0.15)
        angles = np.sort(rng.uniform(0, 2 * np.pi, 9))
        shape.polygon(
            [
                (start[0] + r * rng.uniform(0.5, 1.3) * np.cos(a), start[1] + r * rng.uniform(0.5, 1.3) * np.sin(a))
                for a in angles
            ],
            fill=255,
        )
        target = (np.asarray(canvas, np.float32) * 0.55 + rng.normal(0, 10, image.shape)).clip(0, 255)
        alpha = 1.0
    elif kind == "efflorescence":
        for _ in range(3):
            c, r = start + rng.normal(0, size * 0.05, 2), size * rng.uniform(0.04, 0.09)
            shape.ellipse([c[0] - r, c[1] - r * 0.7, c[0] + r, c[1] + r * 0.7], fill=255)
        target, alpha = np.full(image.shape, (238, 238, 232), np.float32), 0.7
    elif kind == "exudate":
        w, h = size * rng.uniform(0.03, 0.06), size * rng.uniform(0.2, 0.35)
        shape.ellipse([start[0] - w, start[1], start[0] + w, start[1] + h], fill=255)
        target, alpha = np.full(image.shape, (135, 85, 40), np.float32), 0.65
    else:
        msg = f"unknown Gogan defect {kind!r}; choose from {tuple(GOGAN_DEFECTS)}."
        raise ValueError(msg)
    region = np.asarray(overlay)[..., None] > 0
    blended = image.astype(np.float32) * (1 - alpha) + target * alpha
    return np.where(region, blended.clip(0, 255).astype(np.uint8), image)


def make_gogan_like(
    root: str | Path,
    categories: Sequence[str] = GOGAN_CATEGORIES,
    n_train: int = 4,
    n_test_good: int = 3,
    n_test_defect: int = 3,
    size: int = 256,
    seed: int = 0,
    image_format: Literal["png", "jpg"] = "png",
) -> Path:
    """Write a small dataset in the Gogan layout (MVTec layout, outdoor concrete blocks).

    ``<root>/{nunozumi,tanizumi}/train/good``, ``test/good``, ``test/<defect>``, ``ground_truth/<defect>/
    <name>_mask.png`` with the project's defect folder names (``crack_joint_opening``, ``spalling_missing``,
    ``efflorescence``, ``exudate``; ``tanizumi`` has no ``exudate``, as the real dataset).

    Args:
        root: Output folder (created).
        categories: Category names (defect types of unknown names: all four).
        n_train: Normal training images per category.
        n_test_good: Normal test images per category.
        n_test_defect: Anomalous test images per defect type and category.
        size: Image side (the real dataset: 256).
        seed: Seed.
        image_format: ``"png"`` or ``"jpg"`` for the images (masks are always PNG).

    Returns:
        ``root`` as a Path.
    """
    _check_counts(n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect)
    if image_format not in ("png", "jpg"):
        msg = f"image_format must be 'png' or 'jpg', got {image_format!r}."
        raise ValueError(msg)
    root = Path(root)
    for category in categories:
        folder = root / category
        for i in range(n_train):
            image = _concrete_block(_rng(seed, category, i, "train"), size, category)
            _save(image, folder / "train/good" / f"{i:03d}.{image_format}")
        for i in range(n_test_good):
            image = _concrete_block(_rng(seed, category, i, "test"), size, category)
            _save(image, folder / "test/good" / f"{i:03d}.{image_format}")
        for defect in GOGAN_CATEGORY_DEFECTS.get(category, tuple(GOGAN_DEFECTS)):
            for i in range(n_test_defect):
                rng = _rng(seed, category, i, defect)
                clean = _concrete_block(rng, size, category)
                image, mask = _with_defect(clean, lambda r, c=clean, d=defect: _draw_gogan_defect(c, d, r), rng)
                _save(image, folder / "test" / defect / f"{i:03d}.{image_format}")
                _save_mask(mask, folder / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


__all__ = [
    "GOGAN_CATEGORY_DEFECTS",
    "MVTEC_DEFECTS",
    "make_gogan_like",
    "make_mvtec_like",
    "make_visa_like",
]
