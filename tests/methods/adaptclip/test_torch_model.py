"""AdaptCLIP torch model on the tiny CLIP: alignment, joint feature, branch decoupling, fusion, text adapter cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from scipy.ndimage import gaussian_filter

from zsad.backbone import create_backbone
from zsad.methods.adaptclip import AdaptCLIPModel, align_to_references, static_prompts

SIZE = 98


@pytest.fixture(scope="module")
def model() -> AdaptCLIPModel:
    torch.manual_seed(0)
    backbone = create_backbone("tiny", weights="random", image_size=SIZE, pos_interpolation="bilinear")
    return AdaptCLIPModel(backbone).eval()


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_alignment_picks_the_true_nearest_reference_patch() -> None:
    gen = torch.Generator().manual_seed(1)
    query = F.normalize(torch.randn(2, 30, 8, generator=gen), dim=-1)
    refs = F.normalize(torch.randn(2, 50, 8, generator=gen), dim=-1)
    distance, index, aligned = align_to_references(query, refs)
    # Independent brute force: Euclidean distance between unit vectors (the slides' argmin ‖F^q_i − F^p_j‖).
    for b in range(2):
        for i in range(30):
            l2 = ((refs[b] - query[b, i]) ** 2).sum(-1)
            j = int(l2.argmin())
            assert int(index[b, i]) == j
            assert torch.equal(aligned[b, i], refs[b, j])
            assert distance[b, i] == pytest.approx(float(1 - query[b, i] @ refs[b, j]), abs=1e-6)
    # A memory shared by the batch ([M, E]) gives the same answer as the same memory repeated per sample.
    shared = align_to_references(query, refs[0])
    repeated = align_to_references(query, refs[0].expand(2, -1, -1))
    assert torch.equal(shared[1], repeated[1])
    assert torch.allclose(shared[2], repeated[2])


def test_residual_vanishes_when_the_query_is_a_reference(model: AdaptCLIPModel) -> None:
    query_images, other = _images(1, 2), _images(1, 3)
    memory = model.encode_references(torch.cat([other, query_images]))  # [L, 2N, E], query is the second reference
    tokens = model.encode(query_images)["patch_tokens"]  # [1, L, N, E]
    pq = model.prompt_query
    for layer in range(len(model.layers)):
        q = F.normalize(tokens[:, layer], dim=-1)
        distance, _, aligned = align_to_references(q, F.normalize(memory[layer], dim=-1))
        assert distance.abs().max() < 1e-5
        torch.testing.assert_close(pq.joint_feature(q, aligned), q, atol=1e-5, rtol=0)
    # Against a different image the residual does not vanish (the check above is not vacuous).
    distance, _, aligned = align_to_references(F.normalize(tokens[:, -1], dim=-1), F.normalize(memory[-1][:49], dim=-1))
    assert distance.min() > 1e-3
    # Through the whole adapter: the alignment map is zero everywhere.
    out = model.forward_features(model.encode(query_images), (SIZE, SIZE), memory)
    assert out["align"].abs().max() < 1e-5


def test_output_shapes_and_zero_vs_few_shot(model: AdaptCLIPModel) -> None:
    images = _images(2, 4)
    zero = model(images)
    assert zero.pred_score.shape == (2,)
    assert zero.anomaly_map.shape == (2, SIZE, SIZE)
    assert zero.anomaly_map.dtype == torch.float32
    few = model(images, model.encode_references(_images(2, 5)))
    assert few.anomaly_map.shape == (2, SIZE, SIZE)
    assert not torch.allclose(zero.anomaly_map, few.anomaly_map)


def _reference_fusion(out: dict[str, torch.Tensor], sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Official test.py fusion written with NumPy/SciPy."""
    o = {k: v.detach().double().numpy() for k, v in out.items()}

    def softmax_abn(logits: np.ndarray) -> np.ndarray:
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return (e / e.sum(-1, keepdims=True))[..., 1]

    def harmonic(arrays: list[np.ndarray]) -> np.ndarray:
        return len(arrays) / sum(1.0 / a for a in arrays)

    p_va, p_ta = softmax_abn(o["va_logits"]), softmax_abn(o["ta_logits"])
    m_va, m_ta = o["va_maps"][:, 1], o["ta_maps"][:, 1]
    if "pq_maps" in o:
        m_pq = o["pq_maps"][:, :, 1].mean(1)
        p_pq = softmax_abn(o["pq_logits"]).mean(1)
        align = harmonic(list(o["align"].transpose(1, 0, 2, 3)))
        raw = harmonic([(m_va + m_ta + m_pq) / 3, align])
        smooth = np.stack([gaussian_filter(m, sigma=sigma) for m in raw])
        score = harmonic([(p_va + p_ta + p_pq) / 3, smooth.reshape(len(smooth), -1).max(1)])
    else:
        smooth = np.stack([gaussian_filter(m, sigma=sigma) for m in (m_va + m_ta) / 2])
        score = (p_va + p_ta + smooth.reshape(len(smooth), -1).max(1)) / 3
    return np.nan_to_num(score, nan=0.0), np.nan_to_num(smooth, nan=0.0)


