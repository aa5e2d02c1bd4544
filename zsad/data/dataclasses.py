"""anomalib batch dataclasses with the one field zero-shot work needs on top: the sample's category.

anomalib's ``ImageItem``/``ImageBatch`` carry no class name, yet cross-dataset training pools every category of a
dataset and results are reported per category. :class:`ZSADItem` / :class:`ZSADBatch` add ``category`` (and keep
every anomalib field, validator and ``collate``), so anomalib's models, post-processors and metrics accept them
unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from anomalib.data import ImageBatch, ImageItem


@dataclass
class ZSADItem(ImageItem):
    """An anomalib :class:`~anomalib.data.ImageItem` that also knows its category (e.g. ``"bottle"``)."""

    category: str | None = None


@dataclass
class ZSADBatch(ImageBatch):
    """An anomalib :class:`~anomalib.data.ImageBatch` with a per-sample ``category`` list."""

    item_class: ClassVar[type[ZSADItem]] = ZSADItem
    category: list[str] | None = None

    @classmethod
    def collate(cls, items: list[ZSADItem]) -> ZSADBatch:  # type: ignore[override]
        """The anomalib ``collate``, but mask paths survive a batch whose first sample is a normal image.

        anomalib collates only the fields that are set on the *first* item, so a batch starting with a normal
        image (``mask_path`` ``None``) would drop the mask paths of every anomalous image after it, and
        native-resolution evaluation (which reads the masks from their files) could not find them.
        """
        batch = super().collate(items)
        if batch.mask_path is None and any(item.mask_path for item in items):
            batch.mask_path = [item.mask_path for item in items]  # anomalib's validator writes None as "None"
        return batch


def batch_categories(batch: ImageBatch) -> list[str]:
    """Per-sample categories of any anomalib image batch.

    ``ZSADBatch`` carries them; for a plain anomalib batch (e.g. anomalib's ``MVTecAD`` datamodule) the category is
    read from the MVTec layout of ``image_path`` (``<root>/<category>/test/<defect>/<file>``), else ``"all"``.
    """
    categories = getattr(batch, "category", None)
    if categories is not None:
        return list(categories)
    paths = batch.image_path or []
    out = []
    for path in paths:
        parts = str(path).replace("\\", "/").split("/")
        out.append(parts[-4] if len(parts) >= 4 and parts[-3] in ("test", "train", "val", "validation") else "all")
    return out or ["all"] * len(batch.image)
