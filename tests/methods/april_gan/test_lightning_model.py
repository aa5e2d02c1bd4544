"""APRIL-GAN's public class: loss, official checkpoint import, anomalib resolution, fit/test through the CLI (tiny)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from anomalib.models import AnomalibModule, get_model

from zsad.backbone.cache import CachedFeatureBatch
from zsad.methods import APRILGAN
from zsad.methods.april_gan import APRILGANModel, OfficialCheckpointError

SIZE = 98
CONFIGS = Path(__file__).parents[3] / "configs" / "april_gan"


def tiny(**kwargs) -> APRILGAN:
    torch.manual_seed(0)
    return APRILGAN(backbone="tiny", weights="random", image_size=SIZE, evaluator=False, **kwargs)


@pytest.fixture(scope="module")
def module() -> APRILGAN:
    return tiny()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


def test_resolved_by_anomalib_short_names_with_the_official_defaults() -> None:
    assert AnomalibModule in APRILGAN.__bases__
    for name in ("april_gan", "aprilgan", "APRILGAN"):
        model = get_model(name, backbone="tiny", weights="random", image_size=SIZE, evaluator=False)
        assert type(model) is APRILGAN
    identity = model.backbone.identity()
    assert identity["hidden_act"] == "gelu" and identity["pos_antialias"] is True
    assert identity["pos_interpolation"] == "bicubic"
    # 4 x Linear(width -> E) with bias: 4 x (32 x 16 + 16) on the tiny CLIP, 3,148,800 on ViT-L/14@336.
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 * (32 * 16 + 16)
    assert model.model.class_words == {"nunozumi": "concrete block", "tanizumi": "concrete block"}
    assert tiny(class_words={"alpha": "widget"}).model.class_words == {"alpha": "widget"}
    with pytest.raises(ValueError, match="hidden_act"):
        tiny(hidden_act="relu")


# ---------------------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------------------


def _focal(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Official FocalLoss(γ=2, smooth 1e-5): clamp the one-hot, p_t = Σ onehot·p + 1e-5, mean -(1-p_t)² log p_t."""
    onehot = torch.stack([1 - target, target], dim=1).clamp(1e-5, 1 - 1e-5)
    p_t = (onehot * probs).sum(1) + 1e-5
    return (-((1 - p_t) ** 2) * p_t.log()).mean()


