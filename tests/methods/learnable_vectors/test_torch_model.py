"""The seed-000 model: parameter budget, Eq. 1 scores, layer fusion, smoothing and the encode / head split,
each against a reference written out here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from scipy.ndimage import gaussian_filter

from zsad.methods import LearnableVectors, count_parameters
from zsad.methods.learnable_vectors import LearnableVectorsModel


def test_vit_l_336_budget_is_7684_trainable_of_304301572() -> None:
    """The seed's Table 2 row (7.7K / 304.3M): vision tower + projection + 5 pairs x 2 x 768 + 4 layer weights."""
    model = LearnableVectors(weights="random", image_size=518, evaluator=False)
    assert count_parameters(model) == (7_684, 304_301_572)
    assert model.backbone.text is None and model.backbone.text_projection is None
    assert not [name for name, _ in model.named_parameters() if "text" in name]


@pytest.mark.parametrize(
    ("kwargs", "trainable"),
    [({}, 5 * 2 * 16 + 4), ({"shared_vectors": True}, 2 * 16 + 4), ({"layer_weighting": "fixed"}, 5 * 2 * 16),
     ({"layers": (12, 24)}, 3 * 2 * 16 + 2)],
)
def test_ablations_change_the_budget_as_the_spec_says(tiny_backbone, kwargs: dict, trainable: int) -> None:
    model = LearnableVectorsModel(tiny_backbone, **kwargs)
    assert count_parameters(model)[0] == trainable


def reference_probability(z: torch.Tensor, f_n: torch.Tensor, f_a: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 1 of the seed written out: exp(sim(z, f_a)/τ) / (exp(sim(z, f_n)/τ) + exp(sim(z, f_a)/τ))."""
    sim_n = (z * f_n).sum(-1) / (z.norm(dim=-1) * f_n.norm())
    sim_a = (z * f_a).sum(-1) / (z.norm(dim=-1) * f_a.norm())
    e_n, e_a = torch.exp(sim_n.double() / tau), torch.exp(sim_a.double() / tau)
    return (e_a / (e_n + e_a)).float()


def test_scores_and_fused_map_follow_the_paper(tiny_backbone) -> None:
    torch.manual_seed(0)
    model = LearnableVectorsModel(tiny_backbone, init_std=1.0)
    with torch.no_grad():
        model.layer_logits.copy_(torch.tensor([0.3, -1.0, 2.0, 0.1]))
    features = {"global": torch.randn(2, 16), "patches": torch.randn(2, 4, 49, 16)}
    out = model.forward_features(features, (98, 98))
    f = model.vectors.detach()
    # Image score: the image-level pair only.
    torch.testing.assert_close(out["image_score"], reference_probability(features["global"], f[0, 0], f[0, 1], 0.07))
    # Layer maps: each layer with its own pair, on the 7x7 grid (row-major patches).
    for i in range(4):
        expected = reference_probability(features["patches"][:, i], f[1 + i, 0], f[1 + i, 1], 0.07).reshape(2, 7, 7)
        torch.testing.assert_close(out["layer_maps"][:, i], expected)
    # Final map: Σ_l w(l) · bilinear-upsampled S^(l), w = softmax(θ).
    w = torch.softmax(torch.tensor([0.3, -1.0, 2.0, 0.1]), 0)
    up = F.interpolate(out["layer_maps"], size=(98, 98), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out["anomaly_map"], (up * w[None, :, None, None]).sum(1))
    assert torch.allclose(model.layer_weights.sum(), torch.tensor(1.0))


def test_eval_forward_is_encode_then_head_then_scipy_smoothing(tiny_backbone) -> None:
    torch.manual_seed(1)
    model = LearnableVectorsModel(tiny_backbone, init_std=1.0).eval()
    images = torch.randn(2, 3, 98, 98)
    out = model(images)
    assert out.pred_score.shape == (2,) and out.anomaly_map.shape == (2, 98, 98)
    assert out.anomaly_map.dtype == torch.float32
    raw = model.forward_features(model.encode(images), (98, 98))
    torch.testing.assert_close(out.pred_score, raw["image_score"])
    smoothed = np.stack([gaussian_filter(m.detach().numpy().astype(np.float64), sigma=4) for m in raw["anomaly_map"]])
    torch.testing.assert_close(out.anomaly_map, torch.from_numpy(smoothed).float(), atol=1e-6, rtol=1e-5)
    # Training mode returns the unsmoothed head outputs the loss needs.
    train_out = model.train()(images)
    torch.testing.assert_close(train_out["anomaly_map"], raw["anomaly_map"])


def test_encode_taps_layers_through_frozen_ln_post_and_projection(tiny_backbone) -> None:
    model = LearnableVectorsModel(tiny_backbone)
    images = torch.randn(1, 3, 98, 98)
    features = model.encode(images)
    hidden = tiny_backbone.vision(pixel_values=images, output_hidden_states=True, interpolate_pos_encoding=True)
    for i, layer in enumerate((6, 12, 18, 24)):
        tokens = hidden.hidden_states[layer][:, 1:]
        expected = tiny_backbone.visual_projection(tiny_backbone.vision.post_layernorm(tokens))
        torch.testing.assert_close(features["patches"][:, i], expected, atol=1e-5, rtol=1e-4)
    expected_global = tiny_backbone.visual_projection(hidden.pooler_output)
    torch.testing.assert_close(features["global"], expected_global, atol=1e-5, rtol=1e-4)
    assert not features["patches"].requires_grad


def test_every_pair_and_the_layer_weights_get_gradients(tiny_backbone) -> None:
    torch.manual_seed(2)
    model = LearnableVectorsModel(tiny_backbone, init_std=1.0).train()
    out = model(torch.randn(2, 3, 98, 98))
    (out["anomaly_map"].mean() + out["image_score"].mean()).backward()
    assert (model.vectors.grad.flatten(1).abs().sum(1) > 0).all()
    assert (model.layer_logits.grad.abs() > 0).all()
    assert all(p.grad is None for p in tiny_backbone.parameters())


def test_global_plus_max_image_score(tiny_backbone) -> None:
    torch.manual_seed(3)
    model = LearnableVectorsModel(tiny_backbone, image_score="global+max", init_std=1.0).eval()
    images = torch.randn(2, 3, 98, 98)
    out = model(images)
    faithful = LearnableVectorsModel(tiny_backbone, init_std=1.0).eval()
    faithful.load_state_dict(model.state_dict())
    ref = faithful(images)
    torch.testing.assert_close(out.pred_score, 0.5 * (ref.pred_score + ref.anomaly_map.flatten(1).amax(1)))
