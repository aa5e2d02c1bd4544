"""anomalib datamodules for zero-shot work: MVTec AD, VisA, Gogan, the cross-dataset and unified protocols.

All of them are :class:`anomalib.data.AnomalibDataModule` subclasses, usable with anomalib's ``Engine`` (e.g.
``anomalib fit --model Patchcore --data zsad.data.Gogan``), a plain Lightning ``Trainer`` and zsad methods. On
top of anomalib they

* return :class:`~zsad.data.ZSADItem` / :class:`~zsad.data.ZSADBatch` (samples carry their ``category``);
* expose ``name`` (``"mvtec"``, ``"visa"``, ``"gogan"``; for :class:`CrossDataset` the *test* dataset's) and
  ``category_names`` (the test categories) for metric keys ``test/<name>/<category>/<metric>``;
* check the folder layout and every file before training (:mod:`zsad.data.layouts`, :mod:`zsad.data.files`);
* draw few-shot references (:meth:`ZSADDataModule.few_shot_references`);
* resize to the model input through anomalib's own mechanism: at ``setup()`` ``AnomalibDataModule`` appends the
  ``Resize`` of ``trainer.model.pre_processor.transform`` to each dataset's augmentations. Without a model,
  ``image_size=S`` appends ``Resize((S, S), bicubic, antialias=True)`` the same way; the model's Resize wins.

:class:`MVTecAD` and :class:`Visa` subclass anomalib's datamodules (same arguments, same parsing); :class:`Gogan`
is the anomalib-style datamodule of the outdoor concrete-block dataset; :class:`CrossDataset` trains on all
categories of dataset A's labelled test split and tests on dataset B's test split; :class:`UnifiedDataset` is the
unified multi-class one-class protocol (all categories' normal training images, optionally with Perlin synthetic
anomalies, for fit; the test split for test).
"""

from __future__ import annotations

import logging
import urllib.error
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import torch
from anomalib.data import AnomalibDataModule
from anomalib.data import MVTecAD as _AnomalibMVTecAD
from anomalib.data import Visa as _AnomalibVisa
from anomalib.data.transforms.utils import extract_transforms_by_type
from anomalib.data.utils import TestSplitMode, ValSplitMode
from anomalib.utils.attrs import get_nested_attr
from torch.utils.data import DataLoader, Sampler
from torchvision.transforms.v2 import Resize, Transform

from zsad.data.dataclasses import ZSADBatch
from zsad.data.dataset import ConcatZSADDataset, MosaicLabel, ZSADDataset
from zsad.data.errors import DatasetNotFoundError
from zsad.data.few_shot import sample_references
from zsad.data.files import check_samples
from zsad.data.layouts import (
    GOGAN,
    MVTEC,
    VISA,
    DatasetSpec,
    category_root,
    get_spec,
    is_visa_raw,
    list_categories,
    require_root,
    scan_category,
    select_split,
    visa_csv_categories,
)
from zsad.data.perlin import PerlinAnomalies
from zsad.data.transforms import append_transform, resize_transform

logger = logging.getLogger(__name__)

ALL_CATEGORIES = "all"


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------


class EpochSampler(Sampler[int]):
    """Shuffling sampler whose order depends only on ``(seed, epoch)`` and that tells the dataset the epoch.

    Lightning calls ``set_epoch`` on the train sampler at the start of every epoch; the dataset uses the epoch in its
    per-sample seed, so synthetic anomalies and augmentations differ between epochs yet are reproducible.

    Args:
        dataset: The dataset (its ``set_epoch`` is called when it has one).
        seed: Seed of the permutation; ``None`` draws from torch's global RNG.
        shuffle: Shuffle (train) or keep the order.
    """

    def __init__(self, dataset: Any, seed: int | None = None, shuffle: bool = True) -> None:
        self.dataset = dataset
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (Lightning calls this before each training epoch)."""
        self.epoch = int(epoch)
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(self.epoch)

    def __iter__(self) -> Iterator[int]:
        """Indices of one epoch."""
        n = len(self.dataset)
        if not self.shuffle:
            return iter(range(n))
        generator = torch.Generator()
        if self.seed is None:
            generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        else:
            generator.manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(n, generator=generator).tolist())

    def __len__(self) -> int:
        """Number of samples per epoch."""
        return len(self.dataset)


# ----------------------------------------------------------------------------------------------------------------
# Shared behaviour
# ----------------------------------------------------------------------------------------------------------------


def _download(prepare: Callable[[], None], spec: DatasetSpec, root: Path) -> None:
    """Run anomalib's download/prepare step, turning network and archive failures into one clear error."""
    try:
        prepare()
    except (urllib.error.URLError, OSError, RuntimeError, ValueError) as err:
        msg = f"Could not download/prepare {spec.title} into {str(root)!r} ({type(err).__name__}: {err}).\n"
        raise DatasetNotFoundError(msg + spec.describe()) from err


