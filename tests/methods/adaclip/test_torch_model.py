"""AdaCLIP's torch model against an independent re-computation of the official formulas (tiny CLIP)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from scipy.ndimage import gaussian_filter

from zsad.backbone.ensembles import ADACLIP
from zsad.methods.adaclip import AdaCLIP, AdaCLIPModel, adaclip_class_word, kmeans

SIZE = 98
CATEGORIES = ["metal_nut", "pipe-fryum", "metal_nut"]


@pytest.fixture(scope="module")
def module() -> AdaCLIP:
    torch.manual_seed(0)
    model = AdaCLIP(backbone="tiny", weights="random", image_size=SIZE, evaluator=False)
    with torch.no_grad():  # non-trivial static prompts (the default N(0, 0.02²) barely moves a random tower)
        for p in [*model.model.visual_static, *model.model.text_static]:
            p.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


# ---------------------------------------------------------------------------------------------------------------------
# Independent re-computation, written like the official AdaCLIP forward (caoyunkang/AdaCLIP method/adaclip.py)
# ---------------------------------------------------------------------------------------------------------------------


def official_visual(model: AdaCLIPModel, image: torch.Tensor, dyn: torch.Tensor) -> tuple:
    """Prompted vision pass over the HF submodules: append at block 0, replace the last n at blocks 1..J-1."""
    vision = model.backbone.vision
    n = model.prompt_length
    patches = vision.embeddings.patch_embedding(image).flatten(2).transpose(1, 2)
    side = int(patches.shape[1] ** 0.5)
    table = vision.embeddings.position_embedding.weight
    native = int((table.shape[0] - 1) ** 0.5)
    grid = table[1:].reshape(1, native, native, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)  # open_clip, no antialias
    pos = torch.cat([table[:1], grid.permute(0, 2, 3, 1).reshape(side * side, -1)])
    x = torch.cat([vision.embeddings.class_embedding.view(1, 1, -1), patches], dim=1) + pos
    x = vision.pre_layrnorm(x)
    taps = []
    for indx, block in enumerate(vision.encoder.layers):
        if indx < model.prompt_depth:
            ctx = (dyn + model.visual_static[indx]).half().float()
            x = torch.cat([x, ctx], dim=1) if indx == 0 else torch.cat([x[:, :-n], ctx], dim=1)
        x = block(x, None)
        if indx + 1 in model.layers:
            taps.append(x[:, :-n])
    pooled = model.backbone.visual_projection(vision.post_layernorm(x[:, 0]))
    return pooled, taps


def official_text(model: AdaCLIPModel, category: str, dyn: torch.Tensor) -> torch.Tensor:
    """[E, 2] text features: 77-token sentences, positions 1..n overwritten before text blocks 1..J-1."""
    text = model.backbone.text
    name = category.replace("-", " ")
    features = []
    for states in (ADACLIP.normal_states, ADACLIP.abnormal_states):
        sentences = [t.format(s.format(name)) for s in states for t in ADACLIP.templates]
        ids = model.backbone.tokenizer(sentences)
        x = text.embeddings.token_embedding(ids) + text.embeddings.position_embedding.weight[:77]
        mask = torch.full((77, 77), float("-inf")).triu(1)[None, None]
        for indx, block in enumerate(text.encoder.layers):
            if 0 < indx < model.prompt_depth:
                ctx = (dyn + model.text_static[indx]).expand(len(sentences), -1, -1).half().float()
                x = torch.cat([x[:, :1], ctx, x[:, 1 + model.prompt_length :]], dim=1)
            x = block(x, mask)
        x = text.final_layer_norm(x)[torch.arange(len(sentences)), ids.argmax(-1)]
        emb = model.backbone.text_projection(x)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mean = emb.mean(0)
        features.append(mean / mean.norm())
    return torch.stack(features, dim=1)


def official_forward(model: AdaCLIPModel, image: torch.Tensor, category: str) -> tuple[float, np.ndarray]:
    """Score and smoothed map of one image (batch 1, like the official test)."""
    unprompted = model.backbone.vision(image, interpolate_pos_encoding=True)  # frozen HF forward (bicubic table)
    e = model.backbone.visual_projection(unprompted.pooler_output)
    dyn_v = torch.stack([h(e) for h in model.visual_dynamic], dim=1)
    dyn_t = torch.stack([h(e) for h in model.text_dynamic], dim=1)
    pooled, taps = official_visual(model, image, dyn_v)
    text = official_text(model, category, dyn_t)  # [E, 2]
    tokens = [F.normalize(h(t[:, 1:]), dim=-1) for h, t in zip(model.patch_heads, taps, strict=True)]
    cls = F.normalize(model.global_head(pooled), dim=-1)
    maps = [100.0 * t @ text for t in tokens]  # [1, N, 2] logits
    # HSF (code version): top-100 of softmax(mean logits)[abn]; k-means on the 4-layer concatenation; the centre of a
    # cluster = mean of its tokens over all layers; mean of the centres; L2.
    prob = torch.softmax(torch.stack(maps, 1).mean(1), dim=2)[:, :, 1]
    top = prob.topk(min(prob.shape[1], 100), dim=1).indices
    chosen = [t.gather(1, top.unsqueeze(-1).expand(-1, -1, t.shape[-1])) for t in tokens]
    stacked = torch.cat(chosen, dim=2)[0]
    if model.kmeans_backend == "sklearn":  # the official call, seeded
        from sklearn.cluster import KMeans

        clusters = KMeans(n_clusters=20, n_init="auto", random_state=model.kmeans_seed).fit_predict(stacked.numpy())
        labels = torch.as_tensor(clusters)
    else:
        labels = kmeans(stacked, 20, seed=model.kmeans_seed)
    centres = [torch.cat([c[0][labels == k] for c in chosen]).mean(0) for k in range(20)]
    hsf = F.normalize(torch.stack(centres).mean(0, keepdim=True), dim=1)
    feature = F.normalize(0.2 * hsf + 0.8 * cls, dim=1)
    score = torch.softmax(100.0 * feature @ text, dim=1)[0, 1]
    side = int(tokens[0].shape[1] ** 0.5)
    up = [
        F.interpolate(m.permute(0, 2, 1).view(1, 2, side, side), SIZE, mode="bilinear", align_corners=True)
        for m in maps
    ]
    prob_map = torch.softmax(torch.stack(up, 1).mean(1), dim=1)
    amap = ((prob_map[:, 1] + 1 - prob_map[:, 0]) / 2)[0].numpy()
    return float(score), gaussian_filter(amap, sigma=4)


# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_scores_and_maps_equal_the_official_formulas(module: AdaCLIP, images: torch.Tensor, backend: str) -> None:
    module.model.kmeans_backend = backend
    with torch.no_grad():
        out = module.model(images, CATEGORIES)
        for i, category in enumerate(CATEGORIES):
            score, amap = official_forward(module.model, images[i : i + 1], category)
            assert abs(float(out.pred_score[i]) - score) < 1e-5
            np.testing.assert_allclose(out.anomaly_map[i].numpy(), amap, atol=1e-5)
    module.model.kmeans_backend = "torch"
    assert out.pred_score.std() > 0  # not vacuous: the scores differ between images
    assert float(out.anomaly_map.max() - out.anomaly_map.min()) > 1e-3


def test_batch_gives_the_scores_of_batch_one(module: AdaCLIP, images: torch.Tensor) -> None:
    with torch.no_grad():
        batched = module.model(images, CATEGORIES)
        single = [module.model(images[i : i + 1], [c]) for i, c in enumerate(CATEGORIES)]
    torch.testing.assert_close(batched.pred_score, torch.cat([s.pred_score for s in single]), atol=1e-5, rtol=0)
    # Maps are logits × 100 through a softmax: batched vs single matmuls differ by float rounding only.
    torch.testing.assert_close(batched.anomaly_map, torch.cat([s.anomaly_map for s in single]), atol=1e-4, rtol=0)


def test_fixed_text_work_is_done_once_per_class(module: AdaCLIP, images: torch.Tensor) -> None:
    """Text block 0 (no prompt reaches it) runs once per class per run; the prompted blocks once per batch."""
    layers = module.model.backbone.text.encoder.layers
    calls = {0: 0, 1: 0}
    hooks = [layers[i].register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1)) for i in (0, 1)]
    module.model.clear_text_cache()
    try:
        with torch.no_grad():
            for _ in range(3):
                module.model(images, CATEGORIES)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {0: 2, 1: 3}  # two classes; one text-tower call per batch of three images


def test_class_words() -> None:
    assert adaclip_class_word("pipe-fryum") == "pipe fryum"  # the official '-' → space
    assert adaclip_class_word("metal_nut") == "metal_nut"
    assert adaclip_class_word("nunozumi") == "concrete block"  # Gogan default
    assert adaclip_class_word("nunozumi", {"nunozumi": "wall"}) == "wall"


def test_kmeans_is_seeded_and_finds_separated_clusters() -> None:
    from sklearn.cluster import KMeans

    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(20, 12, generator=gen) * 20
    points = centres.repeat_interleave(5, 0) + 0.1 * torch.randn(100, 12, generator=gen)
    labels = kmeans(points, 20, seed=3)
    assert torch.equal(labels, kmeans(points, 20, seed=3))
    assert torch.bincount(labels, minlength=20).min() > 0
    reference = KMeans(n_clusters=20, n_init="auto", random_state=0).fit_predict(points.numpy())
    # Same partition as sklearn up to label names: every sklearn cluster maps to exactly one of ours.
    pairs = {(int(a), int(b)) for a, b in zip(labels, reference, strict=True)}
    assert len(pairs) == 20


def test_trainable_parameters_follow_the_official_layout(module: AdaCLIP) -> None:
    model = module.model
    w, tw, e = model.backbone.width, model.backbone.text_width, model.backbone.embed_dim
    expected = 4 * 5 * tw + 4 * 5 * w + 5 * (e * w + w) + 5 * (e * tw + tw) + 4 * (w * e + e) + (e * e + e)
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == expected
