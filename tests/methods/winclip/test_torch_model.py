"""WinCLIP's scoring pieces against the paper's formulas written out here, on the tiny backbone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from zsad.backbone.ensembles import WINCLIP
from zsad.backbone.windows import window_indices
from zsad.methods.winclip import WinCLIPModel, association_scores, harmonic_aggregation


@pytest.fixture(scope="module")
def model(tiny_backbone) -> WinCLIPModel:
    return WinCLIPModel(tiny_backbone, scales=(2, 3)).eval()


def test_harmonic_aggregation_is_the_per_patch_harmonic_mean_of_covering_windows() -> None:
    grid = (4, 5)
    indices = window_indices(grid, 2)
    scores = torch.rand(2, indices.shape[0]) + 0.05
    out = harmonic_aggregation(scores, indices, grid)
    for p in range(20):
        covering = [m for m in range(indices.shape[0]) if p in indices[m].tolist()]
        expected = len(covering) / (1 / scores[:, covering]).sum(dim=1)
        torch.testing.assert_close(out.reshape(2, -1)[:, p], expected)
    # A zero window score zeroes the patches it covers (1/0 = inf), nothing else.
    scores[0, 0] = 0.0
    out = harmonic_aggregation(scores, indices, grid)
    assert float(out[0, 0, 0]) == 0.0 and float(out[0, 1, 1]) == 0.0
    assert (out[0].reshape(-1)[[2, 3, 4, 10, 19]] > 0).all()


def test_text_embeddings_are_means_of_unnormalised_prompt_features(model) -> None:
    normal, abnormal = WINCLIP.sentences("concrete block")
    assert (len(normal), len(abnormal)) == (7 * 21, 4 * 21)
    assert "a photo of the damaged concrete block for visual inspection." in abnormal
    normal, abnormal = WINCLIP.sentences("bottle")  # the class the other tests encode (cached by the backbone)
    text = model.text_embeddings("bottle")
    expected = torch.stack([model.backbone.encode_text(normal).mean(0), model.backbone.encode_text(abnormal).mean(0)])
    torch.testing.assert_close(text, expected)
    mean_of_normalised = model.backbone.encode_text(normal, normalize=True).mean(0)
    assert (F.normalize(text[0], dim=0) - F.normalize(mean_of_normalised, dim=0)).abs().max() > 1e-4


def test_zero_shot_image_score_and_map(model) -> None:
    images = torch.randn(2, 3, 98, 98)
    out = model(images, "bottle")
    assert out.pred_score.shape == (2,) and out.anomaly_map.shape == (2, 98, 98)
    features = model.encode(images)
    text = F.normalize(model.text_embeddings("bottle"), dim=-1)
    expected_score = (F.normalize(features["image"], dim=-1) @ text.t() / 0.07).softmax(-1)[:, 1]
    torch.testing.assert_close(out.pred_score, expected_score)
    assert set(features) == {"image", "patch", "grid", "window_2", "window_3"}
    assert features["window_2"].shape == (2, 36, 16) and features["window_3"].shape == (2, 25, 16)
    assert features["patch"].shape == (2, 49, model.backbone.width)  # unprojected (WinCLIP+'s patch memory)
    # Harmonic mean of image score and scale maps lies between their min and max.
    assert ((out.anomaly_map > 0) & (out.anomaly_map < 1)).all()


def test_few_shot_query_equal_to_a_reference_scores_only_the_zero_shot_half(model) -> None:
    images = torch.randn(2, 3, 98, 98)
    memory = model.encode_references(images)
    assert memory["patch"].shape == (2 * 49, model.backbone.width)
    assert memory["window_3"].shape == (2 * 25, 16)
    features = model.encode(images[:1])
    # Every query patch / window is in the memory: the association maps vanish.
    assert float(model.few_shot_map(features, memory).abs().max()) < 1e-5
    zero, few = model(images[:1], "bottle"), model(images[:1], "bottle", memory)
    torch.testing.assert_close(few.anomaly_map, zero.anomaly_map / 2, atol=1e-5, rtol=0)
    torch.testing.assert_close(few.pred_score, zero.pred_score / 2, atol=1e-5, rtol=0)


def test_association_score_is_min_cosine_distance_over_the_memory() -> None:
    queries, memory = torch.randn(2, 5, 8), torch.randn(7, 8)
    cos = F.cosine_similarity(queries[:, :, None], memory[None, None], dim=-1)
    torch.testing.assert_close(association_scores(queries, memory), ((1 - cos) / 2).min(dim=-1).values)