class ZSADDataModule(AnomalibDataModule):
    """Behaviour shared by all zsad datamodules (not instantiated directly).

    Subclasses call :meth:`_init_zsad` in ``__init__`` and build their datasets with :meth:`_build_dataset`.
    """

    image_size: int | None
    mask_threshold: int | None
    check_files: bool

    def _init_zsad(
        self,
        *,
        dataset_name: str,
        image_size: int | None,
        mask_threshold: int | None,
        check_files: bool,
    ) -> None:
        if image_size is not None and image_size < 1:
            msg = f"image_size must be positive, got {image_size}."
            raise ValueError(msg)
        self._dataset_name = dataset_name
        self.image_size = image_size
        self.mask_threshold = mask_threshold
        self.check_files = check_files
        self._scanned: dict[tuple[str, str, str], pd.DataFrame] = {}
        self._checked: set[tuple[str, str, str, str]] = set()

    # -- identity ---------------------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """Dataset name used in metric keys and result paths (``mvtec``, ``visa``, ``gogan``, ...)."""
        return self._dataset_name

    @property
    def val_name(self) -> str:
        """Dataset name of the validation split in metric keys (the same dataset here)."""
        return self.name

    @property
    def category_names(self) -> list[str]:
        """Test categories."""
        return [self.category]

    # -- resizing ---------------------------------------------------------------------------------------------------

    def _model_transform(self) -> Transform | None:
        return get_nested_attr(self, "trainer.model.pre_processor.transform", None)

    def _model_resize(self) -> Resize | None:
        transform = self._model_transform()
        resizes = extract_transforms_by_type(transform, Resize) if transform is not None else []
        return resizes[0] if resizes else None

    def _update_augmentations(self) -> None:
        # anomalib appends the model's Resize to every subset; when no model (or one without Resize) is attached,
        # image_size plays the same role so that standalone use and few-shot references get the same size.
        super()._update_augmentations()
        if self.image_size is None:
            return
        model_resize = self._model_resize()
        if model_resize is not None:
            if tuple(model_resize.size) != (self.image_size, self.image_size):
                logger.warning(
                    "image_size=%d ignored: the model's pre-processor resizes to %s.",
                    self.image_size,
                    model_resize.size,
                )
            return
        for subset_name in ("train", "val", "test"):
            subset = getattr(self, f"{subset_name}_data", None)
            if subset is not None:
                augmentations = getattr(self, f"{subset_name}_augmentations", None)
                subset.augmentations = append_transform(augmentations, resize_transform(self.image_size))

    def eval_transform(self) -> Transform | None:
        """The transform a test sample gets: test augmentations, then the model's Resize (or ``image_size``)."""
        model_transform = self._model_transform()
        if model_transform is not None and self._model_resize() is not None:
            holder = SimpleNamespace(augmentations=None)
            self._update_subset_augmentations(holder, self.test_augmentations, model_transform)  # type: ignore[arg-type]
            return holder.augmentations
        if self.image_size is not None:
            return append_transform(self.test_augmentations, resize_transform(self.image_size))
        return self.test_augmentations

    # -- datasets ---------------------------------------------------------------------------------------------------

    def _scan(self, spec: DatasetSpec, root: Path, category: str) -> pd.DataFrame:
        key = (spec.name, str(root), category)
        if key not in self._scanned:
            self._scanned[key] = scan_category(spec, root, category)
        return self._scanned[key]

    def _split_samples(
        self, spec: DatasetSpec, root: Path, category: str, split: str, threshold: int | None
    ) -> pd.DataFrame:
        samples = select_split(self._scan(spec, root, category), split, spec, category)
        key = (spec.name, str(root), category, split)
        if self.check_files and key not in self._checked:
            check_samples(samples, f"{spec.title} {category!r} {split} split", threshold)
            self._checked.add(key)
        return samples

    def _build_dataset(
        self,
        spec: DatasetSpec,
        root: Path,
        categories: Sequence[str],
        split: str,
        *,
        dataset_name: str | None = None,
        mask_threshold: int | None = None,
        anomalies: PerlinAnomalies | None = None,
        mosaic_probability: float = 0.0,
        mosaic_label: MosaicLabel = "indexed",
    ) -> ZSADDataset:
        threshold = self.mask_threshold if mask_threshold is None else mask_threshold
        frames = [self._split_samples(spec, root, category, split, threshold) for category in categories]
        samples = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        samples.attrs["task"] = "segmentation"
        return ZSADDataset(
            samples,
            dataset_name=dataset_name or spec.name,
            mask_threshold=threshold,
            anomalies=anomalies,
            mosaic_probability=mosaic_probability,
            mosaic_label=mosaic_label,
            seed=self.seed,
        )

    # -- few-shot ---------------------------------------------------------------------------------------------------

    def _reference_source(self) -> tuple[DatasetSpec, Path, int | None]:
        """Dataset, root and mask threshold the few-shot references come from (the test dataset)."""
        raise NotImplementedError

    def few_shot_references(self, category: str, k: int, seed: int) -> ZSADBatch:
        """``k`` normal training images of a test category, seeded, resized like the test samples, not normalised.

        Args:
            category: A test category (one of :attr:`category_names`).
            k: Number of references.
            seed: Seed of the draw (the same seed gives the same images).

        Returns:
            A :class:`~zsad.data.ZSADBatch` of ``k`` images (labels 0, zero masks, ``category`` set).

        Raises:
            ValueError: Unknown category, ``k < 1`` or fewer than ``k`` normal training images.
        """
        if category not in self.category_names:
            msg = f"Unknown category {category!r} for few-shot references; test categories: {self.category_names}."
            raise ValueError(msg)
        spec, root, threshold = self._reference_source()
        samples = self._scan(spec, root, category)
        if self.check_files:
            self._split_samples(spec, root, category, "train", threshold)
        return sample_references(
            samples, k, seed, category=category, transform=self.eval_transform(), dataset_name=self.name
        )

    # -- loaders ----------------------------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        """Shuffled training loader with a seeded, epoch-aware sampler (see :class:`EpochSampler`)."""
        return DataLoader(
            dataset=self.train_data,
            sampler=EpochSampler(self.train_data, seed=self.seed, shuffle=True),
            batch_size=self.train_batch_size,
            num_workers=self.num_workers,
            collate_fn=self.external_collate_fn or self.train_data.collate_fn,
        )

    def val_dataloader(self) -> DataLoader | list:
        """Validation loader, or an empty list (Lightning skips validation) when ``val_split_mode="none"``."""
        if getattr(self, "val_data", None) is None:
            return []
        return super().val_dataloader()


