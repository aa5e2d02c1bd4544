"""The shared CLIP backbone: layer taps, projections, position interpolation, loading and counts."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPModel

from zsad.backbone import (
    BackboneWeightsNotFoundError,
    CLIPBackbone,
    PromptTemplate,
    architecture_config,
    create_backbone,
)


@pytest.fixture(scope="module")
def hf_tiny() -> CLIPModel:
    torch.manual_seed(0)
    return CLIPModel(architecture_config("tiny")).eval()


@pytest.fixture(scope="module")
def backbone_from_hf(hf_tiny: CLIPModel) -> CLIPBackbone:
    return CLIPBackbone(
        hf_tiny.vision_model,
        hf_tiny.visual_projection,
        hf_tiny.text_model,
        hf_tiny.text_projection,
        image_size=98,
    )


@pytest.mark.parametrize(("size", "side"), [(336, 24), (518, 37)])
def test_requested_layers_have_the_right_shapes(tiny_backbone: CLIPBackbone, size: int, side: int) -> None:
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = tiny_backbone.encode_image(images, layers=(6, 12, 18, 24))
        raw = tiny_backbone.encode_image(images, layers=(12,), project=False)
    assert out.grid == (side, side)
    assert out.layers == (6, 12, 18, 24)
    assert [tuple(t.shape) for t in out.patch_tokens] == [(2, side * side, 16)] * 4
    assert tuple(out.global_embedding.shape) == (2, 16)
    assert tuple(raw.patch_tokens[0].shape) == (2, side * side, 32)
    assert tuple(raw.class_tokens[0].shape) == (2, 32)


def test_layers_equal_hf_hidden_states(tiny_backbone: CLIPBackbone) -> None:
    """Layer k is HF's hidden_states[k] (1-based), with bicubic interpolation equal to transformers' own."""
    images = torch.randn(1, 3, 98, 98)
    with torch.no_grad():
        ours = tiny_backbone.encode_image(images, layers=(1, 6, 24), project=False)
        ref = tiny_backbone.vision(pixel_values=images, output_hidden_states=True, interpolate_pos_encoding=True)
    for k, tokens, cls in zip(ours.layers, ours.patch_tokens, ours.class_tokens, strict=True):
        torch.testing.assert_close(tokens, ref.hidden_states[k][:, 1:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cls, ref.hidden_states[k][:, 0], atol=1e-5, rtol=1e-5)


def test_projected_final_class_token_equals_get_image_features(
    hf_tiny: CLIPModel, backbone_from_hf: CLIPBackbone
) -> None:
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        expected = hf_tiny.get_image_features(pixel_values=images)
        expected = getattr(expected, "pooler_output", expected)
        out = backbone_from_hf.encode_image(images, layers=(24,), project=False)
        via_tokens = backbone_from_hf.project(out.class_tokens[0])
    torch.testing.assert_close(out.global_embedding, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(via_tokens, expected, atol=1e-5, rtol=1e-5)


def test_global_without_ln_post_is_the_anomalyclip_feature(backbone_from_hf: CLIPBackbone) -> None:
    images = torch.randn(1, 3, 98, 98)
    with torch.no_grad():
        out = backbone_from_hf.encode_image(images, layers=(24,), project=False, global_ln_post=False)
        expected = backbone_from_hf.visual_projection(out.class_tokens[0])
        with_ln = backbone_from_hf.encode_image(images, layers=(24,)).global_embedding
    torch.testing.assert_close(out.global_embedding, expected)
    assert not torch.allclose(out.global_embedding, with_ln)


def test_bilinear_and_bicubic_interpolation_both_work_and_differ() -> None:
    bicubic = create_backbone("tiny", image_size=98, pos_interpolation="bicubic", load_text=False)
    bilinear = create_backbone("tiny", image_size=98, pos_interpolation="bilinear", load_text=False)
    # Same seed → same weights: only the position table's resize differs.
    torch.testing.assert_close(bicubic.vision.embeddings.position_embedding.weight,
                               bilinear.vision.embeddings.position_embedding.weight)
    table_cubic = bicubic.position_embeddings((7, 7))
    table_linear = bilinear.position_embeddings((7, 7))
    assert table_cubic.shape == table_linear.shape == (50, 32)
    torch.testing.assert_close(table_cubic[0], table_linear[0])  # class row kept
    assert (table_cubic - table_linear).abs().max() > 1e-3
    images = torch.randn(1, 3, 98, 98)
    with torch.no_grad():
        a = bicubic.encode_image(images, layers=(24,)).patch_tokens[0]
        b = bilinear.encode_image(images, layers=(24,)).patch_tokens[0]
    assert (a - b).abs().max() > 1e-4
    # At the native size no interpolation happens: the two agree.
    native = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(bicubic.encode_image(native, layers=(24,)).patch_tokens[0],
                                   bilinear.encode_image(native, layers=(24,)).patch_tokens[0])
    with pytest.raises(ValueError, match="pos_interpolation"):
        create_backbone("tiny", pos_interpolation="nearest")


def test_antialiased_position_table_is_april_gans_and_recorded_in_the_identity() -> None:
    """``pos_antialias=True``: open_clip's resize at load (bicubic, antialias, align_corners=False), CLS row kept."""
    plain = create_backbone("tiny", image_size=98, load_text=False)
    antialiased = create_backbone("tiny", image_size=98, load_text=False, pos_antialias=True)
    table = antialiased.vision.embeddings.position_embedding.weight
    grid = table[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(7, 7), mode="bicubic", align_corners=False, antialias=True)
    expected = torch.cat([table[:1], expected.permute(0, 2, 3, 1).reshape(49, -1)])
    torch.testing.assert_close(antialiased.position_embeddings((7, 7)), expected)
    assert (plain.position_embeddings((7, 7)) - expected).abs().max() > 1e-3  # not transformers' plain bicubic
    assert antialiased.identity()["pos_antialias"] is True
    assert "pos_antialias" not in plain.identity()  # identities recorded before the option stay valid


