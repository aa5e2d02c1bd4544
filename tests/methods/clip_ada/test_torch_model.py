"""CLIP-ADA torch model: parameter counts, prompt, refinement, loss and inference against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from scipy.ndimage import gaussian_filter

from zsad.backbone import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, create_backbone
from zsad.methods.clip_ada import CLIPADA, CLIPADALoss, CLIPADAModel, expected_trainable_parameters

MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)


def trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def images(n: int = 2, size: int = 98, seed: int = 0) -> torch.Tensor:
    rgb = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return (rgb - MEAN) / STD


# -- parameter counts ------------------------------------------------------------------------------------------------

# Paper Table 6 (ViT-B/16: 4x512 prompt + Linear(768->512) per pass) and the ViT-L/14@336 port (4x768 +
# Linear(1024->768) per pass), written out by hand.
PAPER_COUNTS = {
    "openai/clip-vit-base-patch16": {0: 4 * 512 + 1 * (768 * 512 + 512), 1: 789_504, 2: 1_183_232},
    "openai/clip-vit-large-patch14-336": {0: 4 * 768 + 1 * (1024 * 768 + 768), 1: 1_577_472, 2: 2_364_672},
}


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_trainable_parameters_match_the_paper_table_at_real_sizes(name: str) -> None:
    assert PAPER_COUNTS["openai/clip-vit-base-patch16"][0] == 395_776
    # The real architectures, built on the meta device (no memory, no random init): only the structure counts.
    with torch.device("meta"):
        backbone = create_backbone(name, weights="random")
        for refinements, count in PAPER_COUNTS[name].items():
            model = CLIPADAModel(backbone, layer=9, num_refinements=refinements)
            assert trainable(model) == count
            assert len(model.projections) == refinements + 1
            # One projection per pass, not shared.
            assert len({id(p.weight) for p in model.projections}) == refinements + 1
        fixed = CLIPADAModel(backbone, layer=9, num_refinements=1, prompt="fixed")
        assert trainable(fixed) == PAPER_COUNTS[name][1] - 4 * backbone.text_width


def test_lightning_model_counts_on_the_tiny_backbone() -> None:
    for refinements in (0, 1, 2):
        model = CLIPADA(backbone="tiny", weights="random", image_size=98, num_refinements=refinements, evaluator=False)
        assert trainable(model) == 4 * 32 + (refinements + 1) * (32 * 16 + 16)
        assert trainable(model) == expected_trainable_parameters(32, 16, 32, refinements)
        # The frozen CLIP is not in the checkpoint; the prompt and the projections are.
        state = model.trainable_state_dict()
        assert sum(v.numel() for v in state.values()) == trainable(model)


# -- prompt ----------------------------------------------------------------------------------------------------------


def test_learnable_vectors_take_the_place_of_the_class_name(tiny_backbone) -> None:
    """With the vectors set to the word embeddings of a 4-token class name, the learnable prompt must equal the
    hand-written sentence encoded by the frozen text tower: the vectors sit exactly where [CLS] was."""
    model = CLIPADAModel(tiny_backbone, num_refinements=0)
    ids = tiny_backbone.tokenizer.encode("metal nut screw cap")
    assert len(ids) == 4
    with torch.no_grad():
        model.prompt_vectors.copy_(tiny_backbone.text.embeddings.token_embedding.weight[ids])
        expected = tiny_backbone.encode_text(["A photo of a metal nut screw cap with defects for anomaly detection."])
        torch.testing.assert_close(model.text_feature(), expected[0], atol=1e-5, rtol=1e-5)
        other = tiny_backbone.encode_text(["A photo of a metal nut screw cap with defects for detection."])
        assert not torch.allclose(model.text_feature(), other[0], atol=1e-3)


def test_text_feature_is_cached_in_eval_and_refreshed_after_an_update(tiny_backbone) -> None:
    model = CLIPADAModel(tiny_backbone, num_refinements=0)
    with torch.no_grad():
        first = model.text_feature()
        assert model.text_feature() is first  # cached
    # An optimiser step changes the vectors in place: the cache must not serve the old feature.
    optimizer = torch.optim.SGD([model.prompt_vectors], lr=1.0)
    # (A random step: a constant shift of a token vector would be cancelled by the text tower's LayerNorm.)
    model.prompt_vectors.grad = torch.randn(model.prompt_vectors.shape, generator=torch.Generator().manual_seed(0))
    optimizer.step()
    with torch.no_grad():
        updated = model.text_feature()
        fresh = model._encode_prompt()
    assert not torch.allclose(updated, first)
    torch.testing.assert_close(updated, fresh)
    # So must loading a state dict.
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    state["prompt_vectors"] = torch.zeros_like(model.prompt_vectors)
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(model.text_feature(), model._encode_prompt())
    # With gradients on (training) the prompt is encoded on every call and the vectors get a gradient.
    model.text_feature().sum().backward()
    assert model.prompt_vectors.grad is not None
    assert model.prompt_vectors.grad.abs().sum() > 0


# -- visual side -----------------------------------------------------------------------------------------------------


def test_tokens_come_from_the_chosen_layer(tiny_backbone) -> None:
    """Reference: transformers' own hidden_states[k] (native 56 px: no position interpolation involved)."""
    x = images(1, 56)
    for layer, ln_post in ((6, False), (18, False), (18, True)):
        model = CLIPADAModel(tiny_backbone, layer=layer, ln_post=ln_post, num_refinements=0)
        with torch.no_grad():
            reference = tiny_backbone.vision(pixel_values=x, output_hidden_states=True).hidden_states[layer][:, 1:]
            if ln_post:
                reference = tiny_backbone.vision.post_layernorm(reference)
            torch.testing.assert_close(model.encode(x)["tokens"], reference, atol=1e-5, rtol=1e-4)


