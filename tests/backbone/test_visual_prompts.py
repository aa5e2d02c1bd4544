"""Deep visual prompts through the frozen vision tower, and text layers started after block 0 (tiny CLIP)."""

from __future__ import annotations

import pytest
import torch

from zsad.backbone import create_backbone, encode_image_with_prompts, run_text_layers, run_text_tower
from zsad.backbone.prompts import causal_mask


@pytest.fixture(scope="module")
def backbone():  # noqa: ANN201
    return create_backbone("tiny", weights="random", image_size=98)


def test_prompted_pass_shapes_and_effect(backbone) -> None:  # noqa: ANN001
    images = torch.randn(2, 3, 98, 98, generator=torch.Generator().manual_seed(0))
    plain = backbone.encode_image(images, layers=(6, 24), project=False)
    prompts = [torch.randn(2, 3, backbone.width, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        out = encode_image_with_prompts(backbone, images, prompts, layers=(6, 24))
    assert [t.shape for t in out.patch_tokens] == [t.shape for t in plain.patch_tokens]  # prompt tokens left out
    assert out.global_embedding.shape == plain.global_embedding.shape
    assert (out.patch_tokens[1] - plain.patch_tokens[1]).abs().max() > 1e-3  # prompts reach the patch tokens
    # A prompt replaced at block 3 changes the result; one shared [n, W] tensor equals its per-image expansion.
    changed = [*prompts[:3], torch.randn(2, 3, backbone.width, generator=torch.Generator().manual_seed(9))]
    with torch.no_grad():
        other = encode_image_with_prompts(backbone, images, changed, layers=(24,))
        shared = encode_image_with_prompts(backbone, images[:1], [p[0] for p in prompts], layers=(24,))
    assert (other.patch_tokens[0] - out.patch_tokens[1]).abs().max() > 1e-4
    torch.testing.assert_close(shared.patch_tokens[0], out.patch_tokens[1][:1], atol=1e-5, rtol=1e-5)


def test_prompted_pass_rejects_bad_prompts(backbone) -> None:  # noqa: ANN001
    images = torch.zeros(1, 3, 98, 98)
    with pytest.raises(ValueError, match="at least one prompt"):
        encode_image_with_prompts(backbone, images, [])
    with pytest.raises(ValueError, match="same length"):
        encode_image_with_prompts(backbone, images, [torch.zeros(2, backbone.width), torch.zeros(3, backbone.width)])


def test_text_layers_from_block_one_equal_the_whole_tower(backbone) -> None:  # noqa: ANN001
    ids = backbone.tokenizer(["a bad photo of a bottle.", "a cropped photo of the damaged bottle."])[:, :12]
    text = backbone.text
    eot = ids.argmax(-1)
    embeds = text.embeddings.token_embedding(ids)
    deep = {1: torch.randn(2, 5, backbone.text_width, generator=torch.Generator().manual_seed(3))}
    with torch.no_grad():
        whole = run_text_tower(text, backbone.text_projection, embeds, eot, deep_prompts=deep)
        h = embeds + text.embeddings.position_embedding.weight[:12]
        h = text.encoder.layers[0](h, causal_mask(12, h.dtype, h.device))
        resumed = run_text_layers(text, backbone.text_projection, h, eot, start=1, deep_prompts=deep)
        shared = run_text_tower(text, backbone.text_projection, embeds[:1], eot[:1], deep_prompts={1: deep[1][0]})
    torch.testing.assert_close(resumed, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared, whole[:1], atol=1e-5, rtol=1e-5)
