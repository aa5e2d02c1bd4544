"""Seeded k-means in torch for AdaCLIP's hybrid semantic fusion (HSF).

The official HSF runs ``sklearn.cluster.KMeans(n_clusters=20, n_init="auto")`` on the CPU for each image: one greedy
k-means++ initialisation followed by Lloyd iterations. This is the same algorithm in torch, on the tokens' device,
deterministic for a given seed and independent of the other images of the batch (each call draws from its own
generator), so batch size never changes a score.

What matches sklearn: greedy k-means++ (first centre uniform, then ``2 + ⌊ln k⌋`` candidates drawn ∝ D², the one
lowering the potential most kept), Lloyd iterations up to ``max_iter`` = 300, stop when the labels no longer change
or the squared centre shift falls under ``tol`` × the mean feature variance (tol 1e-4), an empty cluster re-seeded
with the point farthest from its centre. What does not: the random stream (torch's, not NumPy's), so the partition
equals sklearn's only when the initialisation does.
"""

from __future__ import annotations

import math

import torch


def _sq_distances(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``[n, k]`` squared Euclidean distances, clamped at 0 (the expanded form can round below)."""
    d = (x * x).sum(1, keepdim=True) - 2.0 * x @ centres.T + (centres * centres).sum(1)[None]
    return d.clamp_min(0.0)


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (sklearn's ``_kmeans_plusplus``) of ``x`` ``[n, d]``; returns centre indices ``[k]``."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    closest = _sq_distances(x, x[first : first + 1])[:, 0].double()
    potential = closest.sum()
    for _ in range(1, k):
        draws = torch.rand(trials, generator=generator, dtype=torch.float64).to(x.device) * potential
        candidates = torch.searchsorted(closest.cumsum(0), draws).clamp_max(n - 1)
        dist = _sq_distances(x, x[candidates]).double().T  # [trials, n]
        dist = torch.minimum(dist, closest[None])
        potentials = dist.sum(1)
        best = int(potentials.argmin())
        chosen.append(int(candidates[best]))
        closest, potential = dist[best], potentials[best]
    return torch.tensor(chosen, device=x.device)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, seed: int, max_iter: int = 300, tol: float = 1e-4) -> torch.Tensor:
    """Cluster the rows of ``x`` ``[n, d]`` into ``k`` groups; returns the labels ``[n]`` (long).

    Args:
        x: Points (any float dtype; computed in float32).
        k: Number of clusters (``1 ≤ k ≤ n``).
        seed: Seed of the k-means++ draws (same seed and points → same labels).
        max_iter: Lloyd iterations at most.
        tol: Convergence threshold on the squared centre shift, relative to the mean per-feature variance.

    Raises:
        ValueError: ``k`` outside ``1..n``.
    """
    x = x.detach().float()
    n = x.shape[0]
    if not 1 <= k <= n:
        msg = f"k-means needs 1 <= k <= number of points, got k={k} for {n} points."
        raise ValueError(msg)
    generator = torch.Generator().manual_seed(int(seed))
    centres = x[kmeans_plus_plus(x, k, generator)]
    threshold = tol * x.var(dim=0, unbiased=False).mean()
    labels = _sq_distances(x, centres).argmin(1)
    for _ in range(max_iter):
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        new = sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            # sklearn's relocation: empty clusters take the points farthest from their current centre.
            far = (x - centres[labels]).pow(2).sum(1).argsort(descending=True)[: empty.numel()]
            new[empty] = x[far]
        shift = (new - centres).pow(2).sum()
        centres = new
        new_labels = _sq_distances(x, centres).argmin(1)
        if torch.equal(new_labels, labels) or bool(shift <= threshold):
            labels = new_labels
            break
        labels = new_labels
    return labels


@torch.no_grad()
def sklearn_kmeans(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """The official clustering: ``sklearn.cluster.KMeans(k, n_init="auto", random_state=seed)`` on the CPU.

    For parity checks against the official code (run it with the same ``random_state``); needs scikit-learn (the
    ``test`` extra) and copies the points to the host.

    Raises:
        ImportError: scikit-learn is not installed (with the command that installs it).
    """
    try:
        from sklearn.cluster import KMeans
    except ImportError as err:
        msg = "kmeans_backend='sklearn' needs scikit-learn: pip install scikit-learn (or use kmeans_backend='torch')."
        raise ImportError(msg) from err
    labels = KMeans(n_clusters=k, n_init="auto", random_state=int(seed)).fit_predict(x.detach().float().cpu().numpy())
    return torch.as_tensor(labels, dtype=torch.long, device=x.device)
