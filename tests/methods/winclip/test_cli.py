"""WinCLIP through the CLI on generated Gogan data: `zsad test` directly (nothing to fit), zero-shot and WinCLIP+ with
references from the train split fetched and encoded once per category, prompts about "concrete block"."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zsad.cli import build_cli
from zsad.data import ZSADDataModule
from zsad.data.synthetic import make_gogan_like
from zsad.methods.winclip import WinCLIP, WinCLIPModel
from zsad.methods.winclip.lightning_model import DEFAULT_WINCLIP_BACKBONE

CONFIG = Path(__file__).parents[3] / "configs" / "winclip" / "gogan.yaml"


@pytest.fixture(scope="module")
def gogan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("winclip_gogan")
    return make_gogan_like(root, categories=["tanizumi"], n_train=3, n_test_good=2, n_test_defect=1, size=64)


@pytest.mark.parametrize("k", [0, 2])
def test_zsad_test_on_gogan(gogan: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    words: list[str] = []
    fetched: list[tuple[str, int, list[str]]] = []
    forward, fetch = WinCLIPModel.forward, ZSADDataModule.few_shot_references

    def spy_forward(self, images, class_name="object", memory=None):  # noqa: ANN001, ANN202
        words.append(class_name)
        return forward(self, images, class_name, memory)

    def spy_fetch(self, category, k_, seed):  # noqa: ANN001, ANN202
        batch = fetch(self, category, k_, seed)
        fetched.append((category, k_, list(batch.image_path)))
        return batch

    monkeypatch.setattr(WinCLIPModel, "forward", spy_forward)
    monkeypatch.setattr(ZSADDataModule, "few_shot_references", spy_fetch)
    cli = build_cli(
        [
            "test",
            "--config",
            str(CONFIG),
            "--model.init_args.backbone=tiny",
            "--model.init_args.weights=random",
            "--model.init_args.image_size=98",
            f"--model.init_args.k_shot={k}",
            f"--data.init_args.root={gogan}",
            "--data.init_args.category=tanizumi",
            "--data.init_args.eval_batch_size=4",
            "--data.init_args.num_workers=0",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert isinstance(cli.model, WinCLIP)
    # 2 good + 1 per defect kind of tanizumi, in batches of 4; one fetch of k train/good images in all.
    assert set(words) == {"concrete block"} and len(words) >= 2
    if k:
        assert [(c, n) for c, n, _ in fetched] == [("tanizumi", 2)]
        assert all(Path(p).parent.parts[-3:] == ("tanizumi", "train", "good") for p in fetched[0][2])
    else:
        assert fetched == []
    metrics = cli.trainer.callback_metrics
    for name in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert 0.0 <= float(metrics[f"test/gogan/tanizumi/{name}"]) <= 1.0
    assert torch.isfinite(torch.stack([metrics[key] for key in metrics])).all()
    assert (tmp_path / "results").is_dir()


def test_missing_default_weights_explain_the_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="zsad convert-weights --format open_clip --arch ViT-B-16-plus-240"):
        WinCLIP()
    assert not Path(DEFAULT_WINCLIP_BACKBONE).exists()
