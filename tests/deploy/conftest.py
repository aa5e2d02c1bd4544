"""A trained tiny checkpoint and a folder of user photos, shared by the deploy tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsad.cli import build_cli


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, mvtec_like_root: Path, mvtec_like_root_b: Path) -> Path:
    """LearnableVectors on the tiny backbone after one training step, written by `zsad fit` (records its class)."""
    root = tmp_path_factory.mktemp("deploy_fit")
    build_cli(
        [
            "fit",
            "--model=zsad.methods.LearnableVectors",
            "--model.backbone=tiny",
            "--model.image_size=98",
            "--model.evaluator=false",
            "--data=zsad.data.CrossDataset",
            f"--data.train={{dataset: mvtec, root: {mvtec_like_root}}}",
            f"--data.test={{dataset: mvtec, root: {mvtec_like_root_b}}}",
            "--data.train_batch_size=4",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={root}",
        ]
    )
    (checkpoint,) = root.rglob("*.ckpt")
    return checkpoint


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """img1.png + img1.jpg (same stem), a grey PNG in a subfolder, an EXIF-rotated 64x40 JPEG (shown 40x64)."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8))
    picture.save(root / "img1.png")
    picture.save(root / "img1.jpg", quality=95)
    picture.convert("L").save(root / "sub" / "grey.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    picture.save(root / "rotated.jpg", exif=exif, quality=95)
    return root


def predict_args(checkpoint: Path | str, data_root: Path | str, out_dir: Path, *extra: str) -> list[str]:
    """`zsad predict` on a folder without any config file."""
    return [
        "predict",
        f"--ckpt_path={checkpoint}",
        "--data=zsad.data.Images",
        f"--data.root={data_root}",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={out_dir}",
        *extra,
    ]
