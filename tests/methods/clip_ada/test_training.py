"""CLIP-ADA learns: self-supervised fit on generated normal images with the data layer's Perlin anomalies.

The Lightning module's own ``compute_loss`` and ``configure_optimizers`` drive a short loop over the unified
datamodule (all categories' normal train images, synthetic anomalies on), on the tiny random backbone.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from zsad.data import PerlinAnomalies, UnifiedDataset, make_mvtec_like
from zsad.methods.clip_ada import CLIPADA

SIZE = 98


def pixel_auroc(model: CLIPADA, images: torch.Tensor, masks: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        maps = model.model(model.pre_processor.transform(images)).anomaly_map
    model.train()
    return roc_auc_score(masks.flatten().numpy(), maps.flatten().numpy())


def test_fit_on_synthetic_anomalies_lowers_the_loss_and_raises_pixel_auroc(tmp_path) -> None:
    root = make_mvtec_like(
        tmp_path / "mvtec", categories=("alpha", "beta"), n_train=16, n_test_good=4, n_test_defect=1, size=SIZE
    )
    # Full-strength anomalies on every sample: the most signal per step for a short test (defaults: 0.5, 0.2-1.0).
    datamodule = UnifiedDataset(
        dataset="mvtec",
        root=root,
        train_batch_size=8,
        eval_batch_size=64,
        image_size=SIZE,
        seed=0,
        check_files=False,
        synthetic_anomalies=True,
        anomaly_probability=1.0,
        blend_factor=1.0,
    )
    datamodule.setup()
    assert len(datamodule.train_data) == 32  # both categories' normal train images, one pool

    # Held out: the normal TEST images of both categories with seeded Perlin anomalies (never seen in training).
    test = next(iter(datamodule.test_dataloader()))
    synth = PerlinAnomalies(probability=1.0, blend_factor=1.0)
    held_out = [synth(image, seed=1_000 + i) for i, image in enumerate(test.image[test.gt_label == 0])]
    images = torch.stack([image.as_subclass(torch.Tensor) for image, _, _ in held_out])
    masks = torch.stack([mask.as_subclass(torch.Tensor) for _, mask, _ in held_out]).bool()
    assert len(images) == 8 and masks.any()

    torch.manual_seed(0)
    model = CLIPADA(backbone="tiny", weights="random", image_size=SIZE, sigma=1.0, lr=1e-2, evaluator=False)
    optimizer = model.configure_optimizers()["optimizer"]
    untrained = pixel_auroc(model, images, masks)

    model.train()
    losses = []
    for _epoch in range(4):
        for batch in datamodule.train_dataloader():
            assert batch.gt_mask is not None and batch.gt_mask.any()
            normalised = SimpleNamespace(image=model.pre_processor.transform(batch.image), gt_mask=batch.gt_mask)
            out = model.compute_loss(normalised)
            assert set(out) == {"loss", "coarse", "refine"}
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
            losses.append(out["loss"].item())
    trained = pixel_auroc(model, images, masks)

    assert len(losses) == 16
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])  # seed 0: ~2.2 -> ~0.40
    # Seed 0: ~0.38 untrained -> ~0.68. (Random tiny features cap this near 0.7; an untrained model's AUROC varies
    # 0.35-0.68 with the seed, hence a fixed seed. Drawn defects of the generated test split are not used: features
    # of a random backbone carry no semantics that would transfer from Perlin textures to scratches and spots.)
    assert trained > untrained + 0.1
    assert trained > 0.6
