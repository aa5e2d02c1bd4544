"""AdaCLIP's public class: loss, official checkpoint import, fit and test through the CLI (tiny CLIP)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from zsad.methods.adaclip import AdaCLIP, AdaCLIPModel
from zsad.methods.checkpoint_io import OfficialCheckpointError

SIZE = 98
CONFIGS = Path(__file__).parents[3] / "configs" / "adaclip"


@pytest.fixture(scope="module")
def module() -> AdaCLIP:
    torch.manual_seed(0)
    return AdaCLIP(backbone="tiny", weights="random", image_size=SIZE, evaluator=False)


def _focal(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """README §5: one-hot clamped to [1e-5, 1 - 1e-5], p_t = Σ onehot·p + 1e-5, mean of -(1 - p_t)² log p_t."""
    onehot = torch.stack([1 - target, target], dim=1).clamp(1e-5, 1 - 1e-5)
    p_t = (onehot * probs).sum(1) + 1e-5
    return (-((1 - p_t) ** 2) * p_t.log()).mean()


def _dice(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    p, g = p.flatten(1), g.flatten(1)
    return 1 - ((2 * (p * g).sum(1) + 1) / (p.sum(1) + g.sum(1) + 1)).mean()


def test_loss_is_image_focal_plus_per_layer_focal_and_both_dice(module: AdaCLIP) -> None:
    module.train()
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    mask[1, 20:60, 30:70] = True
    batch = SimpleNamespace(image=images, category=["bottle", "cable"], gt_label=torch.tensor([0, 1]), gt_mask=mask)
    loss = module.compute_loss(batch)
    with torch.no_grad():
        out = module.model.forward_features(images, ["bottle", "cable"], full_maps=True)
    g = mask.float()
    expected = _focal(out["image_probs"], torch.tensor([0.0, 1.0])) + sum(
        _focal(out["maps"][:, i], g) + _dice(out["maps"][:, i, 1], g) + _dice(out["maps"][:, i, 0], 1 - g)
        for i in range(4)
    )
    torch.testing.assert_close(loss["loss"], expected, atol=1e-5, rtol=1e-5)
    loss["loss"].backward()
    unused = [n for n, p in module.model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == ["text_static.0"]  # the official static text prompt 0 is dead (counted, never used)
    module.zero_grad()
    module.eval()


# ---------------------------------------------------------------------------------------------------------------------
# Official checkpoint import
# ---------------------------------------------------------------------------------------------------------------------


def official_state_dict(model: AdaCLIPModel, seed: int = 7) -> dict[str, torch.Tensor]:
    """What ``AdaCLIP_Trainer.save`` writes (official key names, tiny widths)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    groups = {
        "visual_prompter.static_prompts": model.visual_static,
        "text_prompter.static_prompts": model.text_static,
    }
    for prefix, params in groups.items():
        for j, p in enumerate(params):
            out[f"clip_model.{prefix}.{j}"] = torch.randn(p.shape, generator=gen)
    heads = {
        "dynamic_visual_prompt_generator.head": model.visual_dynamic,
        "dynamic_text_prompt_generator.head": model.text_dynamic,
        "patch_token_layer.head": model.patch_heads,
    }
    for prefix, layers in heads.items():
        for i, layer in enumerate(layers):
            out[f"clip_model.{prefix}.{i}.weight"] = torch.randn(layer.weight.shape, generator=gen)
            out[f"clip_model.{prefix}.{i}.bias"] = torch.randn(layer.bias.shape, generator=gen)
    out["clip_model.cls_token_layer.head.0.weight"] = torch.randn(model.global_head.weight.shape, generator=gen)
    out["clip_model.cls_token_layer.head.0.bias"] = torch.randn(model.global_head.bias.shape, generator=gen)
    return out


def test_official_checkpoint_equals_setting_the_parameters(tmp_path: Path) -> None:
    torch.manual_seed(0)
    imported = AdaCLIP(backbone="tiny", weights="random", image_size=SIZE, evaluator=False)
    torch.manual_seed(0)
    direct = AdaCLIP(backbone="tiny", weights="random", image_size=SIZE, evaluator=False)
    state = official_state_dict(imported.model)
    path = tmp_path / "pretrained_mvtec_colondb.pth"
    torch.save({k: v.half() for k, v in state.items()}, path)  # released files may hold fp16: converted on load
    imported.load_official_checkpoint(path)
    m = direct.model
    with torch.no_grad():
        for j in range(4):
            m.visual_static[j].copy_(state[f"clip_model.visual_prompter.static_prompts.{j}"].half())
            m.text_static[j].copy_(state[f"clip_model.text_prompter.static_prompts.{j}"].half())
        for prefix, layers in (
            ("dynamic_visual_prompt_generator", m.visual_dynamic),
            ("dynamic_text_prompt_generator", m.text_dynamic),
            ("patch_token_layer", m.patch_heads),
        ):
            for i, layer in enumerate(layers):
                layer.weight.copy_(state[f"clip_model.{prefix}.head.{i}.weight"].half())
                layer.bias.copy_(state[f"clip_model.{prefix}.head.{i}.bias"].half())
        m.global_head.weight.copy_(state["clip_model.cls_token_layer.head.0.weight"].half())
        m.global_head.bias.copy_(state["clip_model.cls_token_layer.head.0.bias"].half())
    for key, value in direct.trainable_state_dict().items():
        torch.testing.assert_close(imported.trainable_state_dict()[key], value, atol=0, rtol=0)
    images = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = imported.eval().model(images, ["bottle"]), direct.eval().model(images, ["bottle"])
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map, atol=0, rtol=0)


