"""AnomalyCLIP's public class: loss, official checkpoint import, and fit/test through the CLI (tiny CLIP)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from zsad.methods.anomalyclip import AnomalyCLIP, AnomalyCLIPModel, OfficialCheckpointError

SIZE = 98
CONFIGS = Path(__file__).parents[3] / "configs" / "anomalyclip"


def tiny(**kwargs) -> AnomalyCLIP:
    torch.manual_seed(0)
    return AnomalyCLIP(backbone="tiny", weights="random", image_size=SIZE, evaluator=False, **kwargs)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


# ---------------------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------------------


def _focal(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """README §5: one-hot clamped to [1e-5, 1 - 1e-5], p_t = Σ onehot·p + 1e-5, mean of -(1 - p_t)² log p_t."""
    onehot = torch.stack([1 - target, target], dim=1).clamp(1e-5, 1 - 1e-5)
    p_t = (onehot * probs).sum(1) + 1e-5
    return (-((1 - p_t) ** 2) * p_t.log()).mean()


def _dice(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    p, g = p.flatten(1), g.flatten(1)
    return 1 - ((2 * (p * g).sum(1) + 1) / (p.sum(1) + g.sum(1) + 1)).mean()


# Issue 15 (6b): the official train.py weights the pixel loss by 4 with any --features_list, also 6/12/18/24.
@pytest.mark.parametrize(("layers", "weight"), [((24,), 4.0), ((6, 12, 18, 24), 4.0)])
def test_loss_is_ce_plus_weighted_focal_and_dice(images: torch.Tensor, layers: tuple, weight: float) -> None:
    module = tiny(layers=layers)
    module.train()
    mask = torch.zeros(3, SIZE, SIZE, dtype=torch.bool)
    mask[1, 20:60, 30:70] = True
    batch = SimpleNamespace(image=images, gt_label=torch.tensor([0, 1, 0]), gt_mask=mask)
    loss = module.compute_loss(batch)
    with torch.no_grad():
        out = module.model.forward_features(module.model.encode(images), (SIZE, SIZE), full_maps=True)
    g = mask.float()
    expected_pixel = sum(
        _focal(out["maps"][:, i], g) + _dice(out["maps"][:, i, 1], g) + _dice(out["maps"][:, i, 0], 1 - g)
        for i in range(len(layers))
    )
    expected = F.cross_entropy(out["image_logits"], torch.tensor([0, 1, 0])) + weight * expected_pixel
    assert module.map_loss_weight == weight
    torch.testing.assert_close(loss["loss"], expected, atol=1e-5, rtol=1e-5)
    loss["loss"].backward()
    assert all(p.grad is not None for p in module.model.prompt_parameters())
    # Without masks only the global term is trained (the authors' advice for label-only datasets).
    no_mask = module.compute_loss(SimpleNamespace(image=images, gt_label=torch.tensor([0, 1, 0]), gt_mask=None))
    torch.testing.assert_close(no_mask["loss"], F.cross_entropy(out["image_logits"], torch.tensor([0, 1, 0])))


# ---------------------------------------------------------------------------------------------------------------------
# Official checkpoint import
# ---------------------------------------------------------------------------------------------------------------------


def official_state_dict(model: AnomalyCLIPModel, seed: int = 7, word: str = "object") -> dict[str, torch.Tensor]:
    """An AnomalyCLIP_PromptLearner state dict as the official code saves it (tiny widths)."""
    gen = torch.Generator().manual_seed(seed)
    width = model.backbone.text_width
    token_embedding = model.backbone.text.embeddings.token_embedding
    x12 = " ".join(["X"] * 12)
    state = {
        "ctx_pos": torch.randn(1, 1, 12, width, generator=gen) * 0.02,
        "ctx_neg": torch.randn(1, 1, 12, width, generator=gen) * 0.02,
    }
    for side, text in (("pos", f"{x12} {word}."), ("neg", f"{x12} damaged {word}.")):
        ids = model.backbone.tokenizer([text])  # OpenAI padding id 0, like the official buffers
        with torch.no_grad():
            embedding = token_embedding(ids)
        state[f"token_prefix_{side}"] = embedding[:, :1].unsqueeze(0).clone()
        state[f"token_suffix_{side}"] = embedding[:, 13:].unsqueeze(0).clone()
        state[f"tokenized_prompts_{side}"] = ids.unsqueeze(0).int()
    for i in range(8):
        state[f"compound_prompts_text.{i}"] = torch.randn(4, width, generator=gen) * 0.02
        state[f"compound_prompt_projections.{i}.weight"] = torch.randn(896, width, generator=gen)
        state[f"compound_prompt_projections.{i}.bias"] = torch.zeros(896)
    return state


def test_official_checkpoint_equals_setting_the_parameters(
    tmp_path: Path, images: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    reference = tiny()
    state = official_state_dict(reference.model)
    with torch.no_grad():
        reference.model.ctx_normal.copy_(state["ctx_pos"][0, 0])
        reference.model.ctx_abnormal.copy_(state["ctx_neg"][0, 0])
        for i, prompt in enumerate(reference.model.deep_prompts):
            prompt.copy_(state[f"compound_prompts_text.{i}"])
    path = tmp_path / "epoch_15.pth"
    torch.save({"epoch": 15, "prompt_learner": state}, path)
    with caplog.at_level(logging.WARNING):
        loaded = tiny(official_checkpoint=str(path))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # frozen parts match this backbone
    from_mapping = AnomalyCLIP.from_official_checkpoint(
        state, backbone="tiny", weights="random", image_size=SIZE, evaluator=False
    )
    fresh = tiny()
    for module in (reference, loaded, from_mapping, fresh):
        module.eval()
    with torch.no_grad():
        expected = reference.model(images)
        for module in (loaded, from_mapping):
            out = module.model(images)
            torch.testing.assert_close(out.pred_score, expected.pred_score, atol=0, rtol=0)
            torch.testing.assert_close(out.anomaly_map, expected.anomaly_map, atol=0, rtol=0)
        assert not torch.allclose(fresh.model(images).pred_score, expected.pred_score)
    # The dead compound_prompt_projections are not created: only the 1,792 prompt values are trainable.
    assert sum(p.numel() for p in loaded.parameters() if p.requires_grad) == 1792
    assert not any("projection" in k for k in loaded.trainable_state_dict())


def test_official_checkpoint_mismatches_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    module = tiny()
    state = official_state_dict(module.model)
    with pytest.raises(OfficialCheckpointError, match="n_ctx=12"):
        module.load_official_checkpoint({**state, "ctx_pos": torch.zeros(1, 1, 8, 32)})
    with pytest.raises(OfficialCheckpointError, match="deep prompts"):
        module.load_official_checkpoint({k: v for k, v in state.items() if k != "compound_prompts_text.7"})
    with pytest.raises(OfficialCheckpointError, match="object-agnostic"):
        module.load_official_checkpoint(official_state_dict(module.model, word="bottle"))
    with pytest.raises(OfficialCheckpointError, match="unknown keys"):
        module.load_official_checkpoint({**state, "image_encoder.weight": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="epoch_15"):
        module.load_official_checkpoint("missing/epoch_15.pth")
    other = {**state, "token_suffix_neg": state["token_suffix_neg"] + 1.0}
    with caplog.at_level(logging.WARNING):
        module.load_official_checkpoint(other)  # loads, but warns: prompts learnt with another CLIP
    assert any("token_suffix_neg" in r.getMessage() for r in caplog.records)


def test_unreadable_or_foreign_official_files_name_the_file(tmp_path: Path) -> None:
    """Issue 15 (6c): garbage bytes, a saved tensor / list, NaN prompts gave IndexError / AttributeError / silence."""
    module = tiny()
    state = official_state_dict(module.model)
    good = tmp_path / "epoch_15.pth"
    torch.save({"epoch": 15, "prompt_learner": state}, good)
    cases = {
        "garbage.pth": (lambda p: p.write_bytes(b"\x80\x02garbage" * 50), "truncated or corrupt"),
        "truncated.pth": (lambda p: p.write_bytes(good.read_bytes()[:-300]), "truncated or corrupt"),
        "tensor.pth": (lambda p: torch.save(torch.zeros(4, 32), p), "holds a Tensor"),
        "list.pth": (lambda p: torch.save([torch.zeros(1)], p), "holds a list"),
        "no_tensors.pth": (lambda p: torch.save({"epoch": 15}, p), "holds no tensors"),
        "nan.pth": (
            lambda p: torch.save({"prompt_learner": {**state, "ctx_neg": state["ctx_neg"] * float("nan")}}, p),
            r"non-finite.*ctx_neg",
        ),
        "other_model.pth": (lambda p: torch.save({"weight": torch.zeros(2)}, p), "unknown keys"),
    }
    before = [p.detach().clone() for p in module.model.prompt_parameters()]
    for name, (write, reason) in cases.items():
        path = tmp_path / name
        write(path)
        with pytest.raises(OfficialCheckpointError, match=reason) as error:
            AnomalyCLIP.from_official_checkpoint(path, backbone="tiny", weights="random", image_size=SIZE)
        assert name in str(error.value)
        with pytest.raises(OfficialCheckpointError):
            module.load_official_checkpoint(path)
    for old, new in zip(before, module.model.prompt_parameters(), strict=True):
        assert torch.equal(old, new)  # a refused file changes nothing


# ---------------------------------------------------------------------------------------------------------------------
# CLI: fit then test on generated data
# ---------------------------------------------------------------------------------------------------------------------


def test_fit_and_test_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zsad.cli import build_cli
    from zsad.data.synthetic import make_mvtec_like

    common = {"categories": ("alpha", "beta"), "n_train": 1, "n_test_good": 2, "n_test_defect": 1}
    source = make_mvtec_like(tmp_path / "source", domain="a", **common)
    target = make_mvtec_like(tmp_path / "target", domain="b", **common)
    calls = []
    original = AnomalyCLIPModel.encode_prompts

    def counted(self):  # noqa: ANN001, ANN202
        calls.append(self.training)
        return original(self)

    monkeypatch.setattr(AnomalyCLIPModel, "encode_prompts", counted)
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
    steps = fit.trainer.global_step
    assert steps == 2  # 12 source test images (2 categories x (2 good + 4 defects)), batch 8
    assert calls == [True] * steps  # the two prompts once per optimiser step, never per image
    trained = {k: v.clone() for k, v in fit.model.trainable_state_dict().items()}
    (ckpt,) = (tmp_path / "run").rglob("*.ckpt")
    stored = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert set(stored) == set(trained)  # prompts only: no frozen CLIP in the checkpoint
    calls.clear()
    test = build_cli(["test", *args, f"--ckpt_path={ckpt}"])
    assert calls == [False]  # 3 test batches, text features encoded once
    for key, value in test.model.trainable_state_dict().items():
        torch.testing.assert_close(value, trained[key])
    metrics = test.trainer.callback_metrics
    assert metrics, "the evaluator reported no metrics"
    assert all(torch.isfinite(v).all() for v in metrics.values())


def test_training_over_cached_features_gives_the_same_loss(images: torch.Tensor) -> None:
    from zsad.backbone.cache import CachedFeatureBatch

    module = tiny(feature_cache="unused")
    assert module.supports_feature_cache and module.feature_cache == "unused"
    module.train()
    labels, mask = torch.tensor([1, 0, 1]), torch.zeros(3, SIZE, SIZE, dtype=torch.bool)
    mask[0, :30] = True
    from_images = module.compute_loss(SimpleNamespace(image=images, gt_label=labels, gt_mask=mask))
    cached = CachedFeatureBatch(
        features=module.model.encode(images), image_size=(SIZE, SIZE), gt_label=labels, gt_mask=mask
    )
    from_cache = module.compute_loss(cached)
    torch.testing.assert_close(from_cache["loss"], from_images["loss"])
