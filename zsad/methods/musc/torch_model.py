"""MuSc: zero-shot anomaly classification and segmentation by mutual scoring of the unlabeled test images.

Paper: Li, Huang, Xue, Zhou, "MuSc: Zero-Shot Industrial Anomaly Classification and Segmentation with Mutual Scoring
of the Unlabeled Images", ICLR 2024; behaviour of the official repository xrli-U/MuSc (b76b93d) where the two differ
(``shared/specs/baselines.md`` §4). Training-free and *transductive*: an image is scored against the other test
images of its category, so a score exists only once the whole category has been encoded.

Features. Raw residual tokens ``h^(l)`` of layers ``l ∈ {6, 12, 18, 24}`` (1-based, no ``ln_post``/projection),
class token dropped, on a ``G×G`` grid (37×37 at 518 px with ViT-L/14).

LNAMD (local neighbourhood aggregation with multiple degrees), for ``r ∈ {1, 3, 5}`` and each layer::

    X  = LayerNorm over the whole [C, G, G] tensor of one image (no affine, eps 1e-5)
    X' = r×r mean with stride 1 and zero padding (r−1)/2 counted in the mean      (official: Unfold + mean)
    Z  = X' / ‖X'‖₂ per patch

MSM (mutual scoring), per layer and ``r``: for image ``i`` and every other image ``j`` of its (sub)set
``D_ij(p) = min_q ‖Z_i(p) − Z_j(q)‖₂``; ``a_i(p)`` = mean of the ``k = ⌊0.3 (N−1)⌋`` smallest ``D_ij(p)`` over
``j``. Maps: mean over layers, then over ``r`` → ``G×G`` → bilinear (``align_corners=True``) to the input size; no
smoothing.

RsCIN (re-scoring with constrained image-level neighbourhood): ``s_i = max_p map_i``, min-max normalised over the
category; ``W`` = cosine similarity of the CLIP image embeddings; for each ``k`` in ``k_list`` keep the ``k``
largest entries of each row of ``W`` (self included), row-normalise → ``P_k``; final score = mean over ``k`` of
``P_k s``.

Memory: the distances are computed query image × ``ref_chunk`` reference images at a time
(``[G², ref_chunk·G²]`` floats, ≈ 120 MB at 518 px with the default 16), never the official ``[G², (N−1)·G²]``
block (1.5 GB at N = 200).
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Sequence
from pathlib import PurePath

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from zsad.backbone import CLIPBackbone

#: RsCIN's ``k_list`` of the official code per dataset (``[1, 2, 3]`` also for BTAD and anything else there).
K_LIST_BY_DATASET: dict[str, tuple[int, ...]] = {"mvtec": (1, 2, 3), "visa": (1, 8, 9)}
#: Images per LNAMD call in :meth:`MuScModel.score_maps` (bounds its float32 temporaries).
LNAMD_CHUNK = 32


def lnamd(tokens: torch.Tensor, grid: tuple[int, int], r: int) -> torch.Tensor:
    """LNAMD of one layer's patch tokens: per-image LayerNorm, ``r×r`` mean aggregation, L2 normalisation.

    Args:
        tokens: ``[B, G·G, C]`` patch tokens (class token removed), any float dtype.
        grid: ``(G_h, G_w)`` patch grid.
        r: Aggregation degree, odd (1 = no aggregation).

    Returns:
        ``[B, G·G, C]`` float32 unit vectors.
    """
    if r < 1 or r % 2 == 0:
        raise ValueError(f"LNAMD aggregation degree r must be a positive odd number, got {r}")
    b, n, c = tokens.shape
    x = tokens.float().transpose(1, 2).reshape(b, c, *grid)
    # One LayerNorm over channels *and* positions of each image (official: a fresh nn.LayerNorm([C, H, W]), no affine).
    x = F.layer_norm(x, x.shape[1:], eps=1e-5)
    if r > 1:
        # Official Unfold (zero padding) + adaptive mean over each C·r·r block = average pooling counting the padding.
        x = F.avg_pool2d(x, r, stride=1, padding=(r - 1) // 2, count_include_pad=True)
    x = x.flatten(2).transpose(1, 2)
    return x / x.norm(dim=-1, keepdim=True)


def mutual_k(num_images: int, k_ratio: float = 0.3) -> int:
    """Number of smallest image distances averaged by MSM: ``⌊k_ratio·(N−1)⌋``, at least 1 (see :func:`mutual_scores`).

    Raises:
        ValueError: With fewer than 2 images (nothing to score against).
    """
    if num_images < 2:
        msg = (
            f"MuSc scores each image against the other test images of its category, but this (sub)set has "
            f"{num_images} image; give it at least 2 (5 or more for the official k = int(0.3·(N−1)) ≥ 1), or lower "
            "divide_num."
        )
        raise ValueError(msg)
    k = int(k_ratio * (num_images - 1))
    if k < 1:
        # The official code averages an empty set here (NaN scores for the whole category); 1 is the only sane value.
        warnings.warn(
            f"MuSc: {num_images} images give k = int({k_ratio}·{num_images - 1}) = 0 (NaN in the official code); "
            "using k = 1, the nearest other image.",
            stacklevel=2,
        )
        k = 1
    return k


def mutual_scores(
    features: torch.Tensor,
    queries: Sequence[int],
    references: Sequence[Sequence[int]],
    k: int,
    ref_chunk: int = 16,
) -> torch.Tensor:
    """MSM patch scores ``a_i(p)``: mean of the ``k`` smallest ``min_q ‖Z_i(p) − Z_j(q)‖`` over reference images ``j``.

    Args:
        features: ``[N, P, C]`` LNAMD features of one layer and one ``r`` for the whole (sub)set.
        queries: Indices ``i`` (into ``features``) to score.
        references: For each query, the indices ``j`` it is scored against (the other images of its subset).
        k: Smallest distances averaged.
        ref_chunk: Reference images per distance computation (bounds memory at ``P × ref_chunk·P`` floats).

    Returns:
        ``[len(queries), P]`` float64 scores (the official accumulates in float64).
    """
    n, p, c = features.shape
    out = features.new_empty(len(queries), p, dtype=torch.float64)
    for row, (i, refs) in enumerate(zip(queries, references, strict=True)):
        refs = list(refs)
        if len(refs) < k:
            raise ValueError(f"image {i} has {len(refs)} reference images, fewer than k = {k}")
        nearest = []
        for start in range(0, len(refs), ref_chunk):
            block = features[refs[start : start + ref_chunk]]  # [m, P, C]
            # torch.cdist as the official (its matrix-product path for large inputs included).
            dist = torch.cdist(features[i], block.reshape(-1, c))  # [P, m·P]
            nearest.append(dist.view(p, len(block), p).amin(dim=-1))  # [P, m]
        distances = torch.cat(nearest, dim=1)  # [P, N_ref]
        out[row] = distances.topk(k, dim=1, largest=False).values.mean(dim=1).double()
    return out


def rscin(scores: torch.Tensor, embeddings: torch.Tensor, k_list: Sequence[int]) -> torch.Tensor:
    """RsCIN: image scores smoothed over each image's ``k`` most similar images, averaged over ``k_list``.

    Args:
        scores: ``[N]`` image scores (max of each map) of the whole category.
        embeddings: ``[N, E]`` L2-normalised CLIP image embeddings.
        k_list: Neighbourhood sizes (self included). Empty or containing 0: the raw scores are returned (official).

    Returns:
        ``[N]`` float32 re-scored values (in ``[0, 1]`` unless returned raw).
    """
    if len(k_list) == 0 or 0 in k_list:
        return scores.float()
    n = scores.shape[0]
    low, high = scores.min(), scores.max()
    span = high - low
    # All scores equal: the official divides 0 by 0 (NaN); every image is then equally normal, 0 after normalising.
    s = (scores - low) / span if span > 0 else torch.zeros_like(scores)
    s = s.float()
    similarity = embeddings.float() @ embeddings.float().T
    rescored = []
    for k in k_list:
        k = min(int(k), n)  # the official fails for k > N; all images is the only meaning it can have
        keep = torch.zeros_like(similarity).scatter_(1, similarity.topk(k, dim=1).indices, 1.0)
        masked = similarity * keep
        transition = masked / masked.sum(dim=1, keepdim=True)
        rescored.append(transition @ s)
    return torch.stack(rescored, dim=-1).mean(dim=-1)


def stratified_subsets(paths: Sequence[str], divide_num: int, seed: int = 0) -> list[int]:
    """Subset index of each image for ``divide_num`` subsets, stratified by defect folder (official ``sub_datasets``).

    The images of each defect type (the parent folder of ``paths``, types in sorted order) are shuffled with
    ``random.Random(seed)`` and dealt to the subsets in turn, so every subset gets a share of every type.

    Args:
        paths: Image paths of one category, in the canonical (sorted) order.
        divide_num: Number of subsets (1: one set).
        seed: Shuffle seed.

    Returns:
        One subset index in ``[0, divide_num)`` per path.
    """
    if divide_num < 1:
        raise ValueError(f"divide_num must be >= 1, got {divide_num}")
    subset = [0] * len(paths)
    if divide_num == 1:
        return subset
    by_type: dict[str, list[int]] = {}
    for index, path in enumerate(paths):
        by_type.setdefault(PurePath(str(path)).parent.name, []).append(index)
    rng = random.Random(seed)  # noqa: S311 - a reproducible split, not cryptography
    for defect in sorted(by_type):
        members = by_type[defect]
        rng.shuffle(members)
        for position, index in enumerate(members):
            subset[index] = position % divide_num
    return subset


class MuScModel(nn.Module):
    """MuSc's scoring around a frozen CLIP image tower (nothing is learnt).

    Args:
        backbone: Frozen CLIP (bicubic position interpolation to the input size, as open_clip).
        layers: 1-based layers whose raw residual tokens are used (``hidden_states[6, 12, 18, 24]``).
        r_list: LNAMD aggregation degrees.
        k_ratio: MSM averages the ``⌊k_ratio·(N−1)⌋`` smallest image distances (official ``topmin_max`` 0.3).
        k_list: RsCIN neighbourhood sizes (``[1, 2, 3]`` MVTec AD, ``[1, 8, 9]`` VisA).
        ref_chunk: Reference images per distance block (memory bound; the result does not depend on it).
        feature_dtype: Dtype the tokens are stored in between encoding and scoring (float16 = the official, which
            encodes under fp16 autocast; LNAMD and distances are always float32).
    """

    def __init__(
        self,
        backbone: CLIPBackbone,
        layers: Sequence[int] = (6, 12, 18, 24),
        r_list: Sequence[int] = (1, 3, 5),
        k_ratio: float = 0.3,
        k_list: Sequence[int] = (1, 2, 3),
        ref_chunk: int = 16,
        feature_dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        if not 0 < k_ratio <= 1:
            raise ValueError(f"k_ratio must be in (0, 1], got {k_ratio}")
        if ref_chunk < 1:
            raise ValueError(f"ref_chunk must be >= 1, got {ref_chunk}")
        for r in r_list:
            if r < 1 or r % 2 == 0:
                raise ValueError(f"r_list holds positive odd aggregation degrees, got {list(r_list)}")
        self.backbone = backbone
        self.layers = tuple(int(layer) for layer in layers)
        self.r_list = tuple(int(r) for r in r_list)
        self.k_ratio = float(k_ratio)
        self.k_list = tuple(int(k) for k in k_list)
        self.ref_chunk = int(ref_chunk)
        self.feature_dtype = feature_dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Frozen features of a batch.

        Returns:
            ``tokens`` ``[B, L, G·G, C]`` raw residual patch tokens (``feature_dtype``) and ``embedding`` ``[B, E]``
            L2-normalised CLIP image embeddings (float32).
        """
        out = self.backbone.encode_image(images, layers=self.layers, project=False)
        tokens = torch.stack(out.patch_tokens, dim=1).to(self.feature_dtype)
        embedding = out.global_embedding.float()
        return {"tokens": tokens, "embedding": embedding / embedding.norm(dim=-1, keepdim=True)}

    def grid(self, num_patches: int) -> tuple[int, int]:
        """The square patch grid of ``num_patches`` tokens."""
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"{num_patches} patch tokens do not form a square grid")
        return side, side

    @torch.no_grad()
    def score_maps(
        self,
        tokens: torch.Tensor,
        image_size: tuple[int, int],
        queries: Sequence[int] | None = None,
        subsets: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """MuSc anomaly maps of ``queries``, each scored against the other images of its subset.

        Args:
            tokens: ``[N, L, G·G, C]`` tokens of every image of the category (from :meth:`encode`).
            image_size: Output map size.
            queries: Indices to score (default: all). Under DDP each rank scores its own images.
            subsets: Subset index per image (``divide_num``-like splits; default: one set).

        Returns:
            ``[len(queries), H, W]`` float64 maps (bilinear, ``align_corners=True``; no smoothing).
        """
        n = tokens.shape[0]
        queries = list(range(n)) if queries is None else [int(i) for i in queries]
        subsets = [0] * n if subsets is None else list(subsets)
        members: dict[int, list[int]] = {}
        for index, subset in enumerate(subsets):
            members.setdefault(subset, []).append(index)
        references = [[j for j in members[subsets[i]] if j != i] for i in queries]
        k_of = {s: mutual_k(len(m), self.k_ratio) for s, m in members.items() if any(subsets[i] == s for i in queries)}
        grid = self.grid(tokens.shape[2])
        per_r = []
        for r in self.r_list:
            per_layer = []
            for layer in range(tokens.shape[1]):
                # In image chunks: LNAMD's float32 temporaries stay small next to the [N, P, C] result.
                features = torch.cat(
                    [lnamd(tokens[start : start + LNAMD_CHUNK, layer], grid, r) for start in range(0, n, LNAMD_CHUNK)]
                )  # [N, P, C]
                scores = features.new_empty(len(queries), features.shape[1], dtype=torch.float64)
                for subset, k in k_of.items():
                    rows = [row for row, i in enumerate(queries) if subsets[i] == subset]
                    scores[rows] = mutual_scores(
                        features, [queries[row] for row in rows], [references[row] for row in rows], k, self.ref_chunk
                    )
                per_layer.append(scores)
            per_r.append(torch.stack(per_layer).mean(dim=0))
        patch_scores = torch.stack(per_r).mean(dim=0)  # [Q, P] float64
        maps = patch_scores.view(len(queries), 1, *grid)
        return F.interpolate(maps, size=tuple(image_size), mode="bilinear", align_corners=True)[:, 0]

    def rescore(self, image_scores: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """RsCIN over one whole category (see :func:`rscin`)."""
        return rscin(image_scores, embeddings, self.k_list)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Score a batch that *is* one whole category (every image against the others).

        Args:
            images: ``[N, 3, S, S]`` normalised images of one category, ``N ≥ 2``.

        Returns:
            ``InferenceBatch(pred_score [N], anomaly_map [N, S, S] float32)``.
        """
        features = self.encode(images)
        maps = self.score_maps(features["tokens"], tuple(images.shape[-2:]))
        scores = self.rescore(maps.flatten(1).amax(dim=1), features["embedding"])
        return InferenceBatch(pred_score=scores, anomaly_map=maps.float())
