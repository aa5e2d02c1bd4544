"""anomalib's own Engine and PatchCore run on generated Gogan-layout data through ``zsad.data.Gogan``."""

from __future__ import annotations

import math
from pathlib import Path


def test_patchcore_fits_and_tests_through_anomalibs_engine(tmp_path: Path) -> None:
    from anomalib.engine import Engine
    from anomalib.models import Patchcore

    from zsad.data import Gogan, make_gogan_like

    root = make_gogan_like(tmp_path / "gogan", categories=("tanizumi",), n_train=6, size=64)
    datamodule = Gogan(root=root, category="tanizumi", train_batch_size=6, eval_batch_size=16, num_workers=0)
    model = Patchcore(
        backbone="resnet18",
        layers=("layer2",),
        pre_trained=False,  # random weights: nothing is downloaded
        coreset_sampling_ratio=0.5,
        num_neighbors=1,
        pre_processor=Patchcore.configure_pre_processor(image_size=(64, 64)),
        visualizer=False,
    )
    engine = Engine(
        default_root_dir=tmp_path / "results",
        logger=False,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    engine.fit(model=model, datamodule=datamodule)
    assert model.model.memory_bank.shape[0] > 0, "the memory bank was filled from the training images"
    (results,) = engine.test(model=model, datamodule=datamodule)
    for key in ("image_AUROC", "pixel_AUROC"):
        assert math.isfinite(results[key]) and 0.0 <= results[key] <= 1.0
    # The model's Resize went into the datasets, and the test set is the whole test split.
    transform = datamodule.test_data.augmentations
    assert tuple(transform.size) == (64, 64)
    assert len(datamodule.test_data) == sum(1 for p in (root / "tanizumi/test").rglob("*.png"))
    # Results land under the dataset's name, as anomalib's Engine lays them out.
    assert any((tmp_path / "results" / "Patchcore" / "gogan" / "tanizumi").iterdir())