def _single_category_setup(module: ZSADDataModule, spec: DatasetSpec, root: Path, category: str) -> None:
    module.train_data = module._build_dataset(spec, root, [category], "train")
    module.test_data = module._build_dataset(spec, root, [category], "test")


# ----------------------------------------------------------------------------------------------------------------
# Single-category datamodules (anomalib style)
# ----------------------------------------------------------------------------------------------------------------


class MVTecAD(ZSADDataModule, _AnomalibMVTecAD):
    """anomalib's MVTec AD datamodule with zsad samples (``category`` attached), file checks and few-shot references.

    Same arguments and parsing as :class:`anomalib.data.MVTecAD`, plus:

    Args:
        root: Dataset root (``<root>/<category>/train/good``...).
        category: Category, e.g. ``"bottle"``.
        train_batch_size: Training batch size.
        eval_batch_size: Validation/test batch size.
        num_workers: Data-loader workers.
        train_augmentations: Training augmentations (image and mask), before the model's Resize.
        val_augmentations: Validation augmentations.
        test_augmentations: Test augmentations.
        augmentations: Augmentations of all subsets without their own.
        test_split_mode: anomalib test split mode.
        test_split_ratio: anomalib test split ratio.
        val_split_mode: anomalib validation split mode (default: the test split).
        val_split_ratio: anomalib validation split ratio.
        seed: Seed of shuffling and all per-sample randomness (``None``: torch's global RNG).
        image_size: Resize side when no model pre-processor provides a Resize.
        mask_threshold: Mask binarisation threshold (``None``: automatic, see :mod:`zsad.data.files`).
        check_files: Check every image and mask before training.
        download: Let anomalib download the dataset when ``root`` lacks it (default: a clear error instead).
    """

    def __init__(
        self,
        root: Path | str = "./datasets/MVTecAD",
        category: str = "bottle",
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 8,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        test_split_mode: TestSplitMode | str = TestSplitMode.FROM_DIR,
        test_split_ratio: float = 0.2,
        val_split_mode: ValSplitMode | str = ValSplitMode.SAME_AS_TEST,
        val_split_ratio: float = 0.5,
        seed: int | None = None,
        image_size: int | None = None,
        mask_threshold: int | None = None,
        check_files: bool = True,
        download: bool = False,
    ) -> None:
        super().__init__(
            root=root,
            category=category,
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            test_split_mode=test_split_mode,
            test_split_ratio=test_split_ratio,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
        )
        self._init_zsad(
            dataset_name=MVTEC.name, image_size=image_size, mask_threshold=mask_threshold, check_files=check_files
        )
        self.download = download

    def prepare_data(self) -> None:
        """Check that the category exists; download it only with ``download=True``."""
        if (self.root / self.category).is_dir():
            return
        if not self.download:
            category_root(MVTEC, self.root, self.category)  # raises the not-found / unknown-category error
        _download(super().prepare_data, MVTEC, self.root)

    def _setup(self, _stage: str | None = None) -> None:
        _single_category_setup(self, MVTEC, self.root, self.category)

    def _reference_source(self) -> tuple[DatasetSpec, Path, int | None]:
        return MVTEC, self.root, self.mask_threshold


