"""CLIP-ADA through the shipped configs: counts at real sizes per R, and `zsad fit` / `zsad test` on generated data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from zsad.benchmark import build_model
from zsad.cli import build_cli
from zsad.data import make_mvtec_like

CONFIGS = Path(__file__).parents[3] / "configs" / "clip_ada"
VIT_B_16 = {0: 395_776, 1: 789_504, 2: 1_183_232}  # paper Table 6 (0.4 / 0.8 / 1.2 M)
VIT_L_14_336 = {0: 790_272, 1: 1_577_472, 2: 2_364_672}


@pytest.mark.parametrize(
    ("config", "counts"),
    [("mvtec.yaml", VIT_L_14_336), ("visa.yaml", VIT_L_14_336), ("mvtec_vitb16.yaml", VIT_B_16)],
)
def test_configs_select_r_and_give_the_table_counts(config: str, counts: dict[int, int]) -> None:
    assert yaml.safe_load((CONFIGS / config).read_text())["model"]["init_args"]["num_refinements"] == 1
    for refinements, count in counts.items():
        # The real architecture on the meta device: the shipped config's structure without memory or init time.
        with torch.device("meta"):
            model = build_model(CONFIGS / config, {"weights": "random", "num_refinements": refinements})
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count
        assert model.hparams.num_refinements == refinements


def _tiny(root: Path, runs: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(CONFIGS / "mvtec.yaml"),
        "--model.init_args.backbone=tiny",
        "--model.init_args.weights=random",
        "--model.init_args.image_size=98",
        f"--data.init_args.root={root}",
        "--data.init_args.num_workers=0",
        "--data.init_args.train_batch_size=4",
        "--data.init_args.eval_batch_size=8",
        f"--trainer.default_root_dir={runs}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.accelerator=cpu",
        *extra,
    ]


def test_fit_then_test_unified_and_on_another_dataset(tmp_path: Path) -> None:
    categories = ("alpha", "beta")
    source = make_mvtec_like(tmp_path / "a", categories, domain="a", n_train=4, n_test_good=2, n_test_defect=1, size=98)
    target = make_mvtec_like(tmp_path / "b", ("gamma",), domain="b", n_train=1, n_test_good=2, n_test_defect=1, size=98)

    # Unified protocol: one model on both categories' normal train images (+ synthetic anomalies), tested per category.
    cli = build_cli(
        ["fit", *_tiny(source, tmp_path / "fit", "--trainer.max_epochs=2", "--model.init_args.num_refinements=2")]
    )
    metrics = cli.trainer.callback_metrics
    for category in (*categories, "mean"):
        assert 0.0 <= float(metrics[f"test/mvtec/{category}/pixel_auroc"]) <= 1.0
        assert 0.0 <= float(metrics[f"test/mvtec/{category}/image_auroc"]) <= 1.0
    assert cli.model.trainer.global_step == 2 * 2  # 8 normal train images, batches of 4, 2 epochs

    # The checkpoint holds the prompt and the three projections only, and the hyper-parameters to rebuild the rest.
    (checkpoint,) = (tmp_path / "fit").rglob("*.ckpt")
    saved = torch.load(checkpoint, weights_only=False, map_location="cpu")
    assert sorted(saved["state_dict"]) == sorted(
        ["model.prompt_vectors"] + [f"model.projections.{r}.{p}" for r in range(3) for p in ("weight", "bias")]
    )
    assert saved["hyper_parameters"]["num_refinements"] == 2

    # The trained model used on another dataset (cross-dataset use): `zsad test` with the checkpoint.
    tested = build_cli(
        ["test", *_tiny(target, tmp_path / "test", f"--ckpt_path={checkpoint}", "--model.init_args.num_refinements=2")]
    )
    assert "test/mvtec/gamma/pixel_auroc" in tested.trainer.callback_metrics
    trained_vectors = saved["state_dict"]["model.prompt_vectors"]
    torch.testing.assert_close(tested.model.model.prompt_vectors.detach().cpu(), trained_vectors)
