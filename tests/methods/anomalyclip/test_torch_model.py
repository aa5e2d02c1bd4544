"""AnomalyCLIP's torch model against references written here from the spec's formulas (tiny CLIP)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from scipy.ndimage import gaussian_filter

from zsad.backbone import create_backbone
from zsad.methods.anomalyclip import AnomalyCLIPModel

SIZE = 98  # tiny analogue of 518: 7x7 grid


def make_model(attn: str = "sdpa", **kwargs) -> AnomalyCLIPModel:
    backbone = create_backbone(
        "tiny", weights="random", image_size=SIZE, pos_interpolation="bilinear", attn_implementation=attn
    )
    torch.manual_seed(1)
    return AnomalyCLIPModel(backbone, **kwargs).eval()


@pytest.fixture(scope="module")
def model() -> AnomalyCLIPModel:
    return make_model()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------------------------------------------------------------
# Prompts and text side
# ---------------------------------------------------------------------------------------------------------------------


def test_object_agnostic_prompts_have_the_official_token_layout(model: AnomalyCLIPModel) -> None:
    normal, abnormal = model.templates
    sot, obj, dot, damaged, eot = 49406, 14115, 269, 13568, 49407
    assert normal.ids[:16].tolist() == [sot, *[0] * 12, obj, dot, eot] and normal.eot_index == 15
    assert abnormal.ids[:17].tolist() == [sot, *[0] * 12, damaged, obj, dot, eot] and abnormal.eot_index == 16
    assert normal.ctx_start == abnormal.ctx_start == 1


def test_trainable_parameters_are_the_prompts_only(model: AnomalyCLIPModel) -> None:
    trainable = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    expected = {"ctx_normal": (12, 32), "ctx_abnormal": (12, 32)} | {f"deep_prompts.{i}": (4, 32) for i in range(8)}
    assert trainable == expected
    # (2 x 12 + 8 x 4) x text width: 43,008 at ViT-L/14@336 (width 768), 1,792 for the tiny model.
    assert sum(math.prod(s) for s in trainable.values()) == (2 * 12 + 8 * 4) * 32 == 1792


def _official_ids(model: AnomalyCLIPModel) -> torch.Tensor:
    x12 = " ".join(["X"] * 12)
    return model.backbone.tokenizer([f"{x12} object.", f"{x12} damaged object."])


def _set_context_to_word_x(model: AnomalyCLIPModel) -> None:
    x = model.backbone.text.embeddings.token_embedding.weight[343]  # "x", the official placeholder
    with torch.no_grad():
        model.ctx_normal.copy_(x.expand(12, -1))
        model.ctx_abnormal.copy_(x.expand(12, -1))


def _hf_text_features(model: AnomalyCLIPModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        pooled = model.backbone.text(input_ids=ids).pooler_output  # HF's own forward and causal mask
        return F.normalize(model.backbone.text_projection(pooled), dim=-1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_text_forward_with_real_token_embeddings_equals_hf(attn: str) -> None:
    """Context vectors = the embedding of "X": the learnable path is HF's text forward of "X … X (damaged) object."."""
    model = make_model(attn, prompt_depth=1)  # no deep prompts: a plain text forward
    _set_context_to_word_x(model)
    expected = _hf_text_features(model, _official_ids(model))
    with torch.no_grad():
        ours = model.text_features()
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    # Not vacuous: a bidirectional (mask-less) pass gives something else.
    with torch.no_grad():
        token_embeds = model.backbone.text.embeddings(input_ids=_official_ids(model))
        h = token_embeds
        for layer in model.backbone.text.encoder.layers:
            h = layer(h, None)
        h = model.backbone.text.final_layer_norm(h)
        leaky = F.normalize(model.backbone.text_projection(h[torch.arange(2), torch.tensor([15, 16])]), dim=-1)
    assert not torch.allclose(leaky, expected, atol=1e-3)


