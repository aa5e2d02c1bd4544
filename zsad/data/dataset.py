"""The one zsad dataset class: anomalib samples (any categories, any source) → :class:`~zsad.data.ZSADItem`.

:class:`ZSADDataset` is an anomalib :class:`~anomalib.data.datasets.base.image.AnomalibDataset`, so anomalib's
datamodule machinery (split helpers, ``subsample``, ``+``, the model-Resize injection into ``augmentations``) works
on it unchanged. On top of anomalib's ``__getitem__`` it

* attaches the sample's ``category`` and collates to :class:`~zsad.data.ZSADBatch`;
* reads images and masks with :mod:`zsad.data.files` (16-bit, grey, RGBA, palette, colour and class-id masks, mask
  size ≠ image size);
* optionally tiles a 2x2 same-category mosaic (APRIL-GAN) and inserts Perlin synthetic anomalies (CLIP-ADA) into
  normal samples;
* makes all randomness of a sample (mosaic choice, augmentations, synthetic anomaly) a function of
  ``(seed, epoch, index)`` when ``seed`` is set, independent of data-loader workers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from anomalib import TaskType
from anomalib.data.datasets.base.image import AnomalibDataset
from pandas import DataFrame
from torchvision.transforms.v2 import Transform
from torchvision.tv_tensors import Image, Mask

from zsad.data.dataclasses import ZSADBatch, ZSADItem
from zsad.data.files import read_image, read_mask
from zsad.data.perlin import PerlinAnomalies
from zsad.data.transforms import tile_mosaic

logger = logging.getLogger(__name__)

MosaicLabel = Literal["indexed", "any"]
_REQUIRED_COLUMNS = ("image_path", "split", "label_index", "mask_path", "category")


def _mask_path(value: object) -> str | None:
    # pandas turns None into NaN when tables are concatenated; anomalib's validator needs None or a path.
    return value if isinstance(value, str) and value else None


class ZSADDataset(AnomalibDataset):
    """Samples of one or many categories, returned as :class:`~zsad.data.ZSADItem`.

    Items hold the image (float RGB in ``[0, 1]``), ``gt_mask`` (bool ``[H, W]``), ``gt_label``, the paths and the
    ``category``.

    Args:
        samples: anomalib samples table with a ``category`` column (see :func:`zsad.data.layouts.scan_category`).
        augmentations: torchvision v2 transform applied as ``augmentations(image, mask)``; anomalib's datamodule
            replaces it at ``setup()`` by the user augmentations followed by the model's Resize.
        dataset_name: Name of the source dataset (``mvtec``, ``visa``, ``gogan``, ...).
        mask_threshold: Mask binarisation threshold, see :func:`zsad.data.files.binarize_mask`.
        anomalies: Synthetic-anomaly generator applied to normal samples after the augmentations.
        mosaic_probability: Probability of replacing a sample by a 2x2 mosaic of four random samples of its category.
        mosaic_label: Label of a mosaic: ``"indexed"`` keeps the indexed sample's label (APRIL-GAN's behaviour),
            ``"any"`` is 1 if any tile is anomalous.
        seed: Base seed of all per-sample randomness; ``None`` uses torch's global RNG.
    """

    def __init__(
        self,
        samples: DataFrame,
        augmentations: Transform | None = None,
        *,
        dataset_name: str = "zsad",
        mask_threshold: int | None = None,
        anomalies: PerlinAnomalies | None = None,
        mosaic_probability: float = 0.0,
        mosaic_label: MosaicLabel = "indexed",
        seed: int | None = None,
    ) -> None:
        super().__init__(augmentations=augmentations)
        missing = [column for column in _REQUIRED_COLUMNS if column not in samples.columns]
        if missing:
            msg = f"samples lack the column(s) {missing}; build them with zsad.data.layouts.scan_category."
            raise ValueError(msg)
        if not 0.0 <= mosaic_probability <= 1.0:
            msg = f"mosaic_probability must be in [0, 1], got {mosaic_probability}."
            raise ValueError(msg)
        if mosaic_label not in ("indexed", "any"):
            msg = f"mosaic_label must be 'indexed' or 'any', got {mosaic_label!r}."
            raise ValueError(msg)
        self._by_category: dict[str, np.ndarray] | None = None
        self._warned_vanished = False
        self.samples = samples
        self.dataset_name = dataset_name
        self.mask_threshold = mask_threshold
        self.anomalies = anomalies
        self.mosaic_probability = mosaic_probability
        self.mosaic_label = mosaic_label
        self.seed = seed
        self.epoch = 0
        categories = self.categories
        self.category = categories[0] if len(categories) == 1 else None

    @property
    def samples(self) -> DataFrame:
        """The samples table (sorted by image path, as anomalib keeps it)."""
        return super().samples

    @samples.setter
    def samples(self, samples: DataFrame) -> None:
        AnomalibDataset.samples.fset(self, samples)
        self._by_category = None  # subsample / + replace the table: the per-category index must follow

    @property
    def name(self) -> str:
        """Name of the source dataset."""
        return self.dataset_name

    @property
    def task(self) -> TaskType:
        """Always segmentation: every sample has a mask (all-zero for normal images)."""
        return TaskType.SEGMENTATION

    @property
    def categories(self) -> list[str]:
        """Sorted categories present in the samples."""
        return sorted(self.samples["category"].unique().tolist())

    @property
    def collate_fn(self) -> Callable[[list[ZSADItem]], ZSADBatch]:
        """Collate to :class:`~zsad.data.ZSADBatch` (keeps the per-sample categories)."""
        return ZSADBatch.collate

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that, with ``seed`` and the index, determines a sample's random draws."""
        self.epoch = int(epoch)

    def sample_seed(self, index: int) -> int:
        """Seed of sample ``index`` in the current epoch (a hash of ``(seed, epoch, index)``)."""
        if self.seed is None:
            msg = "this dataset has no seed."
            raise RuntimeError(msg)
        return int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])

    def __getitem__(self, index: int) -> ZSADItem:
        """Load, augment and (optionally) corrupt sample ``index``."""
        if self.seed is None:
            return self._make_item(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.sample_seed(index))
            return self._make_item(index)

    def load(self, index: int) -> tuple[Image, Mask, int]:
        """Image, 0/1 uint8 mask and label of sample ``index`` at file resolution, without any transform."""
        row = self.samples.iloc[index]
        image = read_image(row.image_path)
        label = int(row.label_index)
        if label == 1:
            mask = read_mask(row.mask_path, size=tuple(image.shape[-2:]), threshold=self.mask_threshold)
        else:
            mask = Mask(torch.zeros(image.shape[-2:], dtype=torch.uint8))
        return image, mask, label

    def _warn_vanished(self, image_path: str, size: tuple[int, ...]) -> None:
        # Nearest downsampling can erase a 1-pixel crack entirely: the image keeps label 1 with an empty mask. Say so
        # once per dataset (and worker) instead of per sample; evaluating at native resolution avoids it.
        if not self._warned_vanished:
            self._warned_vanished = True
            logger.warning(
                "The mask of %s (and possibly others) is empty after the transforms (output %s): thin defects vanish "
                "under nearest downsampling and crops can cut defects out. Pixel metrics at this size do not see "
                "them; consider native-resolution evaluation.",
                image_path,
                "x".join(map(str, size)),
            )

    def _category_indices(self, category: str) -> np.ndarray:
        if self._by_category is None:
            groups = self.samples.groupby("category").indices
            self._by_category = {str(key): np.asarray(value) for key, value in groups.items()}
        return self._by_category[category]

    def _mosaic(self, label: int, category: str) -> tuple[Image, Mask, int]:
        candidates = self._category_indices(category)
        picks = candidates[torch.randint(len(candidates), (4,)).numpy()]
        tiles = [self.load(int(pick)) for pick in picks]
        image, mask = tile_mosaic([tile[0] for tile in tiles], [tile[1] for tile in tiles])
        if self.mosaic_label == "any":
            label = max(tile[2] for tile in tiles)
        return image, mask, label

    def _make_item(self, index: int) -> ZSADItem:
        row = self.samples.iloc[index]
        category = str(row.category)
        mask_path = _mask_path(row.mask_path)
        if self.mosaic_probability > 0 and torch.rand(1).item() < self.mosaic_probability:
            image, mask, label = self._mosaic(int(row.label_index), category)
            mask_path = None  # the mask is a mosaic of four files: no single file to read it from
        else:
            image, mask, label = self.load(index)
        if self.augmentations is not None:
            had_defect = label == 1 and bool(mask.any())
            image, mask = self.augmentations(image, mask)
            if had_defect and not mask.any():
                self._warn_vanished(str(row.image_path), tuple(image.shape[-2:]))
            # Bicubic resizing of float images overshoots [0, 1] (up to ~10 % at edges); the CLIP reference pipeline
            # resizes uint8 PIL images, which clips. Clip too, so samples stay valid [0, 1] images.
            image = image.clamp_(0.0, 1.0)
        if self.anomalies is not None and label == 0:
            image, mask, label = self.anomalies(image)
            mask_path = None
        return ZSADItem(
            image=image,
            gt_label=torch.tensor(label),
            gt_mask=mask,
            image_path=str(row.image_path),
            mask_path=mask_path,
            category=category,
        )