class Visa(ZSADDataModule, _AnomalibVisa):
    """anomalib's VisA datamodule (1cls split, masks binarised ``!= 0``) with zsad samples, checks and references.

    ``root`` is the VisA root: the raw download (converted by anomalib's ``prepare_data`` into
    ``root/visa_pytorch``), or a prepared tree (``root/visa_pytorch/<category>`` or ``root/<category>/train``).
    Arguments as :class:`MVTecAD`.
    """

    def __init__(
        self,
        root: Path | str = "./datasets/visa",
        category: str = "capsules",
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 8,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        test_split_mode: TestSplitMode | str = TestSplitMode.FROM_DIR,
        test_split_ratio: float = 0.2,
        val_split_mode: ValSplitMode | str = ValSplitMode.SAME_AS_TEST,
        val_split_ratio: float = 0.5,
        seed: int | None = None,
        image_size: int | None = None,
        mask_threshold: int | None = None,
        check_files: bool = True,
        download: bool = False,
    ) -> None:
        super().__init__(
            root=root,
            category=category,
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            test_split_mode=test_split_mode,
            test_split_ratio=test_split_ratio,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
        )
        self._init_zsad(
            dataset_name=VISA.name, image_size=image_size, mask_threshold=mask_threshold, check_files=check_files
        )
        self.download = download

    def prepare_data(self) -> None:
        """Convert the raw download with anomalib's 1cls split if needed; download only with ``download=True``."""
        prepare_visa(self.root, self.category, self.download)

    def _setup(self, _stage: str | None = None) -> None:
        # Standalone use (setup() without a Trainer) skips prepare_data: make sure the conversion has happened.
        prepare_visa(self.root, self.category, self.download)
        _single_category_setup(self, VISA, self.root, self.category)

    def _reference_source(self) -> tuple[DatasetSpec, Path, int | None]:
        return VISA, self.root, self.mask_threshold


def prepare_visa(root: Path | str, category: str, download: bool = False) -> None:
    """Make ``root`` readable as prepared VisA: convert the raw download with anomalib (1cls split) if needed.

    Args:
        root: VisA root.
        category: A category that must be present after preparation.
        download: Let anomalib download VisA if it is missing.

    Raises:
        DatasetNotFoundError: Missing dataset (and no download), missing ``split_csv/1cls.csv``, failed download.
        DatasetLayoutError: Unknown category.
    """
    root = Path(root)
    if (VISA.category_parent(root) / category).is_dir() and any(
        (VISA.category_parent(root) / category / split).is_dir() for split in ("train", "test")
    ):
        return
    anomalib_visa = _AnomalibVisa(root=root, category=category)
    if is_visa_raw(root):
        if category not in visa_csv_categories(root):
            category_root(VISA, root, category)  # unknown category: raises with the list of categories
        _download(anomalib_visa.prepare_data, VISA, root)
        return
    if root.is_dir() and (root / category / "Data").is_dir():
        msg = (
            f"Raw VisA found in {str(root)!r} but its split file {str(root / 'split_csv' / '1cls.csv')!r} is missing; "
            "anomalib needs it to build the 1cls train/test split. Fix: copy split_csv/1cls.csv from the VisA "
            "download (or https://github.com/amazon-science/spot-diff) into the root."
        )
        raise DatasetNotFoundError(msg)
    if not download:
        category_root(VISA, root, category)  # raises the not-found / unknown-category error
    _download(anomalib_visa.prepare_data, VISA, root)