# -- refinement ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("space", ["rgb", "normalized"])
def test_refinement_keeps_the_input_only_where_the_coarse_map_is_high(tiny_backbone, space: str) -> None:
    model = CLIPADAModel(tiny_backbone, num_refinements=1, refine_space=space)
    x = images(2)
    coarse = torch.zeros(2, 7, 7)
    coarse[0, 1:3, 2:5] = 1.0  # a high region on image 0; image 1 all low
    coarse[1] = 0.0
    enhanced = model.enhance(x, coarse)
    # Reference attention: the 7x7 map resized bilinearly to the image.
    attention = F.interpolate(coarse[:, None], size=(98, 98), mode="bilinear", align_corners=False)[:, 0]
    high, low = attention == 1.0, attention == 0.0
    assert high[0].sum() > 0 and low[0].sum() > 0
    expand = lambda m: m[:, None].expand_as(x)  # noqa: E731
    # Where the map is 1 the image is untouched ...
    torch.testing.assert_close(enhanced[expand(high)], x[expand(high)], atol=1e-5, rtol=0)
    # ... where it is 0 the image is erased: black in RGB, zero in the normalised tensor.
    erased = enhanced * STD + MEAN if space == "rgb" else enhanced
    assert erased[expand(low)].abs().max() < 1e-5
    # ... and in between it is scaled by the map value.
    rgb_in = x * STD + MEAN if space == "rgb" else x
    torch.testing.assert_close(erased, rgb_in * attention[:, None], atol=1e-5, rtol=1e-5)
    # Changing the image where the map is low does not change what the refinement pass sees.
    perturbed = x + 5.0 * expand(low).float() * torch.randn_like(x)
    torch.testing.assert_close(model.enhance(perturbed, coarse), enhanced)
    # A map of ones changes nothing.
    torch.testing.assert_close(model.enhance(x, torch.ones(2, 7, 7)), x, atol=1e-5, rtol=1e-5)


