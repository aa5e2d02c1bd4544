"""MuSc inside Lightning: deferred scoring in the test loop, the CLI on zsad.data.Gogan, and refusing to fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from zsad.data import Gogan, UnifiedDataset
from zsad.methods import MuSc

SIZE = 98
CONFIGS = Path(__file__).parents[3] / "configs" / "musc"


def record_deliveries(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Capture every scored batch the evaluator receives, with whether it came at epoch end."""
    delivered: list[dict] = []
    original = MuSc.pop_deferred_predictions

    def recording(self: MuSc, final: bool = False) -> list:
        out = original(self, final)
        for batch in out:
            delivered.append(
                {
                    "final": final,
                    "category": list(batch.category),
                    "path": list(batch.image_path),
                    "score": batch.pred_score.clone(),
                    "map": batch.anomaly_map.clone(),
                    "image": batch.image.clone(),
                }
            )
        return out

    monkeypatch.setattr(MuSc, "pop_deferred_predictions", recording)
    return delivered


def by_category(delivered: list[dict]) -> dict[str, dict[str, tuple]]:
    out: dict[str, dict[str, tuple]] = {}
    for batch in delivered:
        for i, (category, path) in enumerate(zip(batch["category"], batch["path"], strict=True)):
            out.setdefault(category, {})[path] = (batch["score"][i], batch["map"][i], batch["image"][i], batch["final"])
    return out


def test_cli_test_on_gogan_scores_the_category_as_one_set(
    tmp_path: Path, gogan_like_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zsad.cli import build_cli

    delivered = record_deliveries(monkeypatch)
    cli = build_cli(
        [
            "test",
            f"--config={CONFIGS / 'gogan.yaml'}",
            "--model.init_args.backbone=tiny",
            "--model.init_args.weights=random",
            f"--model.init_args.image_size={SIZE}",
            "--model.init_args.feature_dtype=float32",
            f"--data.init_args.root={gogan_like_root}",
            "--data.init_args.num_workers=0",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    scored = by_category(delivered)["nunozumi"]
    assert len(scored) == 15  # 3 good + 4 defect types x 3, in 4 batches of 4
    paths = sorted(scored)
    # The Lightning run equals scoring the whole category in one call (same pre-processed images).
    direct = cli.model.model(torch.stack([scored[p][2] for p in paths]))
    torch.testing.assert_close(torch.stack([scored[p][0] for p in paths]), direct.pred_score)
    torch.testing.assert_close(torch.stack([scored[p][1] for p in paths]), direct.anomaly_map)
    # The category completed at its last step, before epoch end: memory holds one category at a time.
    assert not any(value[3] for value in scored.values())
    rows = json.loads((tmp_path / "results" / "metrics.json").read_text())
    nunozumi = next(row for row in rows if row["category"] == "nunozumi")
    assert 0.0 <= nunozumi["image_auroc"] <= 1.0 and 0.0 <= nunozumi["pixel_aupro"] <= 1.0


def test_categories_straddling_batches_and_unknown_sizes(
    tmp_path: Path, gogan_like_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two categories in one test set, a batch of 4 mixing them; without category sizes, all is scored at epoch end."""
    delivered = record_deliveries(monkeypatch)
    datamodule = UnifiedDataset(dataset="gogan", root=gogan_like_root, eval_batch_size=4, check_files=False)
    torch.manual_seed(0)
    model = MuSc(backbone="tiny", weights="random", image_size=SIZE, feature_dtype="float32")
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.test(model, datamodule=datamodule, verbose=False)
    first = by_category(delivered)
    assert any(len(set(batch["category"])) == 2 for batch in delivered)  # 15 nunozumi + 12 tanizumi in batches of 4
    assert {len(v) for v in first.values()} == {15, 12}
    assert not any(v[3] for v in first["nunozumi"].values())  # its completion was noticed mid-epoch
    for paths in first.values():
        ordered = sorted(paths)
        direct = model.model(torch.stack([paths[p][2] for p in ordered]))
        torch.testing.assert_close(torch.stack([paths[p][0] for p in ordered]), direct.pred_score)
    results = model.evaluator.results
    assert set(results) == {"nunozumi", "tanizumi", "mean"}

    delivered.clear()
    monkeypatch.setattr(MuSc, "_expected_counts", lambda self, loaders: None)  # e.g. a dataset without categories
    trainer.test(model, datamodule=datamodule, verbose=False)
    second = by_category(delivered)
    assert all(v[3] for values in second.values() for v in values.values())  # scored at epoch end
    for category, values in first.items():
        for path, (score, *_rest) in values.items():
            assert second[category][path][0] == score
    assert model.evaluator.results == results


def test_fit_and_predict_are_refused(tmp_path: Path, gogan_like_root: Path) -> None:
    model = MuSc(backbone="tiny", weights="random", image_size=SIZE)
    assert model.learning_type.value == "zero_shot"
    assert not any(p.requires_grad for p in model.parameters())
    datamodule = Gogan(root=gogan_like_root, category="tanizumi", num_workers=0, eval_batch_size=4)
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(RuntimeError, match="training-free"):
        trainer.fit(model, datamodule=datamodule)
    with pytest.raises(NotImplementedError, match="transductive"):
        model.predict_step(None, 0)