class Gogan(ZSADDataModule):
    """The Gogan outdoor concrete-block dataset (seed 003) as an anomalib datamodule, constructed like ``MVTecAD``.

    MVTec layout (``<root>/<category>/train/good``, ``test/good``, ``test/<defect>``,
    ``ground_truth/<defect>/<name>_mask.png``), categories ``nunozumi`` (布積み) and ``tanizumi`` (谷積み), 256x256
    PNG or JPEG images, defect folders as the dataset has them (e.g. ``crack_joint_opening``, ``spalling_missing``,
    ``efflorescence``, ``exudate``). The dataset is not public, so ``root`` is required and nothing is downloaded.
    Evaluation conventions (pixel metrics at the native 256x256) are the evaluator's: see
    :func:`zsad.data.read_native_masks`.

    Args:
        root: Dataset root (required).
        category: ``"nunozumi"`` or ``"tanizumi"``.
        train_batch_size: Training batch size.
        eval_batch_size: Validation/test batch size.
        num_workers: Data-loader workers.
        train_augmentations: Training augmentations (image and mask), before the model's Resize.
        val_augmentations: Validation augmentations.
        test_augmentations: Test augmentations.
        augmentations: Augmentations of all subsets without their own.
        test_split_mode: anomalib test split mode.
        test_split_ratio: anomalib test split ratio.
        val_split_mode: anomalib validation split mode (default: the test split, as anomalib's ``MVTecAD``).
        val_split_ratio: anomalib validation split ratio.
        seed: Seed of shuffling and all per-sample randomness.
        image_size: Resize side when no model pre-processor provides a Resize.
        mask_threshold: Mask binarisation threshold (``None``: automatic; the Gogan mask convention is unverified).
        check_files: Check every image and mask before training.

    Example:
        >>> datamodule = Gogan(root="datasets/gogan", category="nunozumi")  # doctest: +SKIP
    """

    def __init__(
        self,
        root: Path | str,
        category: str = "nunozumi",
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 8,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        test_split_mode: TestSplitMode | str = TestSplitMode.FROM_DIR,
        test_split_ratio: float = 0.2,
        val_split_mode: ValSplitMode | str = ValSplitMode.SAME_AS_TEST,
        val_split_ratio: float = 0.5,
        seed: int | None = None,
        image_size: int | None = None,
        mask_threshold: int | None = None,
        check_files: bool = True,
    ) -> None:
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            test_split_mode=test_split_mode,
            test_split_ratio=test_split_ratio,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
        )
        if root is None:
            msg = f"Gogan needs root=... (the dataset is not public, nothing can be downloaded).\n{GOGAN.describe()}"
            raise DatasetNotFoundError(msg)
        self.root = Path(root)
        self.category = category
        self._init_zsad(
            dataset_name=GOGAN.name, image_size=image_size, mask_threshold=mask_threshold, check_files=check_files
        )

    def prepare_data(self) -> None:
        """Check that the root and category exist (raises with the expected layout otherwise)."""
        category_root(GOGAN, self.root, self.category)

    def _setup(self, _stage: str | None = None) -> None:
        _single_category_setup(self, GOGAN, self.root, self.category)

    def _reference_source(self) -> tuple[DatasetSpec, Path, int | None]:
        return GOGAN, self.root, self.mask_threshold


# ----------------------------------------------------------------------------------------------------------------
# Multi-category protocols
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSource:
    """One dataset of a multi-category protocol, as written in YAML: ``{dataset: visa, root: /data/visa}``.

    Attributes:
        dataset: ``mvtec``, ``visa``, ``gogan`` or ``folder`` (any other MVTec-layout dataset).
        root: Dataset root.
        categories: Categories to use; ``None`` = every category folder under the root.
        name: Name in metric keys (default: ``dataset``; set it for ``folder`` datasets).
        download: Let anomalib download MVTec AD / VisA if the root lacks them.
        mask_threshold: Mask threshold for this dataset (``None``: the datamodule's).
    """

    dataset: str
    root: str | Path
    categories: tuple[str, ...] | None = None
    name: str | None = None
    download: bool = False
    mask_threshold: int | None = None

    @classmethod
    def parse(cls, value: Mapping[str, Any] | DataSource, role: str = "source") -> DataSource:
        """Build from a mapping, rejecting unknown or missing keys with a message naming them."""
        if isinstance(value, DataSource):
            return value
        if not isinstance(value, Mapping):
            msg = f"{role} must be a mapping like {{dataset: mvtec, root: /data/mvtec}}, got {value!r}."
            raise TypeError(msg)
        known = {f.name for f in fields(cls)}
        unknown = set(value) - known
        if unknown:
            msg = f"{role}: unknown key(s) {sorted(unknown)}; allowed: {sorted(known)}."
            raise ValueError(msg)
        missing = [key for key in ("dataset", "root") if value.get(key) in (None, "")]
        if missing:
            msg = f"{role}: missing {missing}, e.g. {{dataset: mvtec, root: /data/mvtec}}."
            raise ValueError(msg)
        categories = value.get("categories")
        if isinstance(categories, str):
            categories = [categories]
        source = cls(
            dataset=str(value["dataset"]),
            root=value["root"],
            categories=tuple(categories) if categories is not None else None,
            name=value.get("name"),
            download=bool(value.get("download", False)),
            mask_threshold=value.get("mask_threshold"),
        )
        get_spec(source.dataset)  # fail now on an unknown dataset name
        return source

    @property
    def spec(self) -> DatasetSpec:
        """The dataset's layout description."""
        return get_spec(self.dataset)

    @property
    def display_name(self) -> str:
        """Name used in metric keys."""
        return self.name or self.spec.name

    @property
    def path(self) -> Path:
        """Root as a path."""
        return Path(self.root).expanduser()

    def prepare(self) -> None:
        """Make the dataset present: convert raw VisA, download MVTec AD / VisA if allowed, else check the root."""
        spec, root = self.spec, self.path
        if spec is VISA:
            categories = self.categories or (visa_csv_categories(root) if is_visa_raw(root) else None)
            if not categories and self.download and not root.is_dir():
                categories = VISA.known_categories
            if categories:
                prepare_visa(root, categories[0], self.download)
                return
        if spec is MVTEC and self.download and not (root.is_dir() and any(root.iterdir())):
            _download(
                _AnomalibMVTecAD(root=root, category=self.categories[0] if self.categories else "bottle").prepare_data,
                MVTEC,
                root,
            )
            return
        require_root(spec, root)

    def resolve_categories(self) -> list[str]:
        """The categories to use: the given ones (checked to exist) or every category under the root."""
        if self.categories is None:
            return list_categories(self.spec, self.path)
        for category in self.categories:
            category_root(self.spec, self.path, category)
        return list(self.categories)