def test_forward_chains_coarse_map_image_product_and_unshared_projections(tiny_backbone) -> None:
    """Eq. 5 recomputed by hand: pass r projects the tokens of I * up(M_{r-1}) with its own projection."""
    torch.manual_seed(0)
    model = CLIPADAModel(tiny_backbone, layer=6, num_refinements=2).eval()
    x = images(2)
    with torch.no_grad():
        out = model.forward_features(model.encode(x), (98, 98))
        text = F.normalize(model._encode_prompt(), dim=0)
        maps, image = [], x
        for r in range(3):
            tokens = tiny_backbone.encode_image(image, layers=(6,), project=False).patch_tokens[0]
            projected = F.normalize(tokens @ model.projections[r].weight.T + model.projections[r].bias, dim=-1)
            maps.append(torch.sigmoid(projected @ text / 0.07).reshape(2, 7, 7))
            attention = F.interpolate(maps[-1][:, None], size=(98, 98), mode="bilinear", align_corners=False)
            image = ((x * STD + MEAN) * attention - MEAN) / STD  # always the INPUT image times the latest map
    torch.testing.assert_close(out["maps"], torch.stack(maps, dim=1), atol=1e-4, rtol=1e-4)
    final = F.interpolate(maps[-1][:, None], size=(98, 98), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(out["anomaly_map"], final, atol=1e-4, rtol=1e-4)


def test_gradient_flows_through_the_refinement_pass_unless_detached(tiny_backbone) -> None:
    x = images(2)
    mask = torch.zeros(2, 98, 98, dtype=torch.bool)
    mask[:, 10:40, 30:70] = True
    for detach in (False, True):
        torch.manual_seed(0)
        model = CLIPADAModel(tiny_backbone, layer=6, num_refinements=1, detach_coarse=detach).train()
        logits = model(x)["logits"]
        # The refinement term alone: the coarse projection influences it only through the multiplied image.
        CLIPADALoss().pass_loss(logits[:, 1], mask).backward()
        coarse_grad = model.projections[0].weight.grad
        reached = coarse_grad is not None and bool(coarse_grad.abs().sum() > 0)
        assert reached is (not detach)
        assert model.projections[1].weight.grad.abs().sum() > 0


# -- loss ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("refine_weight", [1.0, 0.5])
def test_loss_is_bce_of_the_sigmoid_maps_against_the_area_averaged_mask(refine_weight: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7, 7) * 3
    mask = torch.zeros(2, 98, 98, dtype=torch.bool)
    mask[0, 0:14, 0:7] = True  # half of patch (0, 0)
    mask[1, 14:28, 28:42] = True  # all of patch (1, 2)
    target = np.zeros((2, 7, 7))
    target[0, 0, 0], target[1, 1, 2] = 0.5, 1.0

    def bce(p: np.ndarray, g: np.ndarray) -> float:
        return float(np.mean(-(g * np.log(p) + (1 - g) * np.log(1 - p))))

    p = torch.sigmoid(logits).double().numpy()
    expected = bce(p[:, 0], target) + refine_weight * (bce(p[:, 1], target) + bce(p[:, 2], target))
    out = CLIPADALoss(refine_weight=refine_weight)(logits, mask)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert out["coarse"].item() == pytest.approx(bce(p[:, 0], target), rel=1e-5)
    # "image" resolution: the map upsampled to the mask, binary targets.
    up = F.interpolate(torch.sigmoid(logits[:, :1]), size=(98, 98), mode="bilinear", align_corners=False)[:, 0]
    image_loss = CLIPADALoss(resolution="image").pass_loss(logits[:, 0], mask)
    assert image_loss.item() == pytest.approx(bce(up.double().numpy(), mask.double().numpy()), rel=1e-4)


# -- inference -------------------------------------------------------------------------------------------------------


def test_inference_map_is_the_refined_map_upsampled_and_smoothed_and_score_the_top_k_mean(tiny_backbone) -> None:
    torch.manual_seed(0)
    model = CLIPADAModel(tiny_backbone, layer=6, num_refinements=1, sigma=4.0, top_k=500).eval()
    x = images(2)
    with torch.no_grad():
        out = model(x)
        refined = model.forward_features(model.encode(x), (98, 98))["maps"][:, -1]
    up = F.interpolate(refined[:, None], size=(98, 98), mode="bilinear", align_corners=False)[:, 0].numpy()
    reference = np.stack([gaussian_filter(m.astype(np.float64), sigma=4, mode="reflect") for m in up])
    np.testing.assert_allclose(out.anomaly_map.numpy(), reference, atol=1e-5)
    assert out.anomaly_map.dtype == torch.float32
    scores = [np.sort(m.ravel())[-500:].mean() for m in reference]
    np.testing.assert_allclose(out.pred_score.numpy(), scores, atol=1e-5)
    # K larger than the map: every pixel counts; a fraction option scales K with the map.
    model.top_k = 10**6
    with torch.no_grad():
        np.testing.assert_allclose(model(x).pred_score.numpy(), reference.mean(axis=(1, 2)), atol=1e-5)
    model.top_k_fraction = 0.01
    with torch.no_grad():
        k = round(0.01 * 98 * 98)
        np.testing.assert_allclose(
            model(x).pred_score.numpy(), [np.sort(m.ravel())[-k:].mean() for m in reference], atol=1e-5
        )


def test_rejects_a_backbone_without_text_and_a_layer_out_of_range() -> None:
    vision_only = create_backbone("tiny", weights="random", image_size=98, load_text=False)
    with pytest.raises(ValueError, match="load_text"):
        CLIPADAModel(vision_only)
    text_too = create_backbone("tiny", weights="random", image_size=98)
    with pytest.raises(ValueError, match="1..24"):
        CLIPADAModel(text_too, layer=25)
