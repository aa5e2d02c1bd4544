"""LearnableVectors through Lightning: the loss, KB-sized checkpoints loaded with weights_only, `--ckpt_path`,
`zsad export` to safetensors, and a text-tower-free module."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from zsad.cli import build_cli
from zsad.export import apply_exported, load_exported
from zsad.export import main as export_main
from zsad.methods import LearnableVectors


def _focal(p: torch.Tensor, y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    onehot = torch.stack([1 - y.float(), y.float()], 1).clamp(eps, 1 - eps)
    pt = (onehot * torch.stack([1 - p, p], 1)).sum(1) + eps
    return (-((1 - pt) ** 2) * pt.log()).mean()


def _dice(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    per = [(2 * (p[i] * g[i]).sum() + 1) / (p[i].sum() + g[i].sum() + 1) for i in range(len(p))]
    return 1 - torch.stack(per).mean()


def test_loss_is_image_focal_plus_map_focal_and_both_dice_terms() -> None:
    torch.manual_seed(0)
    model = LearnableVectors(backbone="tiny", weights="random", image_size=98, evaluator=False)
    images = torch.randn(3, 3, 98, 98)
    masks = torch.zeros(3, 98, 98, dtype=torch.bool)
    masks[1, 20:40, 30:60] = True
    batch = SimpleNamespace(image=images, gt_mask=masks, gt_label=torch.tensor([0, 1, 0]))
    terms = model.compute_loss(batch)
    out = model.model.forward_features(model.model.encode(images), (98, 98))
    s, m, g = out["image_score"], out["anomaly_map"], masks.float()
    expected = _focal(s, batch.gt_label) + _focal(m.flatten(), g.flatten().long()) + _dice(m, g) + _dice(1 - m, 1 - g)
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-5, atol=1e-6)
    terms["loss"].backward()
    assert model.model.vectors.grad is not None and model.model.layer_logits.grad is not None


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory, mvtec_like_root: Path, mvtec_like_root_b: Path) -> SimpleNamespace:
    """`zsad fit --test_after_fit true` on the tiny model: 2 epochs over the generated domain-a test split."""
    root = tmp_path_factory.mktemp("lv_run")
    args = [
        "--model=zsad.methods.LearnableVectors",
        "--model.backbone=tiny",
        "--model.weights=random",
        "--model.image_size=98",
        "--model.lr=0.01",
        "--model.evaluator=zsad.metrics.ZSADEvaluator",
        f"--model.evaluator.init_args.output_dir={root / 'results'}",
        "--data=zsad.data.CrossDataset",
        f"--data.train={{dataset: mvtec, root: {mvtec_like_root}}}",
        f"--data.test={{dataset: mvtec, root: {mvtec_like_root_b}}}",
        "--data.train_batch_size=8",
        "--trainer.max_epochs=2",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}",
    ]
    cli = build_cli(["fit", *args, "--test_after_fit=true"])
    ckpt = Path(cli.trainer.checkpoint_callback.best_model_path)
    return SimpleNamespace(cli=cli, ckpt=ckpt, args=args, root=root)


def test_checkpoint_holds_only_the_trainable_parameters(fitted_run: SimpleNamespace) -> None:
    ckpt = fitted_run.ckpt
    assert ckpt.is_file()
    assert ckpt.stat().st_size < 64 * 1024, f"{ckpt.stat().st_size} bytes: the frozen backbone leaked in"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)  # no pickled code needed
    assert set(checkpoint["state_dict"]) == {"model.vectors", "model.layer_logits"}
    identity = checkpoint["zsad_backbone"]
    assert identity["name"] == "tiny" and identity["weights"] == "random" and identity["image_size"] == 98
    assert checkpoint["hyper_parameters"]["image_size"] == 98


def test_load_from_checkpoint_restores_the_vectors_with_weights_only(fitted_run: SimpleNamespace) -> None:
    trained = fitted_run.cli.model
    loaded = LearnableVectors.load_from_checkpoint(fitted_run.ckpt, weights_only=True, evaluator=False)
    torch.testing.assert_close(loaded.model.vectors, trained.model.vectors.cpu())
    torch.testing.assert_close(loaded.model.layer_logits, trained.model.layer_logits.cpu())
    images = torch.randn(2, 3, 98, 98)
    trained.eval()
    torch.testing.assert_close(loaded.eval().model(images).anomaly_map, trained.model(images).anomaly_map)


def test_test_with_ckpt_path_reproduces_the_test_after_fit(fitted_run: SimpleNamespace) -> None:
    after_fit = fitted_run.cli.model.evaluator.results_by_stage["test"]["mean"]
    args = [a for a in fitted_run.args if "output_dir" not in a]
    tested = build_cli([
        "test", *args, f"--ckpt_path={fitted_run.ckpt}",
        f"--model.evaluator.init_args.output_dir={fitted_run.root / 'retest'}",
    ])
    again = tested.model.evaluator.results_by_stage["test"]["mean"]
    assert again["pixel_auroc"] == pytest.approx(after_fit["pixel_auroc"], abs=1e-6)
    assert again["image_auroc"] == pytest.approx(after_fit["image_auroc"], abs=1e-6)


def test_export_writes_safetensors_that_a_fresh_model_loads(fitted_run: SimpleNamespace, tmp_path: Path) -> None:
    output = export_main(["--ckpt_path", str(fitted_run.ckpt), "--output", str(tmp_path / "vectors.safetensors")])
    raw = output.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])  # safetensors: a JSON header then raw tensor bytes, no pickle
    assert set(header) == {"model.vectors", "model.layer_logits", "__metadata__"}
    tensors, metadata = load_exported(output)
    assert metadata["trainable_parameters"] == 164
    assert metadata["backbone"]["name"] == "tiny" and metadata["hparams"]["image_size"] == 98
    assert metadata["class_path"] == "zsad.methods.LearnableVectors"
    fresh = LearnableVectors(backbone="tiny", weights="random", image_size=98, evaluator=False)
    apply_exported(fresh, output)
    torch.testing.assert_close(fresh.model.vectors, fitted_run.cli.model.model.vectors.cpu())
    other = LearnableVectors(backbone="tiny", weights="random", image_size=112, evaluator=False)
    with pytest.raises(ValueError, match="backbone"):
        apply_exported(other, output)
