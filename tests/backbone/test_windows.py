"""Window embeddings: class token + a window's tokens re-encoded, batched over windows, equal to encoding each window
on its own from the patch embedding (independent recomputation)."""

from __future__ import annotations

import pytest
import torch
from anomalib.models.image.winclip.utils import make_masks

from zsad.backbone.windows import encode_windows, window_coverage, window_indices


@pytest.mark.parametrize(("grid", "kernel", "stride"), [((7, 7), 2, 1), ((7, 7), 3, 1), ((5, 6), 3, 2)])
def test_window_indices_are_anomalibs_masks(grid: tuple[int, int], kernel: int, stride: int) -> None:
    indices = window_indices(grid, kernel, stride)
    assert torch.equal(indices, make_masks(grid, kernel, stride).t().long())
    coverage = window_coverage(grid, kernel, stride)
    assert coverage.shape == (grid[0] * grid[1], indices.shape[0])
    assert int(coverage.sum()) == indices.numel()


def test_window_larger_than_the_grid_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit a 2x2 patch grid"):
        window_indices((2, 2), 3)


def _one_window(backbone, image: torch.Tensor, patches: list[int]) -> torch.Tensor:
    """Independent recomputation: embed, keep CLS + the window's patches (with their positions), then the tower."""
    emb = backbone.vision.embeddings
    x = emb.patch_embedding(image[None]).flatten(2).transpose(1, 2)[0]  # [N, W]
    grid = int(x.shape[0] ** 0.5)
    pos = backbone.position_embeddings((grid, grid))
    seq = torch.cat([emb.class_embedding[None] + pos[:1], x[patches] + pos[1:][patches]])[None]
    h = backbone.vision.pre_layrnorm(seq)
    for layer in backbone.vision.encoder.layers:
        h = layer(h, None)
    return backbone.visual_projection(backbone.vision.post_layernorm(h[:, 0]))[0]


def test_batched_windows_equal_each_window_encoded_alone(tiny_backbone) -> None:
    images = torch.randn(2, 3, 98, 98)
    tokens, grid = tiny_backbone.embed(images)
    indices = window_indices(grid, 3)
    with torch.no_grad():
        batched = encode_windows(tiny_backbone, tokens, indices)
        chunked = encode_windows(tiny_backbone, tokens, indices, chunk_size=7)
        assert batched.shape == (2, 25, tiny_backbone.embed_dim)
        for b, m in ((0, 0), (1, 12), (1, 24)):
            torch.testing.assert_close(batched[b, m], _one_window(tiny_backbone, images[b], indices[m].tolist()),
                                       atol=1e-5, rtol=1e-5)  # fmt: skip
    torch.testing.assert_close(chunked, batched, atol=1e-6, rtol=0)
    # Windows see only their own patches: different windows, different embeddings.
    assert (batched[0, 0] - batched[0, 24]).abs().max() > 1e-3