def test_deep_prompts_replace_positions_1_to_4_of_text_layers_2_to_9() -> None:
    """Reference: HF's own text forward with pre-hooks overwriting hidden positions 1..4 (official code, fp16-cast)."""
    model = make_model()
    _set_context_to_word_x(model)
    hooks = []
    for index in range(1, 9):

        def replace(module, args, kwargs, prompt=model.deep_prompts[index - 1]):  # noqa: ANN001, ANN202, ARG001
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden = hidden.clone()
            hidden[:, 1:5] = prompt.detach().half().float()
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        hooks.append(model.backbone.text.encoder.layers[index].register_forward_pre_hook(replace, with_kwargs=True))
    try:
        expected = _hf_text_features(model, _official_ids(model))
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        ours = model.text_features()
        plain = _hf_text_features(model, _official_ids(model))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the deep prompts do act
    # Gradients reach every learnable tensor through the frozen tower; the tower itself gets none.
    model.train()
    (model.text_features() * torch.randn(2, 16)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.prompt_parameters())
    assert all(p.grad is None for p in model.backbone.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Image side: DPAM
# ---------------------------------------------------------------------------------------------------------------------


def _layer_norm(module: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + module.eps) * module.weight + module.bias


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, w = q.shape
    d = w // heads
    q, k, v = (t.reshape(b, n, heads, d).permute(0, 2, 1, 3) for t in (q, k, v))
    a = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, dim=-1)
    return (a @ v).permute(0, 2, 1, 3).reshape(b, n, w)


def reference_dpam(model: AnomalyCLIPModel, images: torch.Tensor, layers: tuple[int, ...], mode: str = "bilinear"):
    """AnomalyCLIP's image forward from the spec's formulas (§2), written out with plain tensor algebra."""
    vis, proj = model.backbone.vision, model.backbone.visual_projection.weight
    emb = vis.embeddings
    width = emb.class_embedding.shape[0]
    x = F.conv2d(images, emb.patch_embedding.weight, stride=14)  # no bias in CLIP
    side = x.shape[-1]
    x = x.flatten(2).transpose(1, 2)
    table = emb.position_embedding.weight
    native = int(round((table.shape[0] - 1) ** 0.5))
    pos = table[1:].T.reshape(1, width, native, native)
    pos = F.interpolate(pos, size=(side, side), mode=mode, align_corners=False).reshape(width, -1).T
    x = torch.cat([(emb.class_embedding + table[0]).expand(x.shape[0], 1, -1), x + pos], dim=1)
    h = _layer_norm(vis.pre_layrnorm, x)
    s, taps = None, {}
    for index, block in enumerate(vis.encoder.layers, start=1):
        att = block.self_attn
        u = _layer_norm(block.layer_norm1, h)
        q = u @ att.q_proj.weight.T + att.q_proj.bias
        k = u @ att.k_proj.weight.T + att.k_proj.bias
        v = u @ att.v_proj.weight.T + att.v_proj.bias
        heads = vis.config.num_attention_heads
        o_ori = _attention(q, k, v, heads) @ att.out_proj.weight.T + att.out_proj.bias
        if index >= 6:  # s^(5) = h^(5); s^(l) = s^(l-1) + o_vv(LN1(h^(l-1))): no MLP, input from the original stream
            s = (h if s is None else s) + _attention(v, v, v, heads) @ att.out_proj.weight.T + att.out_proj.bias
        h = h + o_ori
        z = _layer_norm(block.layer_norm2, h) @ block.mlp.fc1.weight.T + block.mlp.fc1.bias
        z = z * torch.sigmoid(1.702 * z)  # QuickGELU
        h = h + z @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
        if index in layers:
            taps[index] = s
    patches = torch.stack([_layer_norm(vis.post_layernorm, taps[k])[:, 1:] @ proj.T for k in layers], dim=1)
    return {"global": h[:, 0] @ proj.T, "patches": patches}, h


