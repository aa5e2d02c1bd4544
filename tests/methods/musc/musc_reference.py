"""MuSc's formulas written again, independently, in NumPy float64 (official xrli-U/MuSc, ``baselines.md`` §4).

Loops and explicit windows on purpose: nothing here shares code or tricks with ``zsad.methods.musc``.
"""

from __future__ import annotations

import numpy as np


def lnamd(tokens: np.ndarray, side: int, r: int) -> np.ndarray:
    """``[N, P, C]`` → LayerNorm over each image's whole ``[C, G, G]`` (eps 1e-5), r×r zero-padded mean, L2."""
    n, p, c = tokens.shape
    x = tokens.reshape(n, side, side, c).astype(np.float64)  # patch p = row * G + column
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    var = x.var(axis=(1, 2, 3), keepdims=True)
    x = (x - mean) / np.sqrt(var + 1e-5)
    pad = (r - 1) // 2
    padded = np.zeros((n, side + 2 * pad, side + 2 * pad, c))
    padded[:, pad : pad + side, pad : pad + side] = x
    out = np.zeros_like(x)
    for row in range(side):
        for col in range(side):
            window = padded[:, row : row + r, col : col + r]  # zeros at the border count in the mean
            out[:, row, col] = window.reshape(n, r * r, c).sum(axis=1) / (r * r)
    out = out.reshape(n, p, c)
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


def msm(z: np.ndarray, members: list[int], k: int) -> dict[int, np.ndarray]:
    """For each image i of ``members``: mean of the k smallest ``min_q ‖Z_i(p) − Z_j(q)‖`` over the other members."""
    out = {}
    for i in members:
        per_image = []
        for j in members:
            if j == i:
                continue
            diff = z[i][:, None, :] - z[j][None, :, :]
            per_image.append(np.sqrt((diff**2).sum(-1)).min(axis=1))
        distances = np.stack(per_image, axis=1)  # [P, N_ref]
        out[i] = np.sort(distances, axis=1)[:, :k].mean(axis=1)
    return out


def bilinear_align_corners(grid_map: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of ``[G, G]`` to ``[size, size]`` with ``align_corners=True`` (corner pixels = corner cells)."""
    g = grid_map.shape[0]
    src = np.arange(size) * (g - 1) / (size - 1)
    low = np.floor(src).astype(int)
    high = np.minimum(low + 1, g - 1)
    w = src - low
    rows = grid_map[low] * (1 - w)[:, None] + grid_map[high] * w[:, None]
    return rows[:, low] * (1 - w)[None, :] + rows[:, high] * w[None, :]


def rscin(scores: np.ndarray, embeddings: np.ndarray, k_list: list[int]) -> np.ndarray:
    """Min-max scores, cosine-similarity rows restricted to their k largest entries and normalised, mean over k."""
    s = (scores - scores.min()) / (scores.max() - scores.min())
    w = embeddings @ embeddings.T
    out = []
    for k in k_list:
        p = np.zeros_like(w)
        for i in range(len(w)):
            keep = np.argsort(-w[i])[:k]
            p[i, keep] = w[i, keep]
            p[i] /= p[i].sum()
        out.append(p @ s)
    return np.mean(out, axis=0)


def musc(
    layer_tokens: list[np.ndarray],
    embeddings: np.ndarray,
    image_size: int,
    r_list: list[int],
    k_list: list[int],
    subsets: list[int] | None = None,
    k_ratio: float = 0.3,
) -> tuple[np.ndarray, np.ndarray]:
    """Maps ``[N, S, S]`` and RsCIN image scores ``[N]`` of one category from per-layer tokens ``[N, P, C]``."""
    n, p, _ = layer_tokens[0].shape
    side = int(round(np.sqrt(p)))
    subsets = subsets or [0] * n
    patch = np.zeros((n, p))
    for r in r_list:
        per_layer = np.zeros((n, p))
        for tokens in layer_tokens:
            z = lnamd(tokens, side, r)
            for subset in set(subsets):
                members = [i for i in range(n) if subsets[i] == subset]
                k = int(k_ratio * (len(members) - 1))
                for i, a in msm(z, members, k).items():
                    per_layer[i] += a / len(layer_tokens)
        patch += per_layer / len(r_list)
    maps = np.stack([bilinear_align_corners(patch[i].reshape(side, side), image_size) for i in range(n)])
    return maps, rscin(maps.reshape(n, -1).max(axis=1), embeddings, k_list)
