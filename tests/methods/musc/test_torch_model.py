"""MuSc's maths against an independent NumPy re-computation of the official formulas (tiny random CLIP)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from musc_reference import musc as reference_musc
from musc_reference import rscin as reference_rscin

from zsad.methods.musc import MuScModel, mutual_k, rscin
from zsad.methods.musc.torch_model import stratified_subsets

SIZE = 98  # tiny CLIP: 7x7 patches, the analogue of 518 / 37x37
LAYERS = (6, 12, 18, 24)


@pytest.fixture(scope="module")
def model(tiny_backbone) -> MuScModel:  # noqa: ANN001
    return MuScModel(tiny_backbone, layers=LAYERS, feature_dtype=torch.float32).eval()


def hf_features(backbone, images: torch.Tensor) -> tuple[list[np.ndarray], np.ndarray]:  # noqa: ANN001
    """Layer taps and image embeddings straight from transformers (not through zsad's encode_image)."""
    with torch.no_grad():
        out = backbone.vision(pixel_values=images, output_hidden_states=True, interpolate_pos_encoding=True)
        tokens = [out.hidden_states[layer][:, 1:].double().numpy() for layer in LAYERS]  # raw residual, CLS dropped
        embedding = backbone.visual_projection(out.pooler_output).double().numpy()  # post_layernorm(CLS) → proj
    return tokens, embedding / np.linalg.norm(embedding, axis=-1, keepdims=True)


def test_six_image_category_equals_the_numpy_recomputation(model: MuScModel) -> None:
    images = torch.randn(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    out = model(images)
    tokens, embedding = hf_features(model.backbone, images)
    maps, scores = reference_musc(tokens, embedding, SIZE, r_list=[1, 3, 5], k_list=[1, 2, 3])

    assert out.anomaly_map.shape == (6, SIZE, SIZE) and out.anomaly_map.dtype == torch.float32
    np.testing.assert_allclose(out.anomaly_map.numpy(), maps, rtol=0, atol=2e-5)
    np.testing.assert_allclose(out.pred_score.numpy(), scores, rtol=0, atol=2e-5)
    # Not a degenerate case: images differ, RsCIN changed the ranking-relevant values away from the raw maxima.
    assert np.ptp(scores) > 0.1
    raw = maps.reshape(6, -1).max(axis=1)
    assert not np.allclose(scores, (raw - raw.min()) / np.ptp(raw), atol=1e-3)


def test_subsets_top_k_and_memory_chunks_match_the_reference(model: MuScModel) -> None:
    """11 images in two stratified subsets (k = 1 and 1), 12 in one set (k = 3); ref_chunk never changes a value."""
    rng = np.random.default_rng(1)
    tokens = torch.from_numpy(rng.normal(size=(12, 4, 49, 32))).float()
    tokens[:, :, :7] += 2.0  # shared structure, so nearest neighbours are informative
    layer_tokens = [tokens[:, layer].double().numpy() for layer in range(4)]
    embedding = np.eye(12)[:, :8] + 0.1

    full = model.score_maps(tokens, (SIZE, SIZE))
    expected, _ = reference_musc(layer_tokens, embedding, SIZE, r_list=[1, 3, 5], k_list=[1])
    np.testing.assert_allclose(full.numpy(), expected, rtol=0, atol=2e-5)
    assert mutual_k(12) == 3

    paths = [f"/d/cat/test/{'good' if i < 6 else 'crack'}/{i:03d}.png" for i in range(12)]
    subsets = stratified_subsets(paths, 2, seed=0)
    assert sorted(subsets[:6]) == [0, 0, 0, 1, 1, 1] and sorted(subsets[6:]) == [0, 0, 0, 1, 1, 1]
    assert subsets == stratified_subsets(paths, 2, seed=0) != stratified_subsets(paths, 2, seed=1)
    queries = [1, 4, 9]
    chunked = MuScModel(model.backbone, ref_chunk=1, feature_dtype=torch.float32)
    split = chunked.score_maps(tokens, (SIZE, SIZE), queries=queries, subsets=subsets)
    expected_split, _ = reference_musc(layer_tokens, embedding, SIZE, [1, 3, 5], [1], subsets=subsets)
    np.testing.assert_allclose(split.numpy(), expected_split[queries], rtol=0, atol=2e-5)
    assert not np.allclose(split.numpy(), full[queries].numpy(), atol=1e-4)  # subsets do change the scores


def test_small_categories_are_guarded(model: MuScModel) -> None:
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with pytest.warns(UserWarning, match=r"k = int\(0.3·2\) = 0"):
        out = model(images)  # the official code gives NaN for every image of a category with N <= 4
    assert torch.isfinite(out.pred_score).all() and torch.isfinite(out.anomaly_map).all()
    with pytest.raises(ValueError, match="at least 2"):
        model(images[:1])


def test_rscin_edge_cases_follow_the_official_rules() -> None:
    rng = np.random.default_rng(3)
    scores = torch.from_numpy(rng.random(5))
    embedding = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(5, 4))).float(), dim=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = rscin(scores, embedding, [1, 2, 9])  # k = 9 > N = 5: all images
    expected = reference_rscin(scores.numpy(), embedding.double().numpy(), [1, 2, 5])
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rscin(scores, embedding, [0]), scores.float())  # k_list [0]: raw scores (official)
    assert torch.equal(rscin(torch.ones(5, dtype=torch.float64), embedding, [1, 2]), torch.zeros(5))  # no 0/0
