"""Window embeddings: re-encode the class token with a subset of patch tokens (WinCLIP's sliding windows).

A window is a fixed-size set of patch positions. Its embedding is the CLIP image embedding of a sequence made of the
class token and only the window's tokens, each taken *after* patch embedding + position embedding (so a window keeps
the positions of its patches), then ``pre_layrnorm`` → encoder → ``post_layernorm`` of the class token →
``visual_projection`` (``shared/specs/baselines.md`` §3; anomalib's ``WinClipModel._get_window_embeddings``).

``pre_layrnorm`` acts on each token alone, so gathering from the pre-normed sequence of the full image
(:meth:`~zsad.backbone.CLIPBackbone.embed`) equals gathering before it and normalising each window: the embedding of
the full image is computed once and shared by the image forward and every window.

All windows of one size go through the encoder as one batch of equal-length sequences (no padding, no mask), split
into chunks only to bound memory.

Example:
    >>> from zsad.backbone import create_backbone
    >>> backbone = create_backbone("tiny", image_size=56)  # 4x4 grid
    >>> tokens, grid = backbone.embed(torch.zeros(1, 3, 56, 56))
    >>> encode_windows(backbone, tokens, window_indices(grid, 2)).shape  # 9 windows of 2x2 patches
    torch.Size([1, 9, 16])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

from zsad.backbone.clip import CLIPBackbone


def window_indices(grid: tuple[int, int], kernel: int, stride: int = 1) -> torch.Tensor:
    """Patch indices of every ``kernel × kernel`` window sliding over a patch grid.

    Args:
        grid: ``(h, w)`` of the patch grid (patch index = ``row * w + col``).
        kernel: Window side in patches.
        stride: Step between windows in patches.

    Returns:
        ``[M, kernel²]`` long tensor: one row per window, windows in row-major order of their top-left corner,
        patches row-major inside a window (the order of anomalib's ``make_masks``, transposed).

    Raises:
        ValueError: The window does not fit the grid.
    """
    height, width = grid
    if kernel < 1 or stride < 1 or kernel > min(height, width):
        msg = f"A {kernel}x{kernel} window (stride {stride}) does not fit a {height}x{width} patch grid."
        raise ValueError(msg)
    ids = torch.arange(height * width, dtype=torch.float32).reshape(1, 1, height, width)
    # unfold: [1, kernel², M] with columns = windows, rows = positions inside the window (row-major both).
    return F.unfold(ids, kernel_size=kernel, stride=stride)[0].t().round().long()


def window_coverage(grid: tuple[int, int], kernel: int, stride: int = 1) -> torch.Tensor:
    """``[N, M]`` boolean matrix: ``[p, m]`` is true when window ``m`` covers patch ``p``."""
    indices = window_indices(grid, kernel, stride)
    coverage = torch.zeros(grid[0] * grid[1], indices.shape[0], dtype=torch.bool)
    coverage[indices.t(), torch.arange(indices.shape[0]).expand_as(indices.t())] = True
    return coverage


def run_vision_encoder(backbone: CLIPBackbone, tokens: torch.Tensor) -> torch.Tensor:
    """All vision blocks on a pre-normed token sequence ``[B, T, W]`` (any length ``T``)."""
    for block in backbone.vision.encoder.layers:
        tokens = block(tokens, None)
    return tokens


def encode_windows(
    backbone: CLIPBackbone,
    tokens: torch.Tensor,
    indices: torch.Tensor,
    chunk_size: int = 2048,
) -> torch.Tensor:
    """Projected class-token embeddings of windows of the full-image token sequence.

    Args:
        backbone: The frozen CLIP.
        tokens: ``[B, 1 + N, W]`` class + patch tokens after position embedding and ``pre_layrnorm``
            (:meth:`~zsad.backbone.CLIPBackbone.embed`).
        indices: ``[M, K]`` patch indices of each window (:func:`window_indices`); all windows have ``K`` patches.
        chunk_size: At most this many window sequences per encoder call (memory bound; results do not depend on it).

    Returns:
        ``[B, M, E]`` window embeddings (``visual_projection(post_layernorm(cls))``).
    """
    batch, _, width = tokens.shape
    n_windows, size = indices.shape
    indices = indices.to(tokens.device)
    # [B, M, K, W] window tokens (+1: index 0 is the class token), then the class token in front of each window.
    patches = tokens[:, 1:][:, indices.reshape(-1)].reshape(batch, n_windows, size, width)
    cls = tokens[:, :1].unsqueeze(1).expand(batch, n_windows, 1, width)
    sequences = torch.cat([cls, patches], dim=2).reshape(batch * n_windows, size + 1, width)
    chunk_size = max(1, int(chunk_size))
    # No split when everything fits in one call: a traced export (zsad.deploy) then keeps its batch axis dynamic
    # instead of freezing the chunk sizes seen while tracing.
    chunks = [sequences] if sequences.shape[0] <= chunk_size else sequences.split(chunk_size)
    pooled = torch.cat([run_vision_encoder(backbone, chunk)[:, 0] for chunk in chunks], dim=0)
    return backbone.project(pooled).reshape(batch, n_windows, -1)
