"""Few-shot references: k normal training images of a category, seeded, for AdaptCLIP / WinCLIP-style memories.

The references are drawn from the **train** split's normal images (sorted by path, then a seeded permutation), so a
``(category, k, seed)`` triple always gives the same images, and passed through the same transform as the test
samples (resized, not normalised: the model's pre-processor normalises them like any batch).
"""

from __future__ import annotations

import torch
from anomalib.data import AnomalibDataModule
from pandas import DataFrame
from torchvision.transforms.v2 import Transform

from zsad.data.dataclasses import ZSADBatch
from zsad.data.dataset import ZSADDataset


def sample_references(
    samples: DataFrame,
    k: int,
    seed: int,
    *,
    category: str,
    transform: Transform | None = None,
    dataset_name: str = "zsad",
) -> ZSADBatch:
    """Draw ``k`` normal training images of one category.

    Args:
        samples: Samples table of the category (anomalib columns; ``split``, ``label_index``, ``image_path``).
        k: Number of references (>= 1).
        seed: Seed of the draw; the same seed gives the same images.
        category: Category name, attached to the batch and used in messages.
        transform: Transform of the test samples (resize); ``None`` keeps the file resolution.
        dataset_name: Dataset name for the batch's dataset.

    Returns:
        A :class:`~zsad.data.ZSADBatch` of ``k`` normal images (labels 0, zero masks), in path order.

    Raises:
        ValueError: ``k < 1`` or fewer than ``k`` normal training images exist.
    """
    if k < 1:
        msg = f"k must be at least 1, got {k}."
        raise ValueError(msg)
    normals = samples[(samples.split == "train") & (samples.label_index == 0)].sort_values("image_path")
    if len(normals) < k:
        msg = (
            f"Category {category!r} has {len(normals)} normal training image(s) in train/good/, fewer than the "
            f"k={k} few-shot references requested. Fix: lower k, or add normal images to train/good/."
        )
        raise ValueError(msg)
    generator = torch.Generator().manual_seed(int(seed))
    chosen = torch.randperm(len(normals), generator=generator)[:k].tolist()
    rows = normals.iloc[chosen].reset_index(drop=True).copy()
    rows["category"] = category
    rows.attrs["task"] = "segmentation"
    dataset = ZSADDataset(rows, augmentations=transform, dataset_name=dataset_name)
    return ZSADBatch.collate([dataset[index] for index in range(len(dataset))])


def few_shot_references(datamodule: AnomalibDataModule, k: int, seed: int, category: str | None = None) -> ZSADBatch:
    """Few-shot references from any datamodule: zsad's own or a plain single-category anomalib one.

    zsad datamodules answer with their :meth:`few_shot_references`; a plain anomalib datamodule (e.g.
    ``anomalib.data.MVTecAD``) must be set up, and its ``train_data`` and test transform are used.

    Args:
        datamodule: The datamodule.
        k: Number of references.
        seed: Seed of the draw.
        category: Category; default the datamodule's own (single-category datamodules).

    Returns:
        A :class:`~zsad.data.ZSADBatch` of ``k`` normal training images.

    Raises:
        ValueError: Unknown category, or too few normal images.
        RuntimeError: A plain anomalib datamodule that was not set up.
    """
    own = getattr(datamodule, "few_shot_references", None)
    if callable(own):
        return own(category=category if category is not None else datamodule.category, k=k, seed=seed)
    category = category if category is not None else datamodule.category
    if category != datamodule.category:
        msg = f"{type(datamodule).__name__} holds category {datamodule.category!r}, not {category!r}."
        raise ValueError(msg)
    train_data = getattr(datamodule, "train_data", None)
    if train_data is None:
        msg = f"call {type(datamodule).__name__}.setup() before drawing few-shot references."
        raise RuntimeError(msg)
    test_data = getattr(datamodule, "test_data", None)
    return sample_references(
        train_data.samples,
        k,
        seed,
        category=category,
        transform=getattr(test_data, "augmentations", None),
        dataset_name=datamodule.name,
    )