_POOLED_VAL_MODES = (ValSplitMode.NONE, ValSplitMode.SAME_AS_TEST, ValSplitMode.FROM_TRAIN)


class _PooledDataModule(ZSADDataModule):
    """Train on the pooled categories of one split of a source, test on all categories of a target's test split."""

    def __init__(
        self,
        *,
        train_source: DataSource,
        train_split: str,
        test_source: DataSource,
        train_batch_size: int,
        eval_batch_size: int,
        num_workers: int,
        train_augmentations: Transform | None,
        val_augmentations: Transform | None,
        test_augmentations: Transform | None,
        augmentations: Transform | None,
        val_split_mode: ValSplitMode | str,
        val_split_ratio: float,
        seed: int | None,
        image_size: int | None,
        mask_threshold: int | None,
        check_files: bool,
        anomalies: PerlinAnomalies | None = None,
        mosaic_probability: float = 0.0,
        mosaic_label: MosaicLabel = "indexed",
        extra_train_sources: tuple[DataSource, ...] = (),
    ) -> None:
        mode = ValSplitMode(val_split_mode) if val_split_mode else ValSplitMode.NONE
        if mode not in _POOLED_VAL_MODES:
            msg = (
                f"val_split_mode {mode.value!r} is not supported here; use 'none' (default), 'same_as_test' (the "
                "test split, for monitoring only) or 'from_train' (a held-out part of the training pool)."
            )
            raise ValueError(msg)
        # anomalib's test split logic drops the normal test images unless the mode is FROM_DIR (it splits them off
        # and adds them back): fixed here because the protocols always test on the full test split.
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            test_split_mode=TestSplitMode.FROM_DIR,
            val_split_mode=mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
        )
        self.train_source = train_source
        self.train_split = train_split
        self.test_source = test_source
        self.anomalies = anomalies
        self.mosaic_probability = mosaic_probability
        self.mosaic_label = mosaic_label
        self.extra_train_sources = tuple(extra_train_sources)
        self._categories: dict[str, list[str]] = {}
        # Results are per category inside one run; anomalib's Engine uses this in its result path.
        self.category = ALL_CATEGORIES
        self._init_zsad(
            dataset_name=test_source.display_name,
            image_size=image_size,
            mask_threshold=mask_threshold,
            check_files=check_files,
        )

    def _source_categories(self, role: str) -> list[str]:
        if role not in self._categories:
            source = self.train_source if role == "train" else self.test_source
            self._categories[role] = source.resolve_categories()
        return self._categories[role]

    @property
    def category_names(self) -> list[str]:
        """Test categories (given, or every category folder of the test dataset)."""
        return self._source_categories("test")

    @property
    def train_category_names(self) -> list[str]:
        """Training categories."""
        return self._source_categories("train")

    @property
    def val_name(self) -> str:
        """Validation metric keys name the dataset validated on: the source when held out of its pool."""
        if ValSplitMode(self.val_split_mode) == ValSplitMode.FROM_TRAIN:
            return self.train_source.display_name
        return self.name

    def prepare_data(self) -> None:
        """Check both roots (raising with the expected layout), convert raw VisA, download if allowed."""
        self.train_source.prepare()
        if self.test_source != self.train_source:
            self.test_source.prepare()
        for source in self.extra_train_sources:
            source.prepare()

    def _setup(self, _stage: str | None = None) -> None:
        self.prepare_data()  # idempotent; covers standalone setup() without a Trainer
        train, test = self.train_source, self.test_source
        self.train_data = self._build_dataset(
            train.spec,
            train.path,
            self.train_category_names,
            self.train_split,
            dataset_name=train.display_name,
            mask_threshold=train.mask_threshold,
            anomalies=self.anomalies,
            mosaic_probability=self.mosaic_probability,
            mosaic_label=self.mosaic_label,
        )
        if self.extra_train_sources:
            # Extra sources (e.g. AdaCLIP's medical set) train with the main one; the mosaic stays with the main one.
            extras = [
                self._build_dataset(
                    extra.spec,
                    extra.path,
                    extra.resolve_categories(),
                    self.train_split,
                    dataset_name=extra.display_name,
                    mask_threshold=extra.mask_threshold,
                )
                for extra in self.extra_train_sources
            ]
            self.train_data = ConcatZSADDataset([self.train_data, *extras])
        self.test_data = self._build_dataset(
            test.spec,
            test.path,
            self.category_names,
            "test",
            dataset_name=test.display_name,
            mask_threshold=test.mask_threshold,
        )
        logger.info(
            "%s: train %s %s split (%d images, %s); test %s test split (%d images, %s).",
            type(self).__name__,
            train.display_name,
            self.train_split,
            len(self.train_data),
            ", ".join(self.train_category_names),
            test.display_name,
            len(self.test_data),
            ", ".join(self.category_names),
        )

    def _reference_source(self, role: str = "test") -> tuple[DatasetSpec, Path, int | None]:
        source = self.test_source if role == "test" else self.train_source
        return (
            source.spec,
            source.path,
            source.mask_threshold if source.mask_threshold is not None else self.mask_threshold,
        )

    def training_references(self, category: str, k: int, seed: int) -> ZSADBatch:
        """``k`` normal images of a *training* category from the source dataset's train split.

        The training pool is the source's labelled test split; methods that prompt with a normal image of the same
        category while training (AdaptCLIP) draw it here, seeded, resized like the other samples, not normalised.

        Raises:
            ValueError: Unknown training category, ``k < 1`` or fewer than ``k`` normal training images.
        """
        if category not in self.train_category_names:
            msg = f"Unknown training category {category!r}; training categories: {self.train_category_names}."
            raise ValueError(msg)
        spec, root, threshold = self._reference_source("train")
        samples = self._scan(spec, root, category)
        if self.check_files:
            self._split_samples(spec, root, category, "train", threshold)
        return sample_references(
            samples, k, seed, category=category, transform=self.eval_transform(),
            dataset_name=self.train_source.display_name,
        )


