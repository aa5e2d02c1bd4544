"""Transforms of the data layer: the CLIP resize/normalisation convention, albumentations, and the 2x2 mosaic.

Where each step runs:

* **Resize** to the model input happens in the datasets (workers), on image and mask together; masks are
  ``tv_tensors.Mask`` so torchvision resizes them nearest and they stay binary. anomalib's ``AnomalibDataModule``
  copies the model pre-processor's ``Resize`` into the datasets' augmentations at ``setup()``; a zsad datamodule's
  ``image_size`` does the same when no model is attached.
* **CLIP normalisation** belongs to the model's ``PreProcessor`` (:func:`clip_transform` builds it), so that samples
  stay in ``[0, 1]`` for synthetic anomalies, few-shot references and visualisation.
* **Random augmentation** (albumentations or torchvision v2) is a datamodule's ``train_augmentations``; it runs
  before the model's Resize.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize, Transform
from torchvision.tv_tensors import Image, Mask


def resize_transform(image_size: int | tuple[int, int]) -> Resize:
    """The zsad input resize: bicubic, antialiased (the CLIP preprocessing every ZSAD method uses).

    Args:
        image_size: Side ``S`` (square ``S x S``) or ``(H, W)``.

    Returns:
        A torchvision ``Resize``; applied to a ``Mask`` it resizes nearest.
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True)


def clip_transform(image_size: int | tuple[int, int]) -> Compose:
    """``Compose[Resize(S, bicubic, antialias), Normalize(OpenAI CLIP mean/std)]`` for a model's ``PreProcessor``.

    Only ``Resize``, ``Normalize`` and ``Compose`` are used because anomalib 2.7 persists exactly those in checkpoints.

    Args:
        image_size: Model input side (518 for most methods) or ``(H, W)``.

    Returns:
        The transform; anomalib's datamodule copies its ``Resize`` into the datasets.
    """
    # The backbone module owns the normalisation constants; imported lazily because it pulls in transformers.
    from zsad.backbone.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    return Compose([resize_transform(image_size), Normalize(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)])


def append_transform(augmentations: Transform | None, transform: Transform) -> Transform:
    """``augmentations`` followed by ``transform`` (the way anomalib appends the model's Resize)."""
    if augmentations is None:
        return transform
    if isinstance(augmentations, Compose):
        return Compose([*augmentations.transforms, transform])
    return Compose([augmentations, transform])


class Albumentations(Transform):
    """Run an albumentations pipeline on an image and its mask together, as a torchvision v2 transform.

    It can be used as (or inside) a datamodule's ``train_augmentations``: anomalib's datasets call augmentations as
    ``augmentations(image, mask)``. Images go to albumentations as float32 HWC in ``[0, 1]``, masks as uint8; the
    random state is drawn from torch's RNG, so the zsad datasets' per-sample seeding makes the result deterministic.

    Args:
        transform: An albumentations transform or ``Compose`` (e.g. ``A.Compose([A.HorizontalFlip(), ...])``).

    Example:
        >>> import albumentations as A
        >>> flip = Albumentations(A.HorizontalFlip(p=1.0))
        >>> image, mask = flip(Image(torch.rand(3, 8, 8)), Mask(torch.zeros(8, 8, dtype=torch.uint8)))
    """

    def __init__(self, transform: Any) -> None:
        super().__init__()
        if not callable(transform) or not hasattr(transform, "set_random_seed"):
            msg = f"expected an albumentations transform or Compose, got {type(transform).__name__}."
            raise TypeError(msg)
        self.transform = transform

    def forward(self, *inputs: Any) -> Any:
        """Transform ``image`` or ``(image, mask)``; the output has the same structure and tensor types."""
        image = inputs[0]
        mask = inputs[1] if len(inputs) > 1 else None
        self.transform.set_random_seed(int(torch.randint(0, 2**31 - 1, (1,)).item()))
        kwargs = {"image": image.detach().permute(1, 2, 0).cpu().numpy().astype(np.float32)}
        if mask is not None:
            kwargs["mask"] = mask.detach().cpu().numpy().astype(np.uint8)
        out = self.transform(**kwargs)
        new_image = Image(torch.from_numpy(np.ascontiguousarray(out["image"])).permute(2, 0, 1).clamp(0.0, 1.0))
        if mask is None:
            return new_image
        # albumentations resamples masks nearest by default, but a pipeline may set another mask_interpolation:
        # re-binarise so that masks stay 0/1 whatever the pipeline does.
        new_mask = Mask(torch.from_numpy(np.ascontiguousarray(out["mask"]) > 0).to(torch.uint8))
        return new_image, new_mask

    def __repr__(self) -> str:
        """Show the wrapped pipeline."""
        return f"{type(self).__name__}({self.transform!r})"


def tile_mosaic(images: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> tuple[Image, Mask]:
    """Tile four images (and masks) into a 2x2 mosaic, as APRIL-GAN's ``combine_img``.

    Tiles of another size than the first are resized to it (bilinear for images, nearest for masks), so the mosaic
    is twice the first image's height and width; the model's Resize then brings it to the input size.

    Args:
        images: Four ``[3, H, W]`` images.
        masks: Four ``[H, W]`` 0/1 masks.

    Returns:
        The ``[3, 2H, 2W]`` image and ``[2H, 2W]`` uint8 mask.
    """
    if len(images) != 4 or len(masks) != 4:
        msg = f"a 2x2 mosaic needs 4 images and 4 masks, got {len(images)} and {len(masks)}."
        raise ValueError(msg)
    height, width = images[0].shape[-2:]
    tiles, tile_masks = [], []
    for image, mask in zip(images, masks, strict=True):
        image, mask = image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
        if image.shape[-2:] != (height, width):
            image = F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False)[0]
            mask = F.interpolate(mask[None, None].float(), size=(height, width), mode="nearest")[0, 0]
        tiles.append(image)
        tile_masks.append(mask.to(torch.uint8))
    top, bottom = torch.cat(tiles[:2], dim=-1), torch.cat(tiles[2:], dim=-1)
    mask_top, mask_bottom = torch.cat(tile_masks[:2], dim=-1), torch.cat(tile_masks[2:], dim=-1)
    return Image(torch.cat([top, bottom], dim=-2)), Mask(torch.cat([mask_top, mask_bottom], dim=-2))