class ConcatZSADDataset(torch.utils.data.ConcatDataset):
    """Several :class:`ZSADDataset` trained on as one (a main source plus extra sources, e.g. AdaCLIP's medical set).

    Each part keeps its own augmentation settings (the mosaic stays with the source that has it), its own name and
    its own seeded draws; the epoch reaches every part.
    """

    datasets: list[ZSADDataset]

    @property
    def samples(self) -> DataFrame:
        """The parts' sample tables, one after the other."""
        import pandas as pd

        return pd.concat([d.samples for d in self.datasets], ignore_index=True)

    @property
    def name(self) -> str:
        """The parts' names joined with ``+``."""
        return "+".join(d.name for d in self.datasets)

    @property
    def categories(self) -> list[str]:
        """Sorted categories of all parts."""
        return sorted({c for d in self.datasets for c in d.categories})

    @property
    def collate_fn(self) -> Callable[[list[ZSADItem]], ZSADBatch]:
        """Collate to :class:`~zsad.data.ZSADBatch`."""
        return ZSADBatch.collate

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch to every part."""
        for dataset in self.datasets:
            dataset.set_epoch(epoch)

    @property
    def augmentations(self) -> Transform | None:
        """The parts' augmentations (the datamodule sets them, with the model's Resize, on every part)."""
        return self.datasets[0].augmentations

    @augmentations.setter
    def augmentations(self, value: Transform | None) -> None:
        for dataset in self.datasets:
            dataset.augmentations = value
