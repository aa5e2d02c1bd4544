"""zsad's WinCLIP equals anomalib 2.7's WinClip on identical random weights: anomalib's model is built with
``pretrained=None`` on a small open_clip ViT, its open_clip weights go through ``zsad convert-weights``, and image
scores and maps must agree within 1e-4, zero-shot and few-shot."""

from __future__ import annotations

import anomalib.models.image.winclip.torch_model as anomalib_winclip
import pytest
import torch
from open_clip import factory

from zsad.backbone import create_backbone
from zsad.convert_weights import convert_weights
from zsad.methods.winclip import WinCLIPModel

ARCH = "zsad-test-winclip-vit"
#: 96 px / 16 = 6x6 grid: 25 windows of 2x2 and 16 of 3x3; 2 heads of 32 in both towers.
CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 96, "layers": 3, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("winclip_eq")
    with pytest.MonkeyPatch.context() as mp:
        # anomalib reads the architecture and weights tag from module constants: a registered small config and no
        # pretrained tag build its exact model with open_clip's random initialisation and nothing downloaded.
        mp.setitem(factory._MODEL_CONFIGS, ARCH, CONFIG)  # noqa: SLF001
        mp.setattr(anomalib_winclip, "BACKBONE", ARCH)
        mp.setattr(anomalib_winclip, "PRETRAINED", None)
        torch.manual_seed(0)
        reference = anomalib_winclip.WinClipModel(class_name="metal_nut").eval()
        with torch.no_grad():  # spread the layer norms so that a swapped ln_pre / ln_post cannot pass
            for name, p in reference.clip.named_parameters():
                if "ln" in name:
                    p.add_(0.5 * torch.randn_like(p))
            reference.setup("metal_nut")  # re-collect the text embeddings with the final weights
        torch.save(reference.clip.state_dict(), tmp / "open_clip.pt")
        convert_weights("open_clip", ARCH, tmp / "open_clip.pt", tmp / "hf")
    ours = WinCLIPModel(create_backbone(str(tmp / "hf"), image_size=96), scales=(2, 3)).eval()
    return reference, ours


def _compare(expected, actual) -> None:
    assert actual.anomaly_map.shape == expected.anomaly_map.shape == (3, 96, 96)
    # Non-vacuous: the maps vary far more than the tolerance.
    assert float(expected.anomaly_map.max() - expected.anomaly_map.min()) > 50 * TOL
    torch.testing.assert_close(actual.pred_score, expected.pred_score, atol=TOL, rtol=0)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, atol=TOL, rtol=0)


def test_zero_and_few_shot_equal_anomalib_winclip(models) -> None:
    reference, ours = models
    torch.manual_seed(1)
    images, references = torch.randn(3, 3, 96, 96), torch.randn(2, 3, 96, 96)
    _compare(reference(images), ours(images, "metal_nut"))

    reference.setup(reference_images=references)
    assert reference.k_shot == 2
    _compare(reference(images), ours(images, "metal_nut", ours.encode_references(references)))