class CrossDataset(_PooledDataModule):
    """Cross-dataset zero-shot protocol: train on dataset A's labelled **test** split, test on dataset B's.

    All categories of A's test split (normal images with zero masks and anomalous images with their masks) are
    pooled into one training set; every sample carries its category. B's test split is the test set; ``name`` and
    ``category_names`` are B's. Validation is off by default (no model selection on the target): ``val_split_mode=
    "from_train"`` holds out ``val_split_ratio`` of A's pool (label-aware), ``"same_as_test"`` validates on B's test
    split (monitoring only — selecting checkpoints on it leaks the target).

    Args:
        train: Source A, e.g. ``{dataset: visa, root: /data/visa}`` (optionally ``categories``, ``name``,
            ``download``, ``mask_threshold``).
        test: Target B, e.g. ``{dataset: mvtec, root: /data/mvtec}``.
        train_batch_size: Training batch size.
        eval_batch_size: Validation/test batch size.
        num_workers: Data-loader workers.
        train_augmentations: Training augmentations (image and mask), before the model's Resize.
        val_augmentations: Validation augmentations.
        test_augmentations: Test augmentations.
        augmentations: Augmentations of all subsets without their own.
        val_split_mode: ``"none"``, ``"from_train"`` or ``"same_as_test"``.
        val_split_ratio: Fraction of A's pool held out with ``"from_train"``.
        seed: Seed of shuffling and all per-sample randomness.
        image_size: Resize side when no model pre-processor provides a Resize.
        mask_threshold: Mask binarisation threshold (``None``: automatic).
        check_files: Check every image and mask before training.
        mosaic_probability: APRIL-GAN / AdaCLIP 2x2 same-category mosaic probability (0.2 with MVTec AD as source).
        mosaic_label: ``"indexed"`` (APRIL-GAN: the indexed sample's label) or ``"any"`` (1 if any tile is anomalous).
        extra_train: More sources whose **same split** joins the training pool, e.g. AdaCLIP's medical set:
            ``[{dataset: folder, root: /data/colondb, name: colondb}]``. No mosaic on them.

    Example:
        YAML (LightningCLI ``data:`` block)::

            data:
              class_path: zsad.data.CrossDataset
              init_args:
                train: {dataset: visa, root: /data/visa}
                test: {dataset: mvtec, root: /data/mvtec}
    """

    def __init__(
        self,
        train: dict[str, Any],
        test: dict[str, Any],
        train_batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        val_split_mode: ValSplitMode | str = ValSplitMode.NONE,
        val_split_ratio: float = 0.1,
        seed: int | None = 0,
        image_size: int | None = None,
        mask_threshold: int | None = None,
        check_files: bool = True,
        mosaic_probability: float = 0.0,
        mosaic_label: MosaicLabel = "indexed",
        extra_train: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(
            extra_train_sources=tuple(
                DataSource.parse(extra, f"extra_train[{i}]") for i, extra in enumerate(extra_train or [])
            ),
            train_source=DataSource.parse(train, "train"),
            train_split="test",
            test_source=DataSource.parse(test, "test"),
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
            image_size=image_size,
            mask_threshold=mask_threshold,
            check_files=check_files,
            mosaic_probability=mosaic_probability,
            mosaic_label=mosaic_label,
        )


class UnifiedDataset(_PooledDataModule):
    """Unified multi-class one-class protocol (CLIP-ADA): all categories' normal **train** images for fit.

    The test split of all categories is the test set; the training images optionally get Perlin synthetic anomalies.

    With ``synthetic_anomalies=True`` every training sample passes through anomalib's Perlin anomaly generator after
    resizing (image in ``[0, 1]``, before normalisation): with probability ``anomaly_probability`` it gets an anomaly,
    its mask (exactly the changed pixels) and label 1. The draw depends only on ``(seed, epoch, index)``.

    Args:
        dataset: ``mvtec``, ``visa``, ``gogan`` or ``folder``.
        root: Dataset root.
        categories: Categories; ``None`` = all under the root.
        name: Name in metric keys (default: ``dataset``).
        train_batch_size: Training batch size.
        eval_batch_size: Validation/test batch size.
        num_workers: Data-loader workers.
        train_augmentations: Training augmentations (image and mask), before the model's Resize.
        val_augmentations: Validation augmentations.
        test_augmentations: Test augmentations.
        augmentations: Augmentations of all subsets without their own.
        val_split_mode: ``"none"``, ``"from_train"`` or ``"same_as_test"``.
        val_split_ratio: Fraction of the training pool held out with ``"from_train"``.
        seed: Seed of shuffling and all per-sample randomness.
        image_size: Resize side when no model pre-processor provides a Resize.
        mask_threshold: Mask binarisation threshold (``None``: automatic).
        check_files: Check every image and mask before training.
        download: Let anomalib download MVTec AD / VisA if the root lacks them.
        synthetic_anomalies: Insert Perlin synthetic anomalies into the training images.
        anomaly_probability: Probability of an anomaly per training sample (DRAEM / CLIP-ADA: 0.5).
        blend_factor: Weight of the anomaly texture, a float or ``(min, max)``.
        anomaly_source_path: Folder of texture images (DRAEM: DTD); ``None`` uses Perlin-noise textures.
    """

    def __init__(
        self,
        dataset: str,
        root: Path | str,
        categories: list[str] | None = None,
        name: str | None = None,
        train_batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        val_split_mode: ValSplitMode | str = ValSplitMode.NONE,
        val_split_ratio: float = 0.1,
        seed: int | None = 0,
        image_size: int | None = None,
        mask_threshold: int | None = None,
        check_files: bool = True,
        download: bool = False,
        synthetic_anomalies: bool = False,
        anomaly_probability: float = 0.5,
        blend_factor: float | tuple[float, float] = (0.2, 1.0),
        anomaly_source_path: Path | str | None = None,
    ) -> None:
        source = DataSource.parse(
            {"dataset": dataset, "root": root, "categories": categories, "name": name, "download": download},
            "dataset",
        )
        super().__init__(
            train_source=source,
            train_split="train",
            test_source=source,
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
            image_size=image_size,
            mask_threshold=mask_threshold,
            check_files=check_files,
            anomalies=(
                PerlinAnomalies(
                    probability=anomaly_probability,
                    blend_factor=blend_factor,
                    anomaly_source_path=anomaly_source_path,
                )
                if synthetic_anomalies
                else None
            ),
        )


__all__ = [
    "CrossDataset",
    "DataSource",
    "EpochSampler",
    "Gogan",
    "MVTecAD",
    "UnifiedDataset",
    "Visa",
    "ZSADDataModule",
    "prepare_visa",
]
