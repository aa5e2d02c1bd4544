"""ONNX / OpenVINO exports of every exportable method equal the PyTorch model (tiny backbone)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import InferenceBatch

from zsad.deploy.graph import CLASS_AWARE, EXPORTABLE, export_graph, read_metadata
from zsad.deploy.runtime import GraphRunner
from zsad.export import main as export_main
from zsad.methods import (
    APRILGAN,
    CLIPADA,
    AdaCLIP,
    AdaptCLIP,
    AnomalyCLIP,
    LearnableVectors,
    MSFlow,
    MuSc,
    WinCLIP,
)

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


def _msflow() -> torch.nn.Module:
    """MSFlow's small test configuration (random ResNet-18, 64 px): the flows, fusion and post-processing as is."""
    torch.manual_seed(0)
    return MSFlow(
        backbone="resnet18",
        pretrained=False,
        image_size=64,
        blocks=(1, 1, 1),
        condition_channels=(8, 8, 8),
        evaluator=False,
    ).eval()


# (model, category folded in, the PyTorch reference computed without the export machinery, image size)
NEW_BASELINES: dict[str, tuple[Callable[[], torch.nn.Module], str | None, Callable, int]] = {
    "APRILGAN": (lambda: _model(APRILGAN), "bottle", lambda m, x: m.model(x, ["bottle"] * len(x)), 98),
    # WinCLIP's torch model takes the class word; the Lightning model maps the category to it.
    "WinCLIP": (lambda: _model(WinCLIP), "nunozumi", lambda m, x: m.model(x, "concrete block"), 98),
    "MSFlow": (_msflow, None, lambda m, x: m.model(x), 64),
}


@pytest.mark.parametrize("name", sorted(NEW_BASELINES))
def test_new_baselines_onnx_runtime_equals_pytorch(name: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    build, category, reference, size = NEW_BASELINES[name]
    model = build()
    path = export_graph(model, tmp_path / "model.onnx", category=category)  # traced at batch 1
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected: InferenceBatch = reference(model, images)
    scores, maps = GraphRunner(path, threads=1)(images.numpy())
    assert scores.shape == (3,) and maps.shape == (3, size, size)
    np.testing.assert_allclose(scores, expected.pred_score.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(maps, expected.anomaly_map.reshape(3, size, size).numpy(), atol=1e-4, rtol=0)
    metadata = read_metadata(path)
    assert metadata["class_path"].endswith(name) and metadata["image_size"] == size
    assert metadata["category"] == (category or "")
    if name == "MSFlow":  # its own ImageNet normalisation travels, not CLIP's
        assert metadata["mean"] == pytest.approx([0.485, 0.456, 0.406])
    if name == "WinCLIP":
        assert metadata["class_word"] == "concrete block"  # the method's own override of a Gogan category


def test_class_aware_export_holds_the_chosen_class_text(tmp_path: Path) -> None:
    """Another category gives another graph: the class text really is folded in, not a default word."""
    pytest.importorskip("onnxruntime")
    model = _model(APRILGAN)
    images = _images(2).numpy()
    bottle = GraphRunner(export_graph(model, tmp_path / "bottle.onnx", category="bottle"), threads=1)(images)
    screw = GraphRunner(export_graph(model, tmp_path / "screw.onnx", category="screw"), threads=1)(images)
    assert np.abs(bottle[0] - screw[0]).max() > 1e-4
    assert read_metadata(tmp_path / "screw.onnx")["class_word"] == "screw"
    assert CLASS_AWARE >= {"APRILGAN", "WinCLIP", "AdaCLIP"}


def test_class_aware_methods_need_a_category_and_others_refuse_one() -> None:
    with pytest.raises(ValueError, match="class-aware .* --category bottle"):
        export_graph(_model(APRILGAN), "never-written.onnx")
    with pytest.raises(ValueError, match="does not use the category"):
        export_graph(_model(LearnableVectors), "never-written.onnx", category="bottle")
    assert not Path("never-written.onnx").exists()


REFUSED = {
    "AdaCLIP": (lambda: _model(AdaCLIP), "k-means.*data-dependent"),
    "MuSc": (lambda: _model(MuSc, layers=(1, 2)), "transductive"),
    "WinCLIP k_shot=2": (lambda: _model(WinCLIP, k_shot=2), "k_shot=2.*needs reference images"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_methods_that_cannot_be_one_image_graph_say_why(name: str, tmp_path: Path) -> None:
    build, reason = REFUSED[name]
    with pytest.raises(ValueError, match=reason):
        export_graph(build(), tmp_path / "model.onnx", category="bottle")
    assert not (tmp_path / "model.onnx").exists()


def test_cli_refuses_a_category_the_method_does_not_use(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="LearnableVectors does not use the category"):
        export_main(
            [f"--ckpt_path={tiny_checkpoint}", "--format=onnx", f"--output={tmp_path / 'm.onnx'}", "--category=bottle"]
        )


def test_cli_exports_a_class_aware_checkpoint_for_the_given_category(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from lightning.pytorch import Trainer

    checkpoint = tmp_path / "april_gan.ckpt"
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(_model(APRILGAN))
    trainer.save_checkpoint(checkpoint)
    args = [f"--ckpt_path={checkpoint}", "--format=onnx", f"--output={tmp_path / 'model.onnx'}"]
    with pytest.raises(SystemExit, match="class-aware"):
        export_main(args)
    path = export_main([*args, "--category=tanizumi"])
    metadata = read_metadata(path)
    assert (metadata["category"], metadata["class_word"]) == ("tanizumi", "concrete block")
    scores, maps = GraphRunner(path, threads=1)(_images(2).numpy())
    assert scores.shape == (2,) and maps.shape == (2, 98, 98)


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
    assert {"LearnableVectors", "AnomalyCLIP", "AdaptCLIP", "CLIPADA", "APRILGAN", "WinCLIP", "MSFlow"} <= set(
        EXPORTABLE
    )
