"""Loading zsad checkpoints (issue 15, items 1 and 5): another method's checkpoint, missing or unexpected trainable
keys, and corrupt or truncated files are refused from the CLI, from anomalib's Engine and from
``load_from_checkpoint``, with messages naming both classes or the file and the fix."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine

from zsad.cli import build_cli
from zsad.data import CrossDataset
from zsad.methods import AnomalyCLIP, LearnableVectors
from zsad.methods.checkpoint_io import CheckpointError

TINY = ["--model.backbone=tiny", "--model.weights=random", "--model.image_size=98", "--model.evaluator=false"]


def _data_args(train: Path, test: Path) -> list[str]:
    return [
        "--data=zsad.data.CrossDataset",
        f"--data.train={{dataset: mvtec, root: {train}}}",
        f"--data.test={{dataset: mvtec, root: {test}}}",
        "--data.train_batch_size=8",
    ]


def _trainer_args(root: Path) -> list[str]:
    return [
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={root}",
    ]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, mvtec_like_root: Path, mvtec_like_root_b: Path) -> dict:
    """One-step `zsad fit` checkpoints of two methods (what a user has on disk)."""
    out = {}
    for name in ("LearnableVectors", "AnomalyCLIP"):
        root = tmp_path_factory.mktemp(name)
        build_cli(
            [
                "fit",
                f"--model=zsad.methods.{name}",
                *TINY,
                *_data_args(mvtec_like_root, mvtec_like_root_b),
                *_trainer_args(root),
                "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=1",
                "--trainer.limit_val_batches=0",
            ]
        )
        (out[name],) = root.rglob("*.ckpt")
    return out


def _tiny_lv() -> LearnableVectors:
    return LearnableVectors(backbone="tiny", weights="random", image_size=98, evaluator=False)


def _engine_test(model: LearnableVectors, ckpt: Path, root: Path, data: tuple[Path, Path]) -> None:
    datamodule = CrossDataset(train={"dataset": "mvtec", "root": data[0]}, test={"dataset": "mvtec", "root": data[1]})
    engine = Engine(accelerator="cpu", logger=False, default_root_dir=root, enable_progress_bar=False)
    engine.test(model, datamodule=datamodule, ckpt_path=ckpt)


def test_checkpoint_of_another_method_is_refused_everywhere(
    checkpoints: dict, tmp_path: Path, mvtec_like_root: Path, mvtec_like_root_b: Path
) -> None:
    """Before: the CLI swapped in the checkpoint's class; Engine / load_from_checkpoint reported untrained vectors."""
    other = checkpoints["AnomalyCLIP"]
    assert torch.load(other, weights_only=True)["zsad_class"].endswith(".AnomalyCLIP")
    both = r"AnomalyCLIP.*LearnableVectors"
    with pytest.raises(CheckpointError, match=both):
        build_cli(
            [
                "test",
                "--model=zsad.methods.LearnableVectors",
                *TINY,
                *_data_args(mvtec_like_root, mvtec_like_root_b),
                *_trainer_args(tmp_path),
                f"--ckpt_path={other}",
            ]
        )
    with pytest.raises(CheckpointError, match=re.escape(other.name) + r".*" + both):
        _engine_test(_tiny_lv(), other, tmp_path, (mvtec_like_root, mvtec_like_root_b))
    with pytest.raises(CheckpointError, match=both):
        LearnableVectors.load_from_checkpoint(other)
    # The right class loads, quietly (no list of the absent frozen backbone keys) and with the trained values.
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loaded = AnomalyCLIP.load_from_checkpoint(other)
    assert not [w for w in record if "not in the checkpoint" in str(w.message)]
    saved = torch.load(other, weights_only=True)["state_dict"]
    torch.testing.assert_close(loaded.model.ctx_normal, saved["model.ctx_normal"], atol=0, rtol=0)


