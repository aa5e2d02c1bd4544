"""Reading images and masks robustly, and checking every file of a dataset before training starts.

anomalib's ``read_image`` / ``read_mask`` convert with PIL (``"RGB"`` / ``"L"`` then ``> 0``). That is right for
MVTec AD and VisA but wrong for inputs this project must accept: a 16-bit image converted to ``"RGB"`` saturates to
white, a red-on-black mask converted to ``"L"`` becomes grey 76, and a JPEG-compressed 0/255 mask thresholded at
``> 0`` turns compression noise into defect pixels. The readers here give the same result as anomalib on MVTec AD
and VisA and the correct one on those inputs.

Mask binarisation (``threshold=None``, the default): a mask whose maximum is below 128 holds class ids or 0/1
(VisA raw masks) → anomalous = ``!= 0``; otherwise it is an 8-bit mask (0/255, possibly anti-aliased or lossy) →
anomalous = ``>= 128``. An explicit ``threshold`` t means anomalous = ``> t``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pandas import DataFrame
from PIL import Image as PILImage
from PIL import ImageOps, UnidentifiedImageError
from torchvision.tv_tensors import Image, Mask

from zsad.data.errors import BadImageError, Problem, format_problems

logger = logging.getLogger(__name__)

# PIL modes a PNG or JPEG decodes to, all of which are converted to RGB float [0, 1].
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
SUPPORTED_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"}) | SIXTEEN_BIT_MODES

# Relative aspect-ratio difference up to which a mask of another size is taken as the same picture at another
# resolution (and resized nearest); beyond it the mask most likely belongs to another image.
ASPECT_TOLERANCE = 0.02

# Below this size a JPEG is fully decoded to detect truncation; above, its end-of-image marker is looked for in the
# file's tail (a truncated JPEG has none: 0xFFD9 cannot occur inside entropy-coded data).
_JPEG_FULL_DECODE_BYTES = 16_384
_JPEG_TAIL_BYTES = 4_096
_PNG_TAIL_BYTES = 64

# EXIF Orientation tag and the values (5-8) whose transform swaps width and height (a phone photo taken upright is
# stored landscape with Orientation=6 and shown portrait by every viewer).
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})


def _oriented(image: PILImage.Image) -> PILImage.Image:
    """The image as viewers show it: its EXIF orientation applied (a no-op without the tag)."""
    return ImageOps.exif_transpose(image)


def _oriented_size(image: PILImage.Image) -> tuple[int, int]:
    """``(H, W)`` after the EXIF orientation, from the header only."""
    width, height = image.size
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError):  # a damaged EXIF block is ignored, as viewers do
        orientation = 1
    return (width, height) if orientation in _TRANSPOSED_ORIENTATIONS else (height, width)


def _open_error(path: Path | str, err: Exception) -> BadImageError:
    return BadImageError(
        str(
            Problem(
                path,
                f"cannot be decoded ({type(err).__name__}: {err}).",
                "re-export the file (PNG or JPEG) or delete it together with its mask.",
            )
        )
    )


def _rgb_array(image: PILImage.Image) -> np.ndarray:
    """[H, W, 3] float32 in [0, 1] from any supported PIL mode."""
    if image.mode in SIXTEEN_BIT_MODES:
        # 16-bit grey: scale the full 16-bit range (PIL's convert("RGB") would clip everything above 255 to white).
        grey = np.asarray(image, dtype=np.float32) / 65535.0
        return np.repeat(np.clip(grey, 0.0, 1.0)[..., None], 3, axis=-1)
    if image.mode not in SUPPORTED_MODES:
        msg = f"unsupported PIL mode {image.mode!r}"
        raise ValueError(msg)
    # Grey, palette, RGBA (alpha dropped: the stored colour is kept), CMYK, YCbCr → 8-bit RGB.
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def read_image(path: str | Path) -> Image:
    """Read an image as RGB float32 ``[3, H, W]`` in ``[0, 1]``.

    The EXIF orientation is applied (a phone JPEG tagged Orientation=6 comes out upright, as viewers show it, so
    its mask — drawn on the upright picture — lines up). Grey, palette and RGBA images are converted to RGB (alpha
    dropped), 16-bit images scaled by 1/65535.

    Args:
        path: Image file.

    Returns:
        The image as a torchvision ``Image``.

    Raises:
        BadImageError: The file is empty, truncated, not an image or of an unsupported mode.
    """
    try:
        with PILImage.open(path) as image:
            image.load()
            array = _rgb_array(_oriented(image))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise _open_error(path, err) from err
    return Image(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1))


def _mask_values(image: PILImage.Image) -> np.ndarray:
    """[H, W] integer mask values: class ids stay ids, colours become their strongest channel."""
    if image.mode == "P":
        # Palette masks store class ids as indices; mapping them through the palette could make a class black.
        return np.asarray(image)
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.int64)
        # 0/65535 masks → 0/255; small class ids must not be scaled away.
        return values // 257 if values.max() > 255 else values
    if image.mode in {"1", "L"}:
        return np.asarray(image.convert("L"))
    if image.mode in {"LA", "PA"}:
        return np.asarray(image.convert("L"))
    # Colour masks (e.g. red defects on black, or VisA's 3-channel converted masks): a pixel is as anomalous as its
    # strongest channel — luma would make pure red 76 and pure blue 29.
    return np.asarray(image.convert("RGB")).max(axis=-1)


def binarize_mask(values: np.ndarray, threshold: int | None = None) -> np.ndarray:
    """Binarise mask values.

    Args:
        values: ``[H, W]`` integer mask values.
        threshold: Pixels ``> threshold`` are anomalous; ``None`` chooses 0 for masks whose maximum is below 128
            (class ids, 0/1 masks) and 127 otherwise (8-bit masks, so that anti-aliased or lossy edges do not
            inflate the defect).

    Returns:
        ``[H, W]`` bool array.
    """
    if threshold is None:
        threshold = 0 if int(values.max(initial=0)) < 128 else 127
    return values > threshold


def _resize_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest resize of a bool mask to ``size = (H, W)`` (stays binary)."""
    resized = PILImage.fromarray(mask.astype(np.uint8) * 255).resize((size[1], size[0]), PILImage.Resampling.NEAREST)
    return np.asarray(resized) > 0


