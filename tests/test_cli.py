"""The ``zsad`` command line: subcommands, offline ``--print_config``, W&B logger and repeated runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zsad.cli import build_cli, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*/*.yaml"))


def test_help_lists_the_lightning_subcommands_and_the_extra_commands() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "zsad.cli", "--help"], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    for command in ("fit", "validate", "test", "predict", "benchmark", "export", "demo"):
        assert command in result.stdout


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_prints_offline(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`zsad fit --config X --print_config` resolves every class path without weights, data or network."""
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(config), "--print_config"])
    assert info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    model = printed["model"]
    assert model["class_path"].startswith(("zsad.methods.", "anomalib.models."))
    if model["class_path"].startswith("anomalib."):  # anomalib's baselines are scored by zsad's exact evaluator
        assert model["init_args"]["evaluator"]["class_path"] == "zsad.metrics.ZSADEvaluator"
    assert "trainer" in printed and "data" in printed


def _tiny_fit_args(root: Path, train_root: Path, test_root: Path, logger: str) -> list[str]:
    return [
        "fit",
        "--model=zsad.methods.LearnableVectors",
        "--model.backbone=tiny",
        "--model.image_size=98",
        "--model.evaluator=false",
        "--data=zsad.data.CrossDataset",
        f"--data.train={{dataset: mvtec, root: {train_root}}}",
        f"--data.test={{dataset: mvtec, root: {test_root}}}",
        "--data.train_batch_size=8",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger={logger}",
    ]


def test_wandb_logger_twice_in_the_same_directory(
    tmp_path: Path, mvtec_like_root: Path, mvtec_like_root_b: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WandbLogger works offline/disabled, and the second run does not crash on the saved config.yaml."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    import wandb

    args = _tiny_fit_args(tmp_path, mvtec_like_root, mvtec_like_root_b, "WandbLogger")
    try:
        first = build_cli(args)
        assert first.trainer.current_epoch == 1
        wandb.finish()
        second = build_cli(args)
        assert second.trainer.current_epoch == 1
    finally:
        wandb.finish()
        wandb.teardown()  # wandb caches its settings per process; later tests must not inherit disabled mode
    assert any(tmp_path.rglob("config.yaml"))


def test_predict_writes_overlay_pictures(tmp_path: Path, mvtec_like_root: Path, mvtec_like_root_b: Path) -> None:
    args = _tiny_fit_args(tmp_path, mvtec_like_root, mvtec_like_root_b, "false")
    args[0] = "predict"
    args = [a for a in args if not a.startswith(("--model.evaluator", "--trainer.max_epochs", "--trainer.limit_train"))]
    args += [
        "--model.evaluator=zsad.metrics.ZSADEvaluator",
        "--model.evaluator.save_images=2",
        f"--model.evaluator.output_dir={tmp_path / 'out'}",
    ]
    build_cli(args)
    pictures = sorted((tmp_path / "out" / "predictions").rglob("*.png"))
    test_images = [p for p in mvtec_like_root_b.rglob("test/*/*.png")]
    assert len(pictures) == len(test_images) > 0
