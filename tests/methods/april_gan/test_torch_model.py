"""APRIL-GAN's torch model against an independent re-computation of the official formulas (tiny CLIP).

The reference rebuilds what the official open_clip code does with plain transformers modules: a vision model whose
position table was resized once, bicubically *with antialias*, to the 7x7 grid (open_clip at load), exact GELU,
the official 7 + 5 states x 35 templates typed out here, normalise-mean-normalise per state, per-layer
``softmax(bilinear_align_corners(100 F T))`` summed without smoothing, and the frozen CLIP embedding's probability as
the image score.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from transformers import CLIPVisionConfig, CLIPVisionModel

from zsad.backbone import create_backbone
from zsad.backbone.ensembles import APRIL_GAN
from zsad.methods.april_gan import DEFAULT_CLASS_WORD, APRILGANModel

SIZE = 98
LAYERS = (6, 12, 18, 24)

# The official prompt_ensemble.py (ByChelsea/VAND-APRIL-GAN), typed out independently of zsad's list.
OFFICIAL_NORMAL = [
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
]
OFFICIAL_ABNORMAL = ["damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"]
OFFICIAL_TEMPLATES = [
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a photo of my {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a photo of one {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of a large {}.",
    "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "a dark photo of a {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
]


def make_model(antialias: bool = True, hidden_act: str = "gelu", **kwargs) -> APRILGANModel:
    backbone = create_backbone(
        "tiny", weights="random", image_size=SIZE, pos_antialias=antialias, hidden_act=hidden_act
    )
    torch.manual_seed(0)
    model = APRILGANModel(backbone, layers=LAYERS, **kwargs)
    with torch.no_grad():  # away from the default init so that every head matters
        for head in model.heads:
            head.bias.normal_(std=0.5)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> APRILGANModel:
    return make_model(class_words={"nunozumi": "concrete block"})


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------------------------------------------------------------
# Independent reference
# ---------------------------------------------------------------------------------------------------------------------


def official_vision(backbone) -> CLIPVisionModel:  # noqa: ANN001
    """A transformers vision model at the 7x7 grid whose position table was resized at load like open_clip's."""
    state = backbone.vision.state_dict()
    (key,) = [k for k in state if k.endswith("embeddings.position_embedding.weight")]
    table = state[key]
    side = int(round((table.shape[0] - 1) ** 0.5))
    grid = SIZE // backbone.patch_size
    patches = table[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    state[key] = torch.cat([table[:1], patches.permute(0, 2, 3, 1).reshape(grid * grid, -1)])
    config = CLIPVisionConfig(**{**backbone.vision.config.to_dict(), "image_size": SIZE, "hidden_act": "gelu"})
    vision = CLIPVisionModel(config).eval()
    missing, unexpected = vision.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    return vision


def official_text(backbone, word: str) -> torch.Tensor:  # noqa: ANN001
    """``[E, 2]``: per state, encode the 35 templates x states, normalise, mean, normalise."""
    columns = []
    for states in (OFFICIAL_NORMAL, OFFICIAL_ABNORMAL):
        sentences = [template.format(state.format(word)) for state in states for template in OFFICIAL_TEMPLATES]
        ids = backbone.tokenizer(sentences)
        with torch.no_grad():
            hidden = backbone.text(input_ids=ids).last_hidden_state
            pooled = backbone.text_projection(hidden[torch.arange(len(ids)), ids.argmax(dim=-1)])
        pooled = pooled / pooled.norm(dim=-1, keepdim=True)
        mean = pooled.mean(dim=0)
        columns.append(mean / mean.norm())
    return torch.stack(columns, dim=1)


def official_forward(model: APRILGANModel, images: torch.Tensor, words: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and maps as the official test.py computes them (each image with its own class text)."""
    backbone = model.backbone
    vision = official_vision(backbone)
    with torch.no_grad():
        out = vision(pixel_values=images, output_hidden_states=True)
        image_features = backbone.visual_projection(out.pooler_output)  # proj(ln_post(cls))
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        scores, maps = [], []
        for b, word in enumerate(words):
            text = official_text(backbone, word)
            scores.append((100.0 * image_features[b] @ text).softmax(dim=-1)[1])
            total = torch.zeros(SIZE, SIZE)
            for index, layer in enumerate(LAYERS):
                tokens = out.hidden_states[layer][b : b + 1, 1:]  # raw residual stream, CLS dropped
                head = model.heads[index]
                tokens = tokens @ head.weight.T + head.bias
                tokens = tokens / tokens.norm(dim=-1, keepdim=True)
                logits = 100.0 * tokens @ text  # [1, N, 2]
                side = int(logits.shape[1] ** 0.5)
                logits = logits.permute(0, 2, 1).reshape(1, 2, side, side)
                logits = F.interpolate(logits, size=SIZE, mode="bilinear", align_corners=True)
                total = total + logits.softmax(dim=1)[0, 1]
            maps.append(total)
    return torch.stack(scores), torch.stack(maps)


# ---------------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------------


def test_ensemble_is_the_official_one() -> None:
    normal, abnormal = APRIL_GAN.sentences("metal_nut")
    assert len(normal) == 245 and len(abnormal) == 175
    assert normal == [t.format(s.format("metal_nut")) for s in OFFICIAL_NORMAL for t in OFFICIAL_TEMPLATES]
    assert abnormal == [t.format(s.format("metal_nut")) for s in OFFICIAL_ABNORMAL for t in OFFICIAL_TEMPLATES]


def test_maps_and_scores_equal_the_official_formulas(model: APRILGANModel, images: torch.Tensor) -> None:
    categories = ["metal_nut", "nunozumi", "metal_nut"]  # a mixed batch; Gogan's category uses its class word
    with torch.no_grad():
        out = model(images, categories=categories)
    scores, maps = official_forward(model, images, ["metal_nut", "concrete block", "metal_nut"])
    assert out.anomaly_map.dtype == torch.float32 and out.anomaly_map.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(out.pred_score, scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.anomaly_map, maps, atol=1e-5, rtol=1e-5)
    assert float(out.anomaly_map.max()) <= len(LAYERS) + 1e-6  # a sum of 4 probabilities, never smoothed
    # The image score is plain CLIP's: the heads do not enter it.
    with torch.no_grad():
        for head in model.heads:
            head.weight.add_(1.0)
        moved = model(images, categories=categories)
        for head in model.heads:
            head.weight.sub_(1.0)
    torch.testing.assert_close(moved.pred_score, out.pred_score)
    assert not torch.allclose(moved.anomaly_map, out.anomaly_map)


def test_official_options_change_the_features(images: torch.Tensor) -> None:
    """Exact GELU and the antialiased position table are not cosmetic: either alternative moves the maps."""
    official = make_model()
    assert official.backbone.vision.config.hidden_act == "gelu" and official.backbone.text.config.hidden_act == "gelu"
    with torch.no_grad():
        reference = official(images).anomaly_map
        for other in (make_model(antialias=False), make_model(hidden_act="quick_gelu")):
            assert (other(images).anomaly_map - reference).abs().max() > 1e-3


def test_text_is_encoded_once_per_class_word(monkeypatch: pytest.MonkeyPatch, images: torch.Tensor) -> None:
    model = make_model(class_words={"nunozumi": "concrete block", "tanizumi": "concrete block"})
    calls: list[int] = []
    original = model.backbone.encode_prompt_embeddings

    def counted(embeddings, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(embeddings.shape[0])
        return original(embeddings, *args, **kwargs)

    monkeypatch.setattr(model.backbone, "encode_prompt_embeddings", counted)
    features = model.encode(images)
    for categories in (["bottle", "nunozumi", "bottle"], ["tanizumi", "bottle", "nunozumi"], None, None):
        model.forward_features(features, (SIZE, SIZE), categories)
    # bottle, concrete block (nunozumi = tanizumi), and the default word: one call of 245 + 175 sentences each.
    assert calls == [420, 420, 420]
    assert sorted(model._text) == sorted(["bottle", "concrete block", DEFAULT_CLASS_WORD])  # noqa: SLF001
    with torch.inference_mode():  # a validation loop before training: the cached text is an inference tensor
        model.forward_features(features, (SIZE, SIZE), ["widget"] * 3)
    model.train()  # training reuses the same cache (text does not depend on the heads) and can backpropagate
    out = model.forward_features(features, (SIZE, SIZE), ["bottle", "widget", "widget"])
    out["anomaly_map"].sum().backward()
    assert len(calls) == 4 and out["maps"].shape == (3, len(LAYERS), 2, SIZE, SIZE)
    assert all(head.weight.grad is not None for head in model.heads)


def test_bad_inputs_are_refused(model: APRILGANModel, images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="2 categories for a batch of 3"):
        model(images, categories=["a", "b"])
    with pytest.raises(ValueError, match="grid"):
        model.forward_features(model.encode(images), (SIZE + 14, SIZE))
    with pytest.raises(ValueError, match=r"1\.\.24"):
        APRILGANModel(model.backbone, layers=(6, 25))
