"""Divergence (issue 15, item 4): training stops at the first non-finite loss or parameter with a message naming the
step and the likely cause, no non-finite checkpoint is ever written, and constant test outputs are flagged."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from zsad.cli import build_cli
from zsad.data import CrossDataset
from zsad.methods import LearnableVectors
from zsad.methods.checkpoint_io import CheckpointError
from zsad.methods.guards import TrainingDivergedError


def _fit_args(root: Path, train: Path, test: Path, lr: str) -> list[str]:
    return [
        "fit",
        "--model=zsad.methods.LearnableVectors",
        "--model.backbone=tiny",
        "--model.weights=random",
        "--model.image_size=98",
        "--model.evaluator=false",
        f"--model.lr={lr}",
        "--data=zsad.data.CrossDataset",
        f"--data.train={{dataset: mvtec, root: {train}}}",
        f"--data.test={{dataset: mvtec, root: {test}}}",
        "--data.train_batch_size=8",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={root}",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.save_last=true",
    ]


def test_infinite_lr_stops_at_the_first_step_without_a_checkpoint(
    tmp_path: Path, mvtec_like_root: Path, mvtec_like_root_b: Path
) -> None:
    """Before: NaN loss from step 1, every epoch ran and NaN checkpoints (last.ckpt) were saved."""
    with pytest.raises(TrainingDivergedError, match=r"optimiser step 1\b") as error:
        build_cli(_fit_args(tmp_path, mvtec_like_root, mvtec_like_root_b, ".inf"))
    message = str(error.value)
    assert "non-finite" in message and "lr inf" in message and "learning rate too high" in message
    assert "model.vectors" in message and "loss=" in message
    assert not list(tmp_path.rglob("*.ckpt"))  # neither last.ckpt nor an epoch checkpoint of the diverged state


def test_non_finite_loss_stops_before_the_backward_pass(
    tmp_path: Path, mvtec_like_root: Path, mvtec_like_root_b: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN loss at step 2 (e.g. fp16 overflow, bad input) stops there; the parameters keep step 1's values."""
    model = LearnableVectors(backbone="tiny", weights="random", image_size=98, evaluator=False)
    original = LearnableVectors.compute_loss
    calls = []

    def nan_at_second_step(self: LearnableVectors, batch: object) -> dict[str, torch.Tensor]:
        out = original(self, batch)
        calls.append(self.model.vectors.detach().clone())
        if len(calls) == 2:
            out = {**out, "loss": out["loss"] * float("nan")}
        return out

    monkeypatch.setattr(LearnableVectors, "compute_loss", nan_at_second_step)
    datamodule = CrossDataset(
        train={"dataset": "mvtec", "root": mvtec_like_root},
        test={"dataset": "mvtec", "root": mvtec_like_root_b},
        train_batch_size=4,
    )
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(TrainingDivergedError, match=r"loss is nan.*optimiser step 2.*loss=nan, image=") as error:
        trainer.fit(model, datamodule=datamodule)
    assert "Stopped before the backward pass" in str(error.value)
    torch.testing.assert_close(model.model.vectors.detach(), calls[1], atol=0, rtol=0)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_non_finite_state_is_never_saved() -> None:
    """The last wall, whatever callbacks a user configured: on_save_checkpoint refuses NaN/inf trainable tensors."""
    model = LearnableVectors(backbone="tiny", weights="random", image_size=98, evaluator=False)
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)  # finite: fine, and records the class
    assert checkpoint["zsad_class"].endswith("LearnableVectors")
    with torch.no_grad():
        model.model.layer_logits[0] = math.inf
    with pytest.raises(CheckpointError, match=r"non-finite.*model\.layer_logits"):
        model.on_save_checkpoint({"state_dict": model.state_dict()})


def test_constant_outputs_warn_that_metrics_are_chance(
    tmp_path: Path, mvtec_like_root: Path, mvtec_like_root_b: Path
) -> None:
    """Before: a collapsed model (huge lr) ended with every metric 50.0 and no warning."""
    model = LearnableVectors(backbone="tiny", weights="random", image_size=98, evaluator=False)
    datamodule = CrossDataset(
        train={"dataset": "mvtec", "root": mvtec_like_root}, test={"dataset": "mvtec", "root": mvtec_like_root_b}
    )
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)

    def test_warnings() -> list[str]:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            trainer.test(model, datamodule=datamodule, verbose=False)
        return [str(w.message) for w in record if "chance level" in str(w.message)]

    assert not test_warnings()  # random vectors rank something: no warning
    with torch.no_grad():  # collapsed: normal == abnormal vector at every level → every probability 0.5
        model.model.vectors[:, 1] = model.model.vectors[:, 0]
    (message,) = test_warnings()
    assert "every pred_score equals 0.5" in message and "every anomaly_map equals" in message
    assert "diverged" in message