def test_missing_or_unexpected_trainable_keys_fail(checkpoints: dict, tmp_path: Path) -> None:
    """Only the frozen backbone may be absent; an old checkpoint without a class record still loads when it fits."""
    raw = torch.load(checkpoints["LearnableVectors"], weights_only=True)
    cases = {
        "missing.ckpt": ({k: v for k, v in raw["state_dict"].items() if k != "model.layer_logits"}, "missing.*layer"),
        "unexpected.ckpt": ({**raw["state_dict"], "model.extra_head": torch.zeros(3)}, "unexpected.*extra_head"),
    }
    model = _tiny_lv()
    for name, (state, reason) in cases.items():
        torch.save({**raw, "state_dict": state}, tmp_path / name)
        with pytest.raises(CheckpointError, match=reason):
            LearnableVectors.load_from_checkpoint(tmp_path / name)
        with pytest.raises(CheckpointError, match=reason):
            model.on_load_checkpoint({**raw, "state_dict": state})  # the hook the Trainer's ckpt_path runs
    # Same class, other settings (4 layer pairs vs 1): shapes named, not a bare torch size-mismatch error.
    with pytest.raises(CheckpointError, match=r"other shapes.*model\.vectors"):
        LearnableVectors(
            backbone="tiny", weights="random", image_size=98, evaluator=False, layers=[24]
        ).on_load_checkpoint(raw)
    legacy = {k: v for k, v in raw.items() if k != "zsad_class"}
    legacy["hyper_parameters"] = {k: v for k, v in raw["hyper_parameters"].items() if k != "_class_path"}
    torch.save(legacy, tmp_path / "legacy.ckpt")
    loaded = LearnableVectors.load_from_checkpoint(tmp_path / "legacy.ckpt")
    torch.testing.assert_close(loaded.model.vectors, raw["state_dict"]["model.vectors"], atol=0, rtol=0)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "tensor"])
def test_corrupt_checkpoint_names_the_file_and_the_fix(
    damage: str, checkpoints: dict, tmp_path: Path, mvtec_like_root: Path, mvtec_like_root_b: Path
) -> None:
    """Before: ``OSError: [Errno 22]`` / ``IndexError: pop from empty list`` without the file."""
    good = checkpoints["LearnableVectors"].read_bytes()
    path = tmp_path / f"{damage}.ckpt"
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x80\x04not a checkpoint" * 64)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save(torch.zeros(3), path)
    name = rf"{damage}\.ckpt"
    with pytest.raises(CheckpointError, match=name) as error:
        build_cli(
            [
                "test",
                "--model=zsad.methods.LearnableVectors",
                *TINY,
                *_data_args(mvtec_like_root, mvtec_like_root_b),
                *_trainer_args(tmp_path),
                f"--ckpt_path={path}",
            ]
        )
    assert "last.ckpt" in str(error.value)
    with pytest.raises(CheckpointError, match=name):
        LearnableVectors.load_from_checkpoint(path)
    if damage == "truncated":  # the Trainer's own loading (anomalib's Engine), through the wrapped checkpoint IO
        with pytest.raises(CheckpointError, match=rf"{name}.*truncated or corrupt.*last\.ckpt"):
            _engine_test(_tiny_lv(), path, tmp_path, (mvtec_like_root, mvtec_like_root_b))


def test_export_refuses_corrupt_or_diverged_checkpoints(checkpoints: dict, tmp_path: Path) -> None:
    """The neighbouring command: `zsad export` read the file with a bare torch.load and exported NaN tensors."""
    from zsad.export import export_checkpoint

    good = checkpoints["LearnableVectors"]
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"truncated\.ckpt.*last\.ckpt"):
        export_checkpoint(truncated, tmp_path / "a.safetensors")
    raw = torch.load(good, weights_only=True)
    raw["state_dict"]["model.vectors"] = raw["state_dict"]["model.vectors"] * float("nan")
    torch.save(raw, tmp_path / "nan.ckpt")
    with pytest.raises(CheckpointError, match=r"nan\.ckpt.*non-finite.*model\.vectors"):
        export_checkpoint(tmp_path / "nan.ckpt", tmp_path / "b.safetensors")
    assert not list(tmp_path.glob("*.safetensors"))
    export_checkpoint(good, tmp_path / "good.safetensors")  # an intact checkpoint still exports
