"""AdaptCLIP through the CLI on generated data: cross-dataset fit (1-shot prompts from the source's train split), then
zero-shot and k-shot tests with references from the target's train split, fetched and encoded once per category."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zsad.cli import build_cli
from zsad.data import CrossDataset, ZSADDataModule
from zsad.data.synthetic import make_mvtec_like, make_visa_like
from zsad.methods.adaptclip import AdaptCLIP

CONFIGS = Path(__file__).parents[3] / "configs" / "adaptclip"


def _common(tmp: Path, source: Path, target: Path) -> list[str]:
    return [
        "--model.init_args.backbone=tiny",
        "--model.init_args.weights=random",
        "--model.init_args.image_size=98",
        f"--data.init_args.train={{dataset: mvtec, root: {source}}}",
        f"--data.init_args.test={{dataset: visa, root: {target}}}",
        "--data.init_args.num_workers=0",
        "--data.init_args.train_batch_size=8",
        "--data.init_args.eval_batch_size=8",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp / 'runs'}",
    ]


class _Predictions:
    """Records what ``predict_batch`` returns during a test run."""

    def __init__(self) -> None:
        self.scores: list[torch.Tensor] = []
        self.maps: list[torch.Tensor] = []


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("adaptclip_cli")
    source = make_mvtec_like(tmp / "mvtec", domain="a", n_train=4)
    target = make_visa_like(tmp / "visa", domain="b", n_train=4)
    common = _common(tmp, source, target)
    drawn: list[tuple[str, list[str]]] = []
    original = CrossDataset.training_references

    def spy(self, category, k, seed):  # noqa: ANN001, ANN202
        batch = original(self, category, k, seed)
        drawn.append((category, list(batch.image_path)))
        return batch

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CrossDataset, "training_references", spy)
        cli = build_cli(
            [
                "fit",
                "--config",
                str(CONFIGS / "mvtec_to_visa.yaml"),
                "--trainer.max_epochs=1",
                "--test_after_fit=false",
                *common,
            ]
        )
    checkpoint = cli.trainer.checkpoint_callback.best_model_path
    return {"cli": cli, "common": common, "checkpoint": checkpoint, "drawn": drawn, "source": source}


def _run_test(config: str, fitted: dict, monkeypatch: pytest.MonkeyPatch) -> tuple:
    predictions = _Predictions()
    fetched: list[tuple[str, int, int, list[str]]] = []
    original_fetch = ZSADDataModule.few_shot_references
    original_predict = AdaptCLIP.predict_batch

    def fetch(self, category, k, seed):  # noqa: ANN001, ANN202
        batch = original_fetch(self, category, k, seed)
        fetched.append((category, k, seed, list(batch.image_path)))
        return batch

    def predict(self, batch):  # noqa: ANN001, ANN202
        out = original_predict(self, batch)
        predictions.scores.append(out.pred_score.detach())
        predictions.maps.append(out.anomaly_map.detach())
        return out

    monkeypatch.setattr(ZSADDataModule, "few_shot_references", fetch)
    monkeypatch.setattr(AdaptCLIP, "predict_batch", predict)
    cli = build_cli(
        ["test", "--config", str(CONFIGS / config), f"--ckpt_path={fitted['checkpoint']}", *fitted["common"]]
    )
    return cli, predictions, fetched


def test_fit_draws_one_normal_source_train_image_of_the_same_category_per_query(fitted: dict) -> None:
    cli = fitted["cli"]
    loss = cli.trainer.callback_metrics["train_loss"]
    assert torch.isfinite(loss)
    # 2 categories x (3 good + 4 defects x 3) source test images = 30 queries, one prompt each.
    drawn = fitted["drawn"]
    assert len(drawn) == 30
    for category, paths in drawn:
        assert len(paths) == 1
        path = Path(paths[0])
        assert path.parent == fitted["source"] / category / "train" / "good"
    # Random prompts: not always the same image.
    assert len({paths[0] for _, paths in drawn}) > 2


def test_zero_shot_test_restores_the_trained_adapters(fitted: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    cli, predictions, fetched = _run_test("mvtec_to_visa.yaml", fitted, monkeypatch)
    assert cli.model.k_shot == 0
    assert fetched == []  # zero-shot uses no references
    trained = fitted["cli"].model.trainable_state_dict()
    restored = cli.model.trainable_state_dict()
    assert trained.keys() == restored.keys()
    for key in trained:
        torch.testing.assert_close(restored[key].cpu(), trained[key].cpu(), rtol=0, atol=0)
    scores, maps = torch.cat(predictions.scores), torch.cat(predictions.maps)
    assert scores.shape == (2 * (3 + 4 * 3),)  # the generated VisA-like test split
    assert maps.shape[-2:] == (98, 98)
    assert torch.isfinite(scores).all() and torch.isfinite(maps).all()
    assert 0.0 <= float(cli.trainer.callback_metrics["test/visa/mean/pixel_auroc"]) <= 1.0


@pytest.mark.parametrize("k", [1, 4])
def test_k_shot_test_encodes_train_references_once_per_category(
    fitted: dict, monkeypatch: pytest.MonkeyPatch, k: int
) -> None:
    cli, predictions, fetched = _run_test(f"mvtec_to_visa_{k}shot.yaml", fitted, monkeypatch)
    assert cli.model.k_shot == k  # the config's k, not the fit checkpoint's
    # One fetch per target category (not per batch), k normal images from the target's train split, seed 10.
    assert sorted(c for c, *_ in fetched) == ["candle", "capsules"]
    for category, k_fetched, seed, paths in fetched:
        assert (k_fetched, seed) == (k, 10)
        assert len(paths) == k
        assert all(Path(p).parent.parts[-3:] == (category, "train", "good") for p in paths)
    memory = cli.model._reference_memory  # noqa: SLF001
    assert {c: tuple(t.shape) for c, t in memory.items()} == {c: (4, k * 49, 16) for c in ("candle", "capsules")}
    scores = torch.cat(predictions.scores)
    assert scores.shape == (30,)
    assert torch.isfinite(scores).all()
    assert torch.isfinite(torch.cat(predictions.maps)).all()
    metrics = cli.trainer.callback_metrics
    for name in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert 0.0 <= float(metrics[f"test/visa/mean/{name}"]) <= 1.0