def test_dpam_features_equal_the_formula(images: torch.Tensor) -> None:
    model = make_model(layers=(6, 12, 18, 24))
    with torch.no_grad():
        ours = model.encode(images)
        ref, h24 = reference_dpam(model, images, (6, 12, 18, 24))
        bicubic, _ = reference_dpam(model, images, (24,), mode="bicubic")
        plain = model.backbone.encode_image(images, layers=(24,)).patch_tokens[0]
    assert ours["global"].shape == (2, 16) and ours["patches"].shape == (2, 4, 49, 16)
    torch.testing.assert_close(ours["global"], ref["global"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours["patches"], ref["patches"], atol=1e-5, rtol=1e-4)
    # Each layer is its own stream state (no aliasing of 6/12/18 to 24) ...
    assert (ours["patches"][:, 0] - ours["patches"][:, 3]).abs().max() > 1e-2
    # ... the tokens are not the residual stream's, and bicubic position interpolation would be detectably wrong.
    assert (ours["patches"][:, 3] - plain).abs().max() > 1e-2
    assert (ours["patches"][:, 3] - bicubic["patches"][:, 0]).abs().max() > 1e-4
    # The global feature is proj(h24[CLS]) without ln_post.
    torch.testing.assert_close(ours["global"], model.backbone.visual_projection(h24[:, 0]), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------------------


def test_scores_and_maps_follow_the_official_formulas(model: AnomalyCLIPModel, images: torch.Tensor) -> None:
    with torch.no_grad():
        features = model.encode(images)
        text = model.text_features()
        out = model(images)
        raw = model.forward_features(features, (SIZE, SIZE), full_maps=True)
    g = F.normalize(features["global"], dim=-1)
    expected_score = torch.softmax(g @ text.T / 0.07, dim=-1)[:, 1]
    torch.testing.assert_close(out.pred_score, expected_score)
    # Per patch: softmax(F̂ T̂ᵀ / 0.07) -> 7x7 -> bilinear upsampling of both probabilities -> (S_a + 1 - S_n) / 2.
    probs = torch.softmax(F.normalize(features["patches"][:, 0], dim=-1) @ text.T / 0.07, dim=-1)
    grid = probs.reshape(2, 7, 7, 2).permute(0, 3, 1, 2)
    up = F.interpolate(grid, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    expected_map = (up[:, 1] + 1 - up[:, 0]) / 2
    torch.testing.assert_close(raw["maps"][:, 0], up)
    torch.testing.assert_close(raw["anomaly_map"], expected_map, atol=1e-6, rtol=1e-5)
    smoothed = np.stack([gaussian_filter(m.numpy().astype(np.float64), sigma=4) for m in expected_map])
    assert out.anomaly_map.shape == (2, SIZE, SIZE) and out.anomaly_map.dtype == torch.float32
    np.testing.assert_allclose(out.anomaly_map.numpy(), smoothed, atol=1e-5)


def test_multi_layer_maps_are_summed(images: torch.Tensor) -> None:
    model = make_model(layers=(6, 12, 18, 24))
    with torch.no_grad():
        features = model.encode(images)
        out = model.forward_features(features, (SIZE, SIZE))
        singles = [
            model.forward_features({**features, "patches": features["patches"][:, i : i + 1]}, (SIZE, SIZE))
            for i in range(4)
        ]
    assert out["patch_probs"].shape == (2, 4, 2, 7, 7)
    torch.testing.assert_close(out["anomaly_map"], sum(s["anomaly_map"] for s in singles))


# ---------------------------------------------------------------------------------------------------------------------
# Text features computed once
# ---------------------------------------------------------------------------------------------------------------------


class CountingTower:
    """Counts the text-tower calls of a backbone (and the number of prompts per call)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, model: AnomalyCLIPModel) -> None:
        self.calls: list[int] = []
        original = model.backbone.encode_prompt_embeddings

        def counted(embeddings, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            self.calls.append(embeddings.shape[0])
            return original(embeddings, *args, **kwargs)

        monkeypatch.setattr(model.backbone, "encode_prompt_embeddings", counted)


def test_training_encodes_the_two_prompts_once_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model().train()
    tower = CountingTower(monkeypatch, model)
    batch = torch.randn(4, 3, SIZE, SIZE)
    optimiser = torch.optim.Adam(model.prompt_parameters(), lr=1e-3, betas=(0.5, 0.999))
    before = [p.detach().clone() for p in model.prompt_parameters()]
    for _ in range(2):
        out = model(batch)
        assert out["maps"].shape == (4, 1, 2, SIZE, SIZE)
        optimiser.zero_grad()
        F.cross_entropy(out["image_logits"], torch.tensor([0, 1, 0, 1])).backward()
        optimiser.step()
    assert tower.calls == [2, 2]  # one text forward of two prompts per step, whatever the batch size
    assert all(not torch.equal(a, b) for a, b in zip(before, model.prompt_parameters(), strict=True))
    assert all(p.grad is None for p in model.backbone.parameters())


def test_evaluation_caches_text_features_until_the_prompts_change(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    tower = CountingTower(monkeypatch, model)
    batch = torch.randn(1, 3, SIZE, SIZE)
    with torch.inference_mode():
        first = model(batch).pred_score
        model(batch)
        model(batch)
    assert tower.calls == [2]  # once for all batches
    with torch.no_grad():
        cached = model.text_features()  # the same tensor, usable outside inference mode too
    assert not cached.is_inference()
    # An optimiser-style in-place update invalidates the cache ...
    with torch.no_grad():
        model.ctx_abnormal.add_(torch.randn(12, 32))
        second = model(batch).pred_score
        updated = model.text_features()
    assert tower.calls == [2, 2] and not torch.allclose(cached, updated) and not torch.allclose(first, second)
    # ... so do load_state_dict and train().
    state = {k: v.clone() + 0.1 for k, v in model.state_dict().items() if "backbone" not in k}
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        third = model.text_features()
        fresh = model.encode_prompts()
    assert tower.calls == [2, 2, 2, 2]
    torch.testing.assert_close(third, fresh)
    model.train().eval()
    with torch.no_grad():
        model.text_features()
    assert len(tower.calls) == 5
    # With gradients recorded for the prompts in eval mode, features are fresh (and differentiable), never cached.
    assert model.text_features().requires_grad


def _deep_prompt_grads(model: AnomalyCLIPModel, cast_first: bool, weights: torch.Tensor) -> list[torch.Tensor]:
    """Deep-prompt gradients of ``Σ weights · text_features`` with the fp16 cast before or after the expansion.

    Official (``AnomalyCLIP_lib``, ``ResidualAttentionBlock_learnable_token``): the fp32 parameter is expanded to
    the batch of text prompts, *then* ``.half()``; so each prompt's gradient is rounded to fp16, then summed.
    """
    token_embedding = model.backbone.text.embeddings.token_embedding
    normal, abnormal = model.templates
    prompts = [p.detach().clone().requires_grad_(True) for p in model.deep_prompts]
    embeddings = torch.cat(
        [normal.embed(token_embedding, model.ctx_normal.detach()), abnormal.embed(token_embedding, model.ctx_abnormal)]
    ).detach()
    deep = {}
    for index, prompt in enumerate(prompts, start=1):
        if cast_first:
            deep[index] = prompt.half().float()  # shared [n, W]: expanded inside the tower, after the cast
        else:
            deep[index] = prompt.unsqueeze(0).expand(2, -1, -1).half().float()
    eot = torch.cat([normal.eot(), abnormal.eot()])
    features = F.normalize(model.backbone.encode_prompt_embeddings(embeddings, eot, deep_prompts=deep), dim=-1)
    (features * weights).sum().backward()
    return [p.grad for p in prompts]


def test_deep_prompt_gradients_are_rounded_per_prompt_like_the_official_code() -> None:
    """Issue 15 (6a): zsad cast before expanding, rounding the *summed* gradient (~5e-4 relative off)."""
    model = make_model()
    model.train()
    weights = torch.randn(2, model.backbone.embed_dim, generator=torch.Generator().manual_seed(0)) * 1e3
    (model.text_features() * weights).sum().backward()
    ours = [p.grad for p in model.deep_prompts]
    official = _deep_prompt_grads(model, cast_first=False, weights=weights)
    cast_first = _deep_prompt_grads(model, cast_first=True, weights=weights)
    for a, b in zip(ours, official, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # The comparison can fail: the other order really gives other gradients.
    worst = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(cast_first, official, strict=True))
    assert worst > 1e-5