def read_mask(path: str | Path, size: tuple[int, int] | None = None, threshold: int | None = None) -> Mask:
    """Read and binarise a ground-truth mask.

    Args:
        path: Mask file (any supported mode; 8-bit, 16-bit, palette or colour); an EXIF orientation is applied.
        size: ``(H, W)`` of the (oriented) image the mask belongs to; a mask of another size is resized nearest.
        threshold: See :func:`binarize_mask`.

    Returns:
        ``[H, W]`` uint8 ``Mask`` with values 0/1 (uint8 so that torchvision transforms resize it nearest).

    Raises:
        BadImageError: The file cannot be decoded.
    """
    try:
        with PILImage.open(path) as image:
            image.load()
            values = _mask_values(_oriented(image))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise _open_error(path, err) from err
    binary = binarize_mask(values, threshold)
    if size is not None and binary.shape != tuple(size):
        binary = _resize_nearest(binary, size)
    return Mask(torch.from_numpy(np.ascontiguousarray(binary.astype(np.uint8))))


def read_image_size(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of an image file as shown (EXIF orientation applied), from its header (no decoding)."""
    with PILImage.open(path) as image:
        return _oriented_size(image)


@dataclass(frozen=True)
class Probe:
    """Header facts about one image file (``size`` = ``(H, W)`` after the EXIF orientation), or why it is unusable."""

    size: tuple[int, int] | None = None
    mode: str | None = None
    problem: str | None = None


def _tail(path: Path, n_bytes: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(0, 2)
        length = handle.tell()
        handle.seek(max(0, length - n_bytes))
        return handle.read()


def probe_image(path: str | Path) -> Probe:
    """Check an image file cheaply: non-empty, a decodable header, a supported mode, not truncated.

    Truncation is detected from the PNG ``IEND`` chunk / the JPEG end-of-image marker in the file's tail (small
    JPEGs are fully decoded), so checking a 10,000-image dataset takes seconds.

    Args:
        path: Image file.

    Returns:
        A :class:`Probe` with ``(H, W)`` and mode, or with ``problem`` set.
    """
    path = Path(path)
    try:
        n_bytes = path.stat().st_size
    except OSError as err:
        return Probe(problem=f"cannot be read ({err}).")
    if n_bytes == 0:
        return Probe(problem="is empty (0 bytes).")
    try:
        with PILImage.open(path) as image:
            height, width = _oriented_size(image)
            mode, fmt = image.mode, image.format
            if fmt == "JPEG" and n_bytes < _JPEG_FULL_DECODE_BYTES:
                image.load()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        return Probe(problem=f"is not a readable image ({type(err).__name__}: {err}).")
    if mode not in SUPPORTED_MODES:
        return Probe(problem=f"has the unsupported pixel format {mode!r} (use 8-bit or 16-bit grey, RGB or RGBA).")
    if fmt == "PNG" and b"IEND" not in _tail(path, _PNG_TAIL_BYTES):
        return Probe(problem="is truncated (the PNG has no IEND chunk).")
    if fmt == "JPEG" and n_bytes >= _JPEG_FULL_DECODE_BYTES and b"\xff\xd9" not in _tail(path, _JPEG_TAIL_BYTES):
        return Probe(problem="is truncated (the JPEG has no end-of-image marker).")
    return Probe(size=(height, width), mode=mode)


def _value_histogram(values: np.ndarray) -> np.ndarray:
    # A histogram instead of np.unique / full-size comparisons: sorting every pixel of 1,000+ full-resolution masks
    # dominated the check. Mask values are <= 255 here (16-bit masks are scaled by _mask_values).
    flat = values.ravel() if values.dtype == np.uint8 else np.clip(values.ravel(), 0, 255).astype(np.uint8)
    return np.bincount(flat, minlength=256)


def _mask_kind(present: np.ndarray) -> str:
    if present.max(initial=0) < 128:
        return "class ids / 0-1"
    if set(present.tolist()) <= {0, 255}:
        return "0/255"
    return "8-bit with intermediate values (thresholded at 128)"


def _same_aspect(size_a: tuple[int, int], size_b: tuple[int, int]) -> bool:
    aspect_a, aspect_b = size_a[1] / size_a[0], size_b[1] / size_b[0]
    return abs(aspect_a - aspect_b) / aspect_a <= ASPECT_TOLERANCE


def check_samples(samples: DataFrame, description: str, threshold: int | None = None) -> None:
    """Check every image and mask of a samples table before training; raise once listing all bad files.

    Images: non-empty, decodable header, supported mode, not truncated. Anomalous samples: a mask path, a decodable
    mask, a mask size with the image's aspect ratio (another resolution is resized nearest at load time), and at
    least one anomalous pixel after binarisation.

    Args:
        samples: anomalib samples table (``image_path``, ``label_index``, ``mask_path``).
        description: What is checked, for the messages (e.g. ``"Gogan 'nunozumi' test split"``).
        threshold: Mask threshold, see :func:`binarize_mask`.

    Raises:
        BadImageError: At least one file is unusable; the message lists them with the fix.
    """
    problems: list[Problem] = []
    mask_kinds: Counter[str] = Counter()
    resized = 0
    for row in samples.itertuples(index=False):
        probe = probe_image(row.image_path)
        if probe.problem is not None:
            problems.append(Problem(row.image_path, probe.problem, "re-export the image or delete it (and its mask)."))
            continue
        if int(row.label_index) != 1:
            continue
        mask_path = getattr(row, "mask_path", None)
        if not isinstance(mask_path, str) or not mask_path:
            problems.append(
                Problem(row.image_path, "is anomalous but has no mask.", "add ground_truth/<defect>/<name>_mask.png.")
            )
            continue
        mask_probe = probe_image(mask_path)
        if mask_probe.problem is not None:
            problems.append(Problem(mask_path, mask_probe.problem, "re-export the mask as a lossless PNG."))
            continue
        assert probe.size is not None and mask_probe.size is not None
        if mask_probe.size != probe.size:
            if not _same_aspect(mask_probe.size, probe.size):
                problems.append(
                    Problem(
                        mask_path,
                        f"is {mask_probe.size[1]}x{mask_probe.size[0]} but its image {row.image_path} is "
                        f"{probe.size[1]}x{probe.size[0]} (another aspect ratio: probably the wrong mask).",
                        "pair the image with its own mask, or resize the mask to the image size.",
                    )
                )
                continue
            resized += 1
        try:
            with PILImage.open(mask_path) as image:
                image.load()
                values = _mask_values(_oriented(image))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
            problems.append(Problem(mask_path, f"cannot be decoded ({err}).", "re-export the mask as a lossless PNG."))
            continue
        present = np.flatnonzero(_value_histogram(values))
        if not binarize_mask(present, threshold).any():
            problems.append(
                Problem(
                    mask_path,
                    "has no anomalous pixel, yet its image is in a defect folder.",
                    "fix the mask, or move the image to test/good/ if it is normal.",
                )
            )
            continue
        mask_kinds[_mask_kind(present)] += 1
    if problems:
        raise BadImageError(format_problems(f"{len(problems)} unusable file(s) in {description}:", problems))
    if resized:
        logger.info("%s: %d mask(s) differ in size from their image and are resized (nearest).", description, resized)
    if mask_kinds:
        logger.info("%s: mask value conventions %s.", description, dict(mask_kinds))


def read_native_masks(
    image_paths: Sequence[str],
    mask_paths: Sequence[str | None] | None,
    labels: Sequence[int] | torch.Tensor,
    threshold: int | None = None,
) -> list[torch.Tensor]:
    """Ground-truth masks at file resolution, for pixel metrics at native resolution (e.g. Gogan at 256x256).

    anomalib's ``PreProcessor`` resizes ``batch.gt_mask`` to the model input in every ``on_*_batch_start``, so a
    native-resolution mask cannot travel in the batch. An evaluator that scores at native resolution resizes the
    anomaly maps to the file size and reads the masks here, binarised exactly as the datasets do.

    Args:
        image_paths: ``batch.image_path``.
        mask_paths: ``batch.mask_path`` (``None`` entries for normal images).
        labels: ``batch.gt_label``.
        threshold: Mask threshold, see :func:`binarize_mask`.

    Returns:
        One ``[H, W]`` bool tensor per image (all-zero for normal images), ``(H, W)`` the image file's size.

    Raises:
        ValueError: An anomalous sample without a mask file (e.g. a synthetic anomaly, which has no native mask).
    """
    mask_paths = list(mask_paths) if mask_paths is not None else [None] * len(image_paths)
    masks = []
    for image_path, mask_path, label in zip(image_paths, mask_paths, list(labels), strict=True):
        size = read_image_size(image_path)
        if bool(label):
            if not mask_path:
                msg = f"{image_path} is anomalous but has no mask file; native masks exist only for real samples."
                raise ValueError(msg)
            masks.append(read_mask(mask_path, size=size, threshold=threshold).as_subclass(torch.Tensor).bool())
        else:
            masks.append(torch.zeros(size, dtype=torch.bool))
    return masks
