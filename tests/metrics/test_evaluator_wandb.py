"""W&B without network or API key: an offline run keeps the table and the images; disabled mode is a no-op."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lightning.pytorch.loggers import WandbLogger
from metrics_toy import CATEGORIES, run_test

from zsad.metrics import ZSADEvaluator


def test_offline_run_directory_has_table_and_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    wandb.teardown()  # settings cached by an earlier test in this process (e.g. disabled mode) must not leak in
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(project="zsad-tests", save_dir=str(tmp_path), offline=True)
    evaluator = ZSADEvaluator(stages=("test",), save_images=1, output_dir=str(tmp_path / "run"))
    try:
        run_test(evaluator, str(tmp_path), n=12, logger=logger)
    finally:
        wandb.finish()
        wandb.teardown()  # wandb caches its settings (offline mode) per process; later tests must not inherit them
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (table_file,) = (run_dir / "files" / "media" / "table" / "test" / "toy").glob("results_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"][:2] == ["category", "image_auroc"]
    assert [row[0] for row in table["data"]] == [*CATEGORIES, "mean"]
    images = list((run_dir / "files" / "media" / "images").rglob("*.png"))
    assert len(images) == len(CATEGORIES) + len(CATEGORIES)  # one overlay per category + the curve plots


def test_disabled_mode_runs_and_still_writes_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = WandbLogger(project="zsad-tests", save_dir=str(tmp_path))
    evaluator = ZSADEvaluator(stages=("test",), output_dir=str(tmp_path / "run"))
    try:
        run_test(evaluator, str(tmp_path), n=9, logger=logger)
    finally:
        wandb.finish()
        wandb.teardown()
    assert (tmp_path / "run" / "metrics.json").exists()
    assert not (tmp_path / "wandb").exists() or not list((tmp_path / "wandb").glob("offline-run-*"))
