"""Synthetic anomalies for self-supervised training (CLIP-ADA): anomalib's Perlin generator, exact masks, seeded.

anomalib's :class:`~anomalib.data.utils.generators.perlin.PerlinAnomalyGenerator` implements the DRAEM recipe
(Perlin mask thresholded at 0.5, rotated, a 3-of-10 augmented source texture blended in with weight in
``blend_factor``, probability ``probability`` of inserting anything). Without ``anomaly_source_path`` it blends a
Perlin-noise texture instead of DTD images — offline-friendly, a documented deviation from DRAEM.

Two things are added here:

* **Exact masks.** The returned mask is exactly the set of pixels whose value changed (a blend can leave a masked
  pixel unchanged, e.g. where source and image are both saturated); an empty result gives label 0, as in DRAEM.
* **Determinism.** The generator draws from torch's global RNG; :meth:`PerlinAnomalies.__call__` runs it inside a
  forked RNG seeded by the caller, so the anomaly of a sample depends only on ``(seed, epoch, index)`` — not on the
  worker that loads it or on what ran before.
"""

from __future__ import annotations

from pathlib import Path

import torch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from torchvision.tv_tensors import Image, Mask

# Seed for the generator's construction-time draws (anomalib samples its solarize threshold in ``__init__``).
_CONSTRUCTION_SEED = 0


class PerlinAnomalies:
    """Insert a Perlin-noise anomaly into a normal image.

    Args:
        probability: Probability of inserting an anomaly (DRAEM/CLIP-ADA: 0.5).
        blend_factor: Weight of the perturbation, a float or a ``(min, max)`` range (DRAEM's ``1 - beta``).
        rotation_range: Rotation of the Perlin pattern in degrees.
        anomaly_source_path: Folder of texture images to blend in (DRAEM: DTD); ``None`` synthesises noise textures.

    Example:
        >>> synth = PerlinAnomalies(probability=1.0)
        >>> clean = torch.rand(3, 64, 64)
        >>> image, mask, label = synth(clean, seed=3)
        >>> bool(((image != clean).any(0) == mask.bool()).all())
        True
    """

    def __init__(
        self,
        probability: float = 0.5,
        blend_factor: float | tuple[float, float] = (0.2, 1.0),
        rotation_range: tuple[float, float] = (-90.0, 90.0),
        anomaly_source_path: str | Path | None = None,
    ) -> None:
        if not 0.0 <= probability <= 1.0:
            msg = f"probability must be in [0, 1], got {probability}."
            raise ValueError(msg)
        if anomaly_source_path is not None and not Path(anomaly_source_path).is_dir():
            msg = f"anomaly_source_path {str(anomaly_source_path)!r} is not a folder of texture images."
            raise FileNotFoundError(msg)
        self.probability = probability
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_CONSTRUCTION_SEED)
            self.generator = PerlinAnomalyGenerator(
                anomaly_source_path=anomaly_source_path,
                probability=probability,
                blend_factor=tuple(blend_factor) if isinstance(blend_factor, list) else blend_factor,
                rotation_range=tuple(rotation_range),
            )

    def __call__(self, image: torch.Tensor, seed: int | None = None) -> tuple[Image, Mask, int]:
        """Maybe insert an anomaly.

        Args:
            image: ``[3, H, W]`` float image in ``[0, 1]`` (before CLIP normalisation).
            seed: Seed of this draw; ``None`` uses (and advances) torch's global RNG.

        Returns:
            ``(image, mask, label)``: the possibly modified image, a ``[H, W]`` uint8 0/1 mask that is exactly the
            changed pixels, and ``1`` if any pixel changed else ``0``.
        """
        if seed is None:
            augmented, _ = self.generator(image.as_subclass(torch.Tensor))
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                augmented, _ = self.generator(image.as_subclass(torch.Tensor))
        augmented = augmented.clamp(0.0, 1.0).to(image.dtype)
        # Outside the Perlin region the blend returns the image bit-exactly; inside, a pixel may come out unchanged.
        # The label mask is defined as what actually changed, so a model is never told to find an invisible defect.
        changed = (augmented != image.as_subclass(torch.Tensor)).any(dim=0)
        return Image(augmented), Mask(changed.to(torch.uint8)), int(changed.any())
