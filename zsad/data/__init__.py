"""zsad data layer: anomalib datamodules for MVTec AD, VisA and Gogan, and what zero-shot work adds to them.

The cross-dataset and unified protocols, few-shot references, Perlin synthetic anomalies, generated datasets and
checks of bad input.

Everything here imports nothing from ``zsad.methods`` or ``zsad.cli``.
"""

from zsad.data import synthetic
from zsad.data.dataclasses import ZSADBatch, ZSADItem, batch_categories
from zsad.data.datamodules import (
    CrossDataset,
    DataSource,
    EpochSampler,
    Gogan,
    MVTecAD,
    UnifiedDataset,
    Visa,
    ZSADDataModule,
    prepare_visa,
)
from zsad.data.dataset import ZSADDataset
from zsad.data.errors import BadImageError, DataError, DatasetLayoutError, DatasetNotFoundError
from zsad.data.few_shot import few_shot_references, sample_references
from zsad.data.files import binarize_mask, check_samples, read_image, read_mask, read_native_masks
from zsad.data.images import Images
from zsad.data.layouts import DATASETS, GOGAN_CATEGORIES, GOGAN_DEFECTS, DatasetSpec, get_spec, list_categories
from zsad.data.perlin import PerlinAnomalies
from zsad.data.synthetic import make_gogan_like, make_mvtec_like, make_visa_like
from zsad.data.transforms import Albumentations, clip_transform, resize_transform, tile_mosaic

__all__ = [
    "DATASETS",
    "GOGAN_CATEGORIES",
    "GOGAN_DEFECTS",
    "Albumentations",
    "BadImageError",
    "CrossDataset",
    "DataError",
    "DataSource",
    "DatasetLayoutError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "EpochSampler",
    "Gogan",
    "Images",
    "MVTecAD",
    "PerlinAnomalies",
    "UnifiedDataset",
    "Visa",
    "ZSADBatch",
    "ZSADDataModule",
    "ZSADDataset",
    "ZSADItem",
    "batch_categories",
    "binarize_mask",
    "check_samples",
    "clip_transform",
    "few_shot_references",
    "get_spec",
    "list_categories",
    "make_gogan_like",
    "make_mvtec_like",
    "make_visa_like",
    "prepare_visa",
    "read_image",
    "read_mask",
    "read_native_masks",
    "resize_transform",
    "sample_references",
    "synthetic",
    "tile_mosaic",
]
