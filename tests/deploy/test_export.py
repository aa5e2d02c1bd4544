"""ONNX / OpenVINO exports of every exportable method equal the PyTorch model (tiny backbone)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from zsad.deploy.graph import EXPORTABLE, export_graph, read_metadata
from zsad.deploy.runtime import GraphRunner
from zsad.methods import CLIPADA, AdaptCLIP, AnomalyCLIP, LearnableVectors

METHODS = [LearnableVectors, AnomalyCLIP, AdaptCLIP, CLIPADA]


def _model(cls: type, **kwargs: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return cls(backbone="tiny", weights="random", image_size=98, evaluator=False, **kwargs).eval()


def _images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 98, 98, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_onnx_runtime_equals_pytorch(cls: type, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model = _model(cls)
    path = export_graph(model, tmp_path / "model.onnx")  # traced at batch 1
    images = _images(3)  # the batch axis stays dynamic
    with torch.no_grad():
        expected = model.model(images)
    scores, maps = GraphRunner(path, threads=1)(images.numpy())
    assert scores.shape == (3,) and maps.shape == (3, 98, 98)
    np.testing.assert_allclose(scores, expected.pred_score.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(maps, expected.anomaly_map.reshape(3, 98, 98).numpy(), atol=1e-4, rtol=0)
    metadata = read_metadata(path)
    assert metadata["image_size"] == 98 and metadata["class_path"].endswith(cls.__name__)
    assert metadata["thresholds"]["image_threshold"] is None  # not calibrated: nothing invented


def test_openvino_equals_pytorch_and_carries_thresholds(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    model = _model(LearnableVectors)
    model.zsad_thresholds = {"image_threshold": 0.5, "pixel_threshold": 0.25, "calibration": {"method": "test"}}
    path = export_graph(model, tmp_path / "model.xml", fmt="openvino")
    images = _images(2)
    with torch.no_grad():
        expected = model.model(images)
    runner = GraphRunner(path, threads=1)
    scores, maps = runner(images.numpy())
    np.testing.assert_allclose(scores, expected.pred_score.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(maps, expected.anomaly_map.numpy(), atol=1e-4, rtol=0)
    assert runner.metadata["thresholds"]["image_threshold"] == 0.5
    assert runner.metadata["pixel_threshold"] == "0.25"


def test_methods_that_need_references_are_refused() -> None:
    model = _model(AdaptCLIP, k_shot=1)
    with pytest.raises(ValueError, match="k_shot=1 needs reference images"):
        export_graph(model, "never-written.onnx")
    assert {"LearnableVectors", "AnomalyCLIP", "AdaptCLIP", "CLIPADA"} <= set(EXPORTABLE)
