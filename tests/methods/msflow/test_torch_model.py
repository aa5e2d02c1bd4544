"""MSFlow's maths against independent re-computations of the official formulas (cool-xuan/msflow)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zsad.backbone.cnn import ResNetStages
from zsad.methods.msflow.torch_model import (
    FusionCoupling,
    MSFlowModel,
    fusion_flow,
    positional_encoding_2d,
    post_process,
)


def _official_positional_encoding(d: int, h: int, w: int) -> np.ndarray:
    """``utils.positionalencoding2d`` element by element: columns in the first half, rows in the second."""
    out = np.zeros((d, h, w))
    half = d // 2
    for i in range(0, half, 2):
        freq = math.exp(i * -(math.log(1e4) / half))
        for y in range(h):
            for x in range(w):
                out[i, y, x] = math.sin(x * freq)
                out[i + 1, y, x] = math.cos(x * freq)
                out[half + i, y, x] = math.sin(y * freq)
                out[half + i + 1, y, x] = math.cos(y * freq)
    return out


def test_positional_encoding_is_the_official_sine_cosine_grid() -> None:
    np.testing.assert_allclose(
        positional_encoding_2d(8, 3, 5).numpy(), _official_positional_encoding(8, 3, 5), atol=1e-6
    )
    with pytest.raises(ValueError, match="divisible by 4"):
        positional_encoding_2d(6, 2, 2)


def test_fusion_flow_is_invertible_and_its_log_det_is_the_true_jacobian() -> None:
    torch.manual_seed(0)
    channels, sizes = [4, 8], [(2, 2), (1, 1)]
    flow = fusion_flow(channels, clamp=1.9)
    for p in flow.parameters():  # non-trivial scales and shifts (the last convs start near zero otherwise)
        if p.requires_grad:
            p.data.normal_(0, 0.3)
    xs = [torch.randn(1, c, *s) for c, s in zip(channels, sizes, strict=True)]
    zs, log_det = flow(xs)
    back, _ = flow(list(zs), rev=True)
    for x, b in zip(xs, back, strict=True):
        torch.testing.assert_close(b, x, atol=1e-5, rtol=1e-5)

    def flat(v: torch.Tensor) -> torch.Tensor:
        parts = torch.split(v, [4 * 2 * 2, 8], dim=0)
        out, _ = flow([parts[0].reshape(1, 4, 2, 2), parts[1].reshape(1, 8, 1, 1)])
        return torch.cat([o.reshape(-1) for o in out])

    x_flat = torch.cat([x.reshape(-1) for x in xs]).double()
    flow.double()
    jacobian = torch.autograd.functional.jacobian(flat, x_flat)
    _, expected = torch.linalg.slogdet(jacobian)
    torch.testing.assert_close(log_det.double().reshape(()), expected, atol=1e-3, rtol=1e-4)


def test_fusion_coupling_soft_clamp_is_the_official_atan() -> None:
    layer = FusionCoupling([(4, 1, 1), (4, 1, 1)], clamp=1.9)
    s = torch.linspace(-50, 50, 11)
    torch.testing.assert_close(layer.log_scale(s), 1.9 * 0.636 * torch.atan(s / 1.9))


def _official_post_process(logps: list[np.ndarray], size: int, top_k: float) -> tuple[np.ndarray, ...]:
    """``post_process.py`` in NumPy (bilinear align_corners=True upsampling done with torch, as the official code)."""

    def up(a: np.ndarray) -> np.ndarray:
        t = torch.nn.functional.interpolate(
            torch.from_numpy(a)[:, None], size=(size, size), mode="bilinear", align_corners=True
        )
        return t[:, 0].double().numpy()

    logp_map = sum(up(a) for a in logps)
    logp_map = logp_map - logp_map.max(axis=(1, 2), keepdims=True)
    prop_mul = np.exp(logp_map)
    anomaly_mul = prop_mul.max(axis=(1, 2), keepdims=True) - prop_mul
    k = int(size * size * top_k)
    score = np.sort(anomaly_mul.reshape(len(anomaly_mul), -1), axis=1)[:, ::-1][:, :k].mean(axis=1)
    prop_add = sum(up(np.exp(a - a.max(axis=(1, 2), keepdims=True))) for a in logps)
    anomaly_add = prop_add.max(axis=(1, 2), keepdims=True) - prop_add
    return score, anomaly_add, anomaly_mul


def test_post_process_matches_the_official_maps_and_top_k_score() -> None:
    rng = np.random.default_rng(0)
    logps = [-rng.random((2, n, n)).astype(np.float32) * 5 for n in (8, 4, 2)]
    out = post_process([torch.from_numpy(a) for a in logps], (16, 16), top_k=0.1)
    score, add, mul = _official_post_process(logps, 16, 0.1)
    np.testing.assert_allclose(out["score"].numpy(), score, rtol=1e-5)
    np.testing.assert_allclose(out["add"].numpy(), add, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["mul"].numpy(), mul, rtol=1e-5, atol=1e-6)


def test_model_trains_on_the_nll_and_scores_images() -> None:
    torch.manual_seed(0)
    model = MSFlowModel(ResNetStages("resnet18", pretrained=False), condition_channels=(8, 8, 8), blocks=(1, 2, 1))
    images = torch.randn(2, 3, 64, 64)
    model.train()
    assert not model.extractor.training, "the frozen extractor keeps its BatchNorm statistics"
    loss = model(images)
    latents, log_det = model.flows(model.encode(images))
    expected = (sum(0.5 * (z**2).sum(dim=(1, 2, 3)) for z in latents) - log_det).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is None for p in model.extractor.parameters())
    assert all(p.grad is not None for p in model.parallel_flows.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert out.pred_score.shape == (2,) and out.anomaly_map.shape == (2, 64, 64)
    assert (out.anomaly_map >= 0).all() and torch.isfinite(out.pred_score).all()


def test_anomalibs_all_in_one_block_equals_freias_which_the_official_code_uses() -> None:
    from anomalib.models.components.flow import AllInOneBlock as AnomalibBlock
    from FrEIA.modules import AllInOneBlock as FreiaBlock

    from zsad.methods.msflow.torch_model import ConvLayerNormSubnet

    kwargs = {"subnet_constructor": ConvLayerNormSubnet, "affine_clamping": 1.9, "global_affine_type": "SOFTPLUS"}
    ours, official = AnomalibBlock([(8, 1, 1)], [(4, 1, 1)], **kwargs), FreiaBlock([(8, 1, 1)], [(4, 1, 1)], **kwargs)
    with torch.no_grad():
        for p in ours.subnet.parameters():
            p.normal_(0, 0.2)
    official.load_state_dict(ours.state_dict())
    x, c = torch.randn(2, 8, 5, 5), torch.randn(2, 4, 5, 5)
    (y_ours,), jac_ours = ours([x], [c])
    (y_official,), jac_official = official([x], [c])
    torch.testing.assert_close(y_ours, y_official)
    torch.testing.assert_close(jac_ours, jac_official)
