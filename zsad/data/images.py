"""Any images, no layout: a folder (searched recursively), a glob pattern or a list of files → scored batches.

:class:`Images` is the datamodule for ``zsad predict`` / ``zsad calibrate`` on a user's own pictures: no masks, no
``train``/``test``/``good`` folders, no labels. Every image is read by the shared reader
(:func:`zsad.data.files.read_image`: any PIL mode, 16-bit, EXIF orientation), resized like the model's
pre-processor (anomalib's convention: the datamodule resizes, the model normalises) and collated to
:class:`~zsad.data.ZSADBatch` with ``gt_label``/``gt_mask`` left empty.

Unreadable files are never skipped silently: every file is probed before the first batch and all bad ones are
reported in one :class:`~zsad.data.BadImageError` naming each of them.

Example:
    >>> from zsad.data import Images
    >>> datamodule = Images(root="photos/", image_size=518)           # photos/**/*.{png,jpg,jpeg,bmp,tif,tiff}
    >>> datamodule = Images(root="photos/*.jpg")                      # a glob
    >>> datamodule = Images(root=["a.png", "b/c.jpg"])                # explicit files
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

import torch
from anomalib.data.transforms.utils import extract_transforms_by_type
from anomalib.utils.attrs import get_nested_attr
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import Resize, Transform

from zsad.data.dataclasses import ZSADBatch, ZSADItem
from zsad.data.errors import BadImageError, DatasetNotFoundError, Problem, format_problems
from zsad.data.files import probe_image, read_image
from zsad.data.transforms import resize_transform

#: File suffixes (lower case) taken from a folder; explicit files and globs may name any PIL-readable file.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})


def _is_glob(text: str) -> bool:
    return any(char in text for char in "*?[")


def list_images(root: str | Path | Sequence[str | Path]) -> list[Path]:
    """The image files ``root`` designates, sorted, without duplicates.

    Args:
        root: A folder (every file with an image suffix below it, recursively, hidden entries skipped), a glob
            pattern (``**`` allowed) or a list of files / folders / patterns.

    Returns:
        The files.

    Raises:
        DatasetNotFoundError: A named file or folder does not exist, or nothing matched.
    """
    entries = [root] if isinstance(root, str | Path) else list(root)
    found: list[Path] = []
    missing: list[Problem] = []
    for entry in entries:
        text = str(entry)
        if _is_glob(text):
            matches = [Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file()]
            if not matches:
                missing.append(Problem(text, "matches no file.", "check the pattern (quote it in the shell)."))
            found.extend(matches)
        elif Path(text).is_dir():
            found.extend(
                p
                for p in Path(text).rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(text).parts)
            )
        elif Path(text).is_file():
            found.append(Path(text))
        else:
            missing.append(Problem(text, "does not exist.", "pass an existing folder, file or glob pattern."))
    if missing:
        raise DatasetNotFoundError(format_problems(f"{len(missing)} input(s) not found", missing))
    unique = sorted({p.resolve(): p for p in found}.values(), key=lambda p: str(p.resolve()))
    if not unique:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        msg = f"No image found in {root} (looked for {suffixes}, recursively). Fix: point root at your images."
        raise DatasetNotFoundError(msg)
    return unique


def check_images(paths: Sequence[Path]) -> None:
    """Probe every file (header, mode, truncation) and raise once listing all unusable ones.

    Raises:
        BadImageError: One or more files cannot be used; each is named with its problem.
    """
    problems = []
    for path in paths:
        probe = probe_image(path)
        if probe.problem is not None:
            problems.append(Problem(path, probe.problem, "re-export the image (PNG or JPEG) or remove it."))
    if problems:
        raise BadImageError(format_problems(f"{len(problems)} of {len(paths)} image(s) cannot be read", problems))


class ImageFiles(Dataset):
    """Images without labels or masks as :class:`~zsad.data.ZSADItem` (``category`` = ``category`` argument).

    Args:
        paths: Image files.
        transform: Applied to the ``[3, H, W]`` float image in ``[0, 1]`` (typically the model's Resize).
        category: Category written into every item (a class name for methods that use it in prompts).
    """

    def __init__(self, paths: Sequence[Path], transform: Transform | None = None, category: str = "object") -> None:
        self.paths = list(paths)
        self.transform = transform
        self.category = category

    def __len__(self) -> int:
        """Number of images."""
        return len(self.paths)

    def __getitem__(self, index: int) -> ZSADItem:
        """Read, orient and resize image ``index``."""
        image = read_image(self.paths[index])
        if self.transform is not None:
            # Bicubic resizing overshoots [0, 1]; clip like the labelled datasets do (zsad.data.dataset).
            image = self.transform(image).clamp_(0.0, 1.0)
        return ZSADItem(image=image, image_path=str(self.paths[index]), category=self.category)


class Images(LightningDataModule):
    """Datamodule over any images (predict only: there are no labels to test against): a folder, glob or file list.

    Args:
        root: A folder (searched recursively for PNG/JPEG/BMP/TIFF), a glob pattern, or a list of files.
        image_size: Side the images are resized to when no model pre-processor says it (standalone use); with a
            model attached its Resize wins, as in anomalib's datamodules.
        batch_size: Images per batch.
        num_workers: Data-loader worker processes.
        category: Class name given to every image (``category`` of the batch; prompt-based methods read it).
        check_files: Probe every file before the first batch and report all unreadable ones at once.
    """

    def __init__(
        self,
        root: str | list[str],
        image_size: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        category: str = "object",
        check_files: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            msg = f"batch_size must be positive, got {batch_size}."
            raise ValueError(msg)
        self.root = root
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.category = category
        self.check_files = check_files
        self.paths: list[Path] | None = None
        self.data: ImageFiles | None = None

    @property
    def name(self) -> str:
        """Name used in result paths."""
        return "images"

    @property
    def root_dir(self) -> Path | None:
        """The folder the inputs are named relative to (``root`` when it is one folder, else ``None``)."""
        root = self.root
        return Path(root) if isinstance(root, str | Path) and Path(root).is_dir() else None

    def _transform(self) -> Transform | None:
        model_transform = get_nested_attr(self, "trainer.model.pre_processor.transform", None)
        resizes = extract_transforms_by_type(model_transform, Resize) if model_transform is not None else []
        if resizes:
            return resizes[0]
        return resize_transform(self.image_size) if self.image_size is not None else None

    def setup(self, stage: str | None = None) -> None:
        """List (and check) the images once, and build the dataset with the model's Resize."""
        del stage
        if self.paths is None:
            self.paths = list_images(self.root)
            if self.check_files:
                check_images(self.paths)
        self.data = ImageFiles(self.paths, self._transform(), self.category)

    def _loader(self) -> DataLoader:
        if self.data is None:
            self.setup()
        return DataLoader(
            self.data,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=ZSADBatch.collate,
        )

    def predict_dataloader(self) -> DataLoader:
        """All images in path order."""
        return self._loader()

    def batches(self) -> list[ZSADBatch]:
        """Every batch, loaded eagerly (notebooks, calibration without a trainer)."""
        return list(self._loader())


def image_batch(paths: Sequence[str | Path], image_size: int) -> torch.Tensor:
    """``[N, 3, S, S]`` float images in ``[0, 1]`` read and resized like :class:`Images` (not normalised)."""
    dataset = ImageFiles([Path(p) for p in paths], resize_transform(image_size))
    return torch.stack([dataset[i].image for i in range(len(dataset))])