def test_malformed_official_checkpoints_name_the_file(module: AdaCLIP, tmp_path: Path) -> None:
    good = official_state_dict(module.model)
    cases = {
        "bare_tensor.pth": (lambda p: torch.save(torch.zeros(3), p), "not a state dict"),
        "list.pth": (lambda p: torch.save([1, 2], p), "not a state dict"),
        "garbage.pth": (lambda p: p.write_bytes(b"\x00garbage" * 40), "not a readable"),
        "nan.pth": (
            lambda p: torch.save(
                {**good, "clip_model.cls_token_layer.head.0.bias": torch.full((16,), float("nan"))}, p
            ),
            "NaN",
        ),
        "missing.pth": (
            lambda p: torch.save({k: v for k, v in good.items() if "patch_token_layer.head.3" not in k}, p),
            "missing",
        ),
        "foreign.pth": (lambda p: torch.save({**good, "clip_model.other.weight": torch.zeros(2)}, p), "unknown keys"),
        "shape.pth": (
            lambda p: torch.save({**good, "clip_model.visual_prompter.static_prompts.0": torch.zeros(5, 1024)}, p),
            "shapes",
        ),
    }
    before = {k: v.clone() for k, v in module.trainable_state_dict().items()}
    for name, (write, expected) in cases.items():
        path = tmp_path / name
        write(path)
        with pytest.raises(OfficialCheckpointError, match=expected) as err:
            module.load_official_checkpoint(path)
        assert name in str(err.value)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        module.load_official_checkpoint(tmp_path / "absent.pth")
    for key, value in module.trainable_state_dict().items():  # nothing half-loaded
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------


def test_fit_and_test_through_the_cli(tmp_path: Path) -> None:
    from zsad.cli import build_cli
    from zsad.data.synthetic import make_mvtec_like

    common = {"categories": ("alpha", "beta-gamma"), "n_train": 1, "n_test_good": 2, "n_test_defect": 1}
    source = make_mvtec_like(tmp_path / "source", domain="a", **common)
    target = make_mvtec_like(tmp_path / "target", domain="b", **common)
    args = [
        "--config",
        str(CONFIGS / "mvtec_to_visa.yaml"),
        "--model.init_args.backbone=tiny",
        "--model.init_args.weights=random",
        f"--model.init_args.image_size={SIZE}",
        "--data.init_args.train=" + json.dumps({"dataset": "mvtec", "root": str(source)}),
        "--data.init_args.test=" + json.dumps({"dataset": "mvtec", "root": str(target)}),
        "--data.init_args.num_workers=0",
        "--data.init_args.train_batch_size=4",
        "--data.init_args.eval_batch_size=4",
        "--trainer.max_epochs=1",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
    ]
    fit = build_cli(["fit", *args, "--test_after_fit=false"])
    assert fit.trainer.global_step == 3  # 12 source test images, batch 4 (batch > 1 trains)
    trained = {k: v.clone() for k, v in fit.model.trainable_state_dict().items()}
    (ckpt,) = (tmp_path / "run").rglob("*.ckpt")
    stored = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert set(stored) == set(trained)  # learnable parts only, no frozen CLIP
    test = build_cli(["test", *args, f"--ckpt_path={ckpt}"])
    for key, value in test.model.trainable_state_dict().items():
        torch.testing.assert_close(value, trained[key])
    metrics = test.trainer.callback_metrics
    assert metrics, "the evaluator reported no metrics"
    assert all(torch.isfinite(v).all() for v in metrics.values())
    assert set(test.model.model._text_cache) == {"alpha", "beta gamma"}  # noqa: SLF001 - class words per category


def test_short_names_resolve_through_anomalib() -> None:
    from anomalib.models import get_model

    model = get_model("ada_clip", backbone="tiny", weights="random", image_size=SIZE, evaluator=False)
    assert isinstance(model, AdaCLIP)


def test_benchmark_reports_counts_and_the_enlarged_position_table(capsys: pytest.CaptureFixture[str]) -> None:
    from zsad.benchmark import main

    args = ["--backbone", "tiny", "--weights", "random", "--image_size", str(SIZE), "--batches", "1", "--warmup", "0"]
    result = main(["--config", str(CONFIGS / "visa_to_mvtec.yaml"), *args, "--device", "cpu"])
    out = capsys.readouterr().out
    model = AdaCLIP(backbone="tiny", weights="random", image_size=SIZE, evaluator=False)
    assert f"trainable parameters: {sum(p.numel() for p in model.parameters() if p.requires_grad)}" in out
    # tiny: 17-row table (4x4 + CLS) at its native 56 px, 50 rows (7x7 + CLS) at 98 px, width 32.
    extra = (50 - 17) * 32
    assert f"{result['total_parameters']:,} + {extra:,} + 1 = {result['total_parameters'] + extra + 1:,}" in out
    assert result["ratio"] > 0
