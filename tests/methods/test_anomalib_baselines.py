"""anomalib's PatchCore and EfficientAD on zsad's data through ``zsad fit``, scored by zsad's evaluator; offline errors.

Random weights only: PatchCore with ``pre_trained: false``; EfficientAD with a random teacher written where anomalib
reads the released one (under ``$XDG_CACHE_HOME``) and a two-image stand-in for Imagenette.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zsad.backbone.cnn import PretrainedWeightsError
from zsad.cli import build_cli
from zsad.metrics import ZSADEvaluator

CONFIGS = Path(__file__).parents[2] / "configs"
RUN = ["--data.init_args.num_workers=0", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"]


def _results(run: Path) -> dict[str, dict[str, float]]:
    return {r["category"]: r for r in json.loads(next(run.rglob("results/metrics.json")).read_text())}


def test_patchcore_fits_and_tests_on_gogan_with_zsads_evaluator(tmp_path: Path, gogan_like_root: Path) -> None:
    run = tmp_path / "run"
    cli = build_cli(
        [
            "fit",
            "-c",
            str(CONFIGS / "patchcore" / "gogan.yaml"),
            *RUN,
            f"--data.init_args.root={gogan_like_root}",
            "--data.init_args.category=tanizumi",
            "--model.init_args.backbone=resnet18",
            "--model.init_args.layers=[layer2]",
            "--model.init_args.pre_trained=false",
            "--model.init_args.pre_processor=anomalib.pre_processing.PreProcessor",  # native 64 px, no resize
            f"--trainer.default_root_dir={run}",
            "--test_after_fit=true",
        ]
    )
    assert isinstance(cli.model.evaluator, ZSADEvaluator)  # replaced anomalib's default metrics
    assert cli.model.post_processor is None  # raw scores reach the exact evaluator
    assert cli.model.model.memory_bank.shape[0] > 0
    row = _results(run)["tanizumi"]
    assert 0.0 <= row["image_auroc"] <= 1.0 and 0.0 <= row["pixel_aupro"] <= 1.0
    assert {"image_auroc_crack_joint_opening", "image_auroc_efflorescence", "image_auroc_spalling_missing"} <= set(row)


def test_patchcore_offline_without_timm_weights_names_the_file(
    tmp_path: Path, gogan_like_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsError) as info:
        build_cli(["test", "-c", str(CONFIGS / "patchcore" / "gogan.yaml"), f"--data.init_args.root={gogan_like_root}"])
    message = str(info.value)
    assert "timm/wide_resnet50_2" in message and "model.safetensors" in message and str(tmp_path / "hub") in message


@pytest.fixture
def efficientad_assets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Anomalib's cache redirected to ``tmp_path``; returns the Imagenette stand-in folder (not yet created)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "imagenette"


def test_efficientad_offline_without_teacher_and_imagenette_names_both(
    efficientad_assets: Path, gogan_like_root: Path
) -> None:
    with pytest.raises(PretrainedWeightsError) as info:
        build_cli(
            [
                "fit",
                "-c",
                str(CONFIGS / "efficientad" / "gogan.yaml"),
                f"--data.init_args.root={gogan_like_root}",
                f"--model.init_args.imagenet_dir={efficientad_assets}",
            ]
        )
    message = str(info.value)
    assert "efficientad_pretrained_weights" in message and "pretrained_teacher_small.pth" in message
    assert str(efficientad_assets) in message and "imagenette2.tgz" in message


def test_efficientad_fits_and_tests_on_gogan_with_a_random_teacher(tmp_path: Path, efficientad_assets: Path) -> None:
    from anomalib.models.image.efficient_ad.torch_model import EfficientAdModel
    from anomalib.utils.path import get_pretrained_weights_dir

    from zsad.data import make_gogan_like

    torch.manual_seed(0)
    teacher_dir = get_pretrained_weights_dir() / "efficientad_pretrained_weights"
    assert str(tmp_path) in str(teacher_dir)  # never the user's real cache
    teacher_dir.mkdir(parents=True)
    teacher = EfficientAdModel(teacher_out_channels=8, model_size="small").teacher
    torch.save(teacher.state_dict(), teacher_dir / "pretrained_teacher_small.pth")
    (efficientad_assets / "n0").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            efficientad_assets / "n0" / f"{i}.png"
        )
    root = make_gogan_like(tmp_path / "gogan", categories=("tanizumi",), n_train=2, n_test_good=1, n_test_defect=1)
    run = tmp_path / "run"
    cli = build_cli(
        [
            "fit",
            "-c",
            str(CONFIGS / "efficientad" / "gogan.yaml"),
            *RUN,
            f"--data.init_args.root={root}",
            "--data.init_args.category=tanizumi",
            f"--model.init_args.imagenet_dir={efficientad_assets}",
            "--model.init_args.teacher_out_channels=8",
            "--trainer.max_steps=2",
            "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={run}",
            "--test_after_fit=true",
        ]
    )
    assert isinstance(cli.model.evaluator, ZSADEvaluator)
    row = _results(run)["tanizumi"]
    assert 0.0 <= row["image_auroc"] <= 1.0 and 0.0 <= row["pixel_auroc"] <= 1.0
    assert "image_auroc_spalling_missing" in row