def test_vision_only_load_holds_no_text_parameters() -> None:
    vision_only = create_backbone("tiny", load_text=False)
    names = [name for name, _ in vision_only.named_parameters()]
    assert vision_only.text is None and vision_only.text_projection is None
    assert not any(name.startswith(("text", "text_projection")) for name in names)
    full = create_backbone("tiny")
    assert sum(p.numel() for p in full.parameters()) > sum(p.numel() for p in vision_only.parameters()) + 1_000_000
    with pytest.raises(RuntimeError, match="load_text=True"):
        vision_only.encode_text(["a photo of an object."])


def test_backbone_is_frozen_and_stays_in_eval_mode(tiny_backbone: CLIPBackbone) -> None:
    assert not any(p.requires_grad for p in tiny_backbone.parameters())
    wrapper = torch.nn.Sequential(tiny_backbone)
    wrapper.train()
    assert not tiny_backbone.training


def test_hidden_act_can_be_switched_to_exact_gelu() -> None:
    quick = create_backbone("tiny", load_text=False)
    gelu = create_backbone("tiny", load_text=False, hidden_act="gelu")
    assert quick.vision.config.hidden_act == "quick_gelu"
    assert gelu.vision.config.hidden_act == "gelu"
    images = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert not torch.allclose(quick.encode_image(images).global_embedding,
                                  gelu.encode_image(images).global_embedding)


def test_layer_numbers_are_validated(tiny_backbone: CLIPBackbone) -> None:
    with pytest.raises(ValueError, match="1-based"):
        tiny_backbone.encode_image(torch.randn(1, 3, 56, 56), layers=(0,))
    with pytest.raises(ValueError, match="1-based"):
        tiny_backbone.encode_image(torch.randn(1, 3, 56, 56), layers=(25,))


def test_stop_at_last_requested_layer_gives_the_same_tokens(tiny_backbone: CLIPBackbone) -> None:
    images = torch.randn(1, 3, 98, 98)
    with torch.no_grad():
        full = tiny_backbone.encode_image(images, layers=(9,), project=False)
        early = tiny_backbone.encode_image(images, layers=(9,), project=False, stop_at_last_requested=True)
    torch.testing.assert_close(full.patch_tokens[0], early.patch_tokens[0])