@pytest.mark.parametrize("few_shot", [False, True])
def test_fusion_matches_the_official_formulas(model: AdaptCLIPModel, few_shot: bool) -> None:
    images = _images(2, 6)
    refs = model.encode_references(_images(1, 7)) if few_shot else None
    with torch.no_grad():
        out = model.forward_features(model.encode(images), (SIZE, SIZE), refs)
        pred = model.fuse(out)
    score, smooth = _reference_fusion(out, sigma=4.0)
    np.testing.assert_allclose(pred.anomaly_map.numpy(), smooth, atol=1e-5)
    np.testing.assert_allclose(pred.pred_score.numpy(), score, atol=1e-5)


def test_branches_are_decoupled_and_all_adapters_learn(model: AdaptCLIPModel) -> None:
    model.train()
    try:
        images = _images(2, 8)
        features = model.encode(images)
        out = model.forward_features(features, (SIZE, SIZE), model.encode(_images(2, 9))["patch_tokens"])
        visual = list(model.visual.parameters())
        textual = list(model.textual.parameters())
        prompt_query = list(model.prompt_query.parameters())
        # The visual branch never sees learned text, the textual branch never sees adapted visual features.
        g_va = torch.autograd.grad(out["va_logits"].sum() + out["va_maps"].sum(), visual + textual, allow_unused=True)
        assert all(g is not None for g in g_va[: len(visual)])
        assert all(g is None for g in g_va[len(visual) :])
        g_ta = torch.autograd.grad(
            out["ta_logits"].sum() + out["ta_maps"][:, 1].sum(), visual + textual, allow_unused=True
        )
        assert all(g is None for g in g_ta[: len(visual)])
        assert all(g is not None and g.abs().sum() > 0 for g in g_ta[len(visual) :])
        g_pq = torch.autograd.grad(out["pq_logits"].sum() + out["pq_maps"][:, :, 1].sum(), prompt_query)
        assert all(g is not None for g in g_pq)
    finally:
        model.eval()


def test_prompt_query_heads_are_shared_across_layers_and_norms_are_not(model: AdaptCLIPModel) -> None:
    pq = model.prompt_query
    assert len(pq.layer_norms) == 4
    assert len({id(bn) for bn in pq.layer_norms}) == 4
    # Changing the shared head changes every layer's map; changing one layer's norm changes only that layer.
    images, refs = _images(1, 10), model.encode_references(_images(1, 11))
    with torch.no_grad():
        base = model.forward_features(model.encode(images), (SIZE, SIZE), refs)
        pq.layer_norms[2].bias.add_(1.0)
        moved = model.forward_features(model.encode(images), (SIZE, SIZE), refs)
        pq.layer_norms[2].bias.sub_(1.0)
    changed = [not torch.allclose(base["pq_maps"][:, i], moved["pq_maps"][:, i]) for i in range(4)]
    assert changed == [False, False, True, False]


def test_static_text_is_the_object_ensemble(model: AdaptCLIPModel) -> None:
    normal, abnormal = static_prompts()
    assert (len(normal), len(abnormal)) == (147, 84)
    assert abnormal.count("a jpeg corrupted photo of the damaged object.") == 2
    assert "a photo of a flawless object for anomaly detection." in normal
    static = model.static_text_features()
    expected_abnormal = model.backbone.encode_text(abnormal).mean(0)
    torch.testing.assert_close(static[1], expected_abnormal)
    # Encoded once: a second call reuses the backbone's cached prompt features.
    assert model.backbone.encode_text(normal) is model.backbone.encode_text(normal)


def test_text_adapter_skeleton_and_cache(model: AdaptCLIPModel) -> None:
    backbone, adapter = model.backbone, model.textual
    # With the contexts set to the embedding of "x", the learned prompt is the text "X X … X." (official skeleton).
    x_id = backbone.tokenizer.encode("x")[0]
    x_embedding = backbone.text.embeddings.token_embedding.weight[x_id]
    saved = (adapter.ctx_normal.detach().clone(), adapter.ctx_abnormal.detach().clone())
    try:
        with torch.no_grad():
            adapter.ctx_normal.copy_(x_embedding.expand_as(adapter.ctx_normal))
            features = adapter(backbone)
        expected = backbone.encode_text([" ".join(["X"] * 12) + "."])[0]
        torch.testing.assert_close(features[0], expected, atol=1e-5, rtol=1e-5)
        # Eval + no grad: cached until the parameters change.
        with torch.no_grad():
            assert adapter(backbone) is features
            adapter.ctx_abnormal.add_(0.1)
            changed = adapter(backbone)
        assert changed is not features
        assert not torch.allclose(changed[1], features[1])
        # With gradients enabled the features are recomputed and differentiable.
        assert adapter(backbone).requires_grad
    finally:
        with torch.no_grad():
            adapter.ctx_normal.copy_(saved[0])
            adapter.ctx_abnormal.copy_(saved[1])


def test_parameter_counts_at_vit_l_14_336() -> None:
    # The meta device gives the real architecture's shapes without allocating ViT-L (counts only).
    from zsad.methods import count_parameters
    from zsad.methods.adaptclip import AdaptCLIP

    with torch.device("meta"):
        module = AdaptCLIP(backbone="vit_l_14_336", weights="random", evaluator=False)
    counts = module.model.parameter_counts()
    assert counts == {
        "textual": 18_432,
        "visual": 590_592,
        "prompt_query": 1_154_242,
        "zero_shot": 609_024,
        "total": 1_763_266,
    }
    trainable, total = count_parameters(module)
    assert trainable == 1_763_266
    assert total - trainable == 427_944_193 - 1  # full CLIP without logit_scale