def _dice(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    p, g = p.flatten(1), g.flatten(1)
    return 1 - ((2 * (p * g).sum(1) + 1) / (p.sum(1) + g.sum(1) + 1)).sum() / len(p)


def test_loss_is_focal_plus_abnormal_dice_per_layer(module: APRILGAN, images: torch.Tensor) -> None:
    module.train()
    mask = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    mask[1, 20:60, 30:70] = True
    batch = SimpleNamespace(image=images, gt_label=torch.tensor([0, 1]), gt_mask=mask, category=["alpha", "beta"])
    loss = module.compute_loss(batch)
    with torch.no_grad():
        out = module.model.forward_features(module.model.encode(images), (SIZE, SIZE), ["alpha", "beta"])
    g = mask.float()
    expected = sum(_focal(out["maps"][:, i], g) + _dice(out["maps"][:, i, 1], g) for i in range(4))
    torch.testing.assert_close(loss["loss"], expected, atol=1e-5, rtol=1e-5)
    loss["loss"].backward()
    assert all(p.grad is not None for p in module.model.heads.parameters())
    assert all(p.grad is None for p in module.backbone.parameters())
    # Over cached features (the feature cache) the loss is the same.
    cached = CachedFeatureBatch(
        features=module.model.encode(images),
        image_size=(SIZE, SIZE),
        gt_label=batch.gt_label,
        gt_mask=mask,
        category=["alpha", "beta"],
    )
    torch.testing.assert_close(module.compute_loss(cached)["loss"], loss["loss"])
    with pytest.raises(ValueError, match="pixel masks"):
        module.compute_loss(SimpleNamespace(**{**vars(batch), "gt_mask": None}))
    module.eval()


# ---------------------------------------------------------------------------------------------------------------------
# Official checkpoint import
# ---------------------------------------------------------------------------------------------------------------------


def official_state(model: APRILGANModel, seed: int = 7) -> dict[str, torch.Tensor]:
    """The ``trainable_linearlayer`` state dict as the official train.py saves it (``LinearLayer.fc.{i}``)."""
    gen = torch.Generator().manual_seed(seed)
    width, dim = model.backbone.width, model.backbone.embed_dim
    state = {}
    for i in range(4):
        state[f"fc.{i}.weight"] = torch.randn(dim, width, generator=gen) * 0.1
        state[f"fc.{i}.bias"] = torch.randn(dim, generator=gen) * 0.1
    return state


def test_official_checkpoint_equals_setting_the_parameters(tmp_path: Path, images: torch.Tensor) -> None:
    reference = tiny()
    state = official_state(reference.model)
    with torch.no_grad():
        for i, head in enumerate(reference.model.heads):
            head.weight.copy_(state[f"fc.{i}.weight"])
            head.bias.copy_(state[f"fc.{i}.bias"])
    path = tmp_path / "visa_pretrained.pth"
    torch.save({"trainable_linearlayer": state}, path)
    loaded = tiny(official_checkpoint=str(path))
    from_mapping = APRILGAN.from_official_checkpoint(
        state, backbone="tiny", weights="random", image_size=SIZE, evaluator=False
    )
    categories = ["metal_nut", "candle"]
    with torch.no_grad():
        expected = reference.eval().model(images, categories)
        for other in (loaded, from_mapping):
            out = other.eval().model(images, categories)
            torch.testing.assert_close(out.anomaly_map, expected.anomaly_map, atol=0, rtol=0)
            torch.testing.assert_close(out.pred_score, expected.pred_score, atol=0, rtol=0)
        assert not torch.allclose(tiny().eval().model(images, categories).anomaly_map, expected.anomaly_map)


def test_malformed_official_checkpoints_name_the_file(tmp_path: Path, module: APRILGAN) -> None:
    state = official_state(module.model)
    before = [p.detach().clone() for p in module.model.heads.parameters()]
    cases = {
        "list.pth": ([1, 2, 3], "holds a list"),
        "tensor.pth": (torch.zeros(3), "holds a Tensor"),
        "nan.pth": ({"trainable_linearlayer": {**state, "fc.2.bias": torch.full((16,), float("nan"))}}, "NaN"),
        "missing.pth": (
            {"trainable_linearlayer": {k: v for k, v in state.items() if k != "fc.3.weight"}},
            r"missing keys \['fc.3.weight'\]",
        ),
        "unknown.pth": ({"trainable_linearlayer": {**state, "fc.4.bias": torch.zeros(16)}}, "unknown keys"),
        "shape.pth": ({"trainable_linearlayer": {**state, "fc.0.weight": torch.zeros(768, 1024)}}, "wrong shapes"),
        "inner.pth": ({"trainable_linearlayer": torch.zeros(2)}, "not a state dict"),
    }
    for name, (content, message) in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(OfficialCheckpointError, match=message) as info:
            module.load_official_checkpoint(tmp_path / name)
        assert name in str(info.value)
    (tmp_path / "garbage.pth").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(OfficialCheckpointError, match="garbage.pth"):
        module.load_official_checkpoint(tmp_path / "garbage.pth")
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        module.load_official_checkpoint(tmp_path / "absent.pth")
    # Nothing was half-loaded by any of the failures.
    for old, new in zip(before, module.model.heads.parameters(), strict=True):
        assert torch.equal(old, new)


# ---------------------------------------------------------------------------------------------------------------------
# CLI: fit then test on generated data (the MVTec-AD-source config: 3 epochs officially, mosaic p = 0.2)
# ---------------------------------------------------------------------------------------------------------------------


def test_fit_and_test_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zsad.cli import build_cli
    from zsad.data.synthetic import make_mvtec_like

    common = {"categories": ("alpha", "beta"), "n_train": 1, "n_test_good": 2, "n_test_defect": 1}
    source = make_mvtec_like(tmp_path / "source", domain="a", **common)
    target = make_mvtec_like(tmp_path / "target", domain="b", **common)
    encoded: list[str] = []
    original = APRILGANModel.encode_class

    def counted(self, word):  # noqa: ANN001, ANN202
        encoded.append(word)
        return original(self, word)

    monkeypatch.setattr(APRILGANModel, "encode_class", counted)
    args = [
        "--config",
        str(CONFIGS / "mvtec_to_visa.yaml"),
        "--model.init_args.backbone=tiny",
        "--model.init_args.weights=random",
        f"--model.init_args.image_size={SIZE}",
        "--data.init_args.train=" + json.dumps({"dataset": "mvtec", "root": str(source)}),
        "--data.init_args.test=" + json.dumps({"dataset": "mvtec", "root": str(target)}),
        "--data.init_args.num_workers=0",
        "--data.init_args.eval_batch_size=4",
        "--trainer.max_epochs=1",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
    ]
    fit = build_cli(["fit", *args, "--test_after_fit=false"])
    assert fit.trainer.global_step == 2  # 12 source test images, batch 8
    assert fit.datamodule.mosaic_probability == 0.2
    assert sorted(encoded) == ["alpha", "beta"]  # once per category for the whole run
    trained = {k: v.clone() for k, v in fit.model.trainable_state_dict().items()}
    assert set(trained) == {f"model.heads.{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    (ckpt,) = (tmp_path / "run").rglob("*.ckpt")
    stored = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert set(stored) == set(trained)  # heads only: no frozen CLIP in the checkpoint
    encoded.clear()
    test = build_cli(["test", *args, f"--ckpt_path={ckpt}"])
    assert sorted(encoded) == ["alpha", "beta"]  # 3 test batches, each category's text encoded once
    for key, value in test.model.trainable_state_dict().items():
        torch.testing.assert_close(value, trained[key])
    metrics = test.trainer.callback_metrics
    assert any(key.endswith("/mean/pixel_auroc") for key in metrics), sorted(metrics)
    assert all(torch.isfinite(v).all() for v in metrics.values())