def test_fixed_prompts_are_encoded_once_and_equal_hf(hf_tiny: CLIPModel, backbone_from_hf: CLIPBackbone) -> None:
    prompts = ["a photo of a flawless object.", "a photo of a damaged object."]
    ids = backbone_from_hf.tokenizer(prompts)
    with torch.no_grad():
        expected = hf_tiny.get_text_features(input_ids=ids)
        expected = getattr(expected, "pooler_output", expected)
    first = backbone_from_hf.encode_text(prompts)
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=1e-5)
    assert backbone_from_hf.encode_text(prompts) is first  # cached, not recomputed


def test_learnable_context_set_to_real_embeddings_equals_the_text_forward(tiny_backbone: CLIPBackbone) -> None:
    """The manual text loop keeps the causal mask: context vectors = the words' embeddings give the same feature."""
    template = PromptTemplate("{} damaged object.", 4, tiny_backbone.tokenizer)
    words = tiny_backbone.tokenizer.encode("a photo of a")
    assert len(words) == 4
    ctx = tiny_backbone.text.embeddings.token_embedding(torch.tensor(words)).detach().requires_grad_(True)
    embeds = template.embed(tiny_backbone.text.embeddings.token_embedding, ctx)
    feature = tiny_backbone.encode_prompt_embeddings(embeds, template.eot())
    expected = tiny_backbone.encode_text(["a photo of a damaged object."])
    torch.testing.assert_close(feature, expected, atol=1e-5, rtol=1e-5)
    feature.sum().backward()  # gradients reach the learnable vectors through the frozen tower
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0


def test_deep_prompts_replace_hidden_positions(tiny_backbone: CLIPBackbone) -> None:
    ids = tiny_backbone.tokenizer(["x x x x x object."])
    embeds = tiny_backbone.text.embeddings.token_embedding(ids)
    eot = ids.argmax(-1)
    with torch.no_grad():
        plain = tiny_backbone.encode_prompt_embeddings(embeds, eot)
        deep = tiny_backbone.encode_prompt_embeddings(embeds, eot, deep_prompts={1: torch.randn(4, 32)})
        late = tiny_backbone.encode_prompt_embeddings(embeds, eot, deep_prompts={11: torch.zeros(4, 32)})
    assert not torch.allclose(plain, deep)
    assert not torch.allclose(plain, late)


def test_missing_weights_offline_give_the_documented_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(BackboneWeightsNotFoundError) as info:
        create_backbone("openai/clip-vit-large-patch14-336", weights="pretrained", load_text=False)
    message = str(info.value)
    assert "huggingface-cli download openai/clip-vit-large-patch14-336" in message
    assert "--model.backbone=" in message and "weights=random" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no traceback soup


def test_local_directory_round_trip(tmp_path, hf_tiny: CLIPModel) -> None:
    hf_tiny.save_pretrained(tmp_path / "clip")
    loaded = create_backbone(str(tmp_path / "clip"), image_size=98)
    assert loaded.weights == "pretrained"
    images = torch.randn(1, 3, 98, 98)
    reference = CLIPBackbone(hf_tiny.vision_model, hf_tiny.visual_projection, image_size=98)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images).global_embedding,
                                   reference.encode_image(images).global_embedding)


def test_vit_l_14_336_random_architecture_has_the_seed_parameter_count() -> None:
    big = create_backbone("openai/clip-vit-large-patch14-336", weights="random", load_text=False)
    assert sum(p.numel() for p in big.parameters()) == 304_293_888
    assert big.weights == "random" and big.num_layers == 24 and big.embed_dim == 768


def test_unknown_architecture_is_rejected() -> None:
    with pytest.raises(KeyError, match="Unknown CLIP architecture"):
        create_backbone("no-such-clip", weights="random")


def test_tensor_state_cache_recomputes_only_after_a_change() -> None:
    from zsad.backbone import TensorStateCache

    cache, calls = TensorStateCache(), []
    weight = torch.nn.Parameter(torch.ones(3))

    def compute() -> torch.Tensor:
        calls.append(1)
        return weight * 2

    first = cache.get([weight], compute)
    assert cache.get([weight], compute) is first and len(calls) == 1
    assert not first.requires_grad  # computed without autograd
    with torch.no_grad():
        weight.add_(1.0)  # what an optimiser step does
    torch.testing.assert_close(cache.get([weight], compute), torch.full((3,), 4.0))
    assert len(calls) == 2
    cache.clear()
    cache.get([weight], compute)
    assert len(calls) == 3
