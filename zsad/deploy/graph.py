"""The whole inference graph of a method as ONNX or OpenVINO IR: normalised image in, score and anomaly map out.

What is exported is the method's eval-mode torch model (``model.model``, the contract of ``docs/CONVENTIONS.md``):
frozen CLIP image encoder + learned head + upsampling + Gaussian smoothing. Text features do not depend on the
image, so they are computed once before tracing and enter the graph as constants (the text tower is not exported).

Interface of every export:

* input ``image``: float32 ``[B, 3, S, S]``, resized and normalised with the method's own mean / std (CLIP's, or
  ImageNet's for MSFlow; both in the metadata);
* outputs ``pred_score`` ``[B]`` and ``anomaly_map`` ``[B, S, S]`` (float32);
* metadata: the model class, image size, normalisation, backbone identity, hyper-parameters, the category and class
  word of a class-aware method's export, and the calibrated thresholds (:mod:`zsad.deploy.thresholds`; empty when
  uncalibrated). ONNX keeps them in ``metadata_props``, OpenVINO as one JSON object in the model's ``rt_info`` entry
  ``zsad_metadata``.

Only methods that need nothing but the image at test time can be exported; :data:`EXPORTABLE` lists them. A new
method joins with one line: ``EXPORTABLE["MyMethod"] = always`` (or a function returning why a given instance
cannot be exported, like AdaptCLIP's few-shot mode which needs reference images).

Class-aware methods (:data:`CLASS_AWARE`: APRIL-GAN, WinCLIP) prompt the text tower with the class word of each
image's category, while an export takes only the image: one export folds in the text of ONE category
(``zsad export --category bottle``), and the graph scores every image through the method's own
``predict_batch`` with that category repeated over the batch. The class word it used is in the metadata.
"""

from __future__ import annotations

import importlib
import json
import logging
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from zsad.atomic import atomic_path
from zsad.deploy.thresholds import CHECKPOINT_KEY, Thresholds

logger = logging.getLogger(__name__)

FORMAT = "zsad-inference/1"
ExportFormat = Literal["onnx", "openvino"]
OPSET = 17
#: OpenVINO ``rt_info`` entry holding the metadata (one JSON object).
OV_RT_KEY = "zsad_metadata"


def always(model: nn.Module) -> str | None:  # noqa: ARG001
    """Exportability check of a method whose every configuration needs only the image."""
    return None


def _adaptclip(model: nn.Module) -> str | None:
    k_shot = int(getattr(model, "k_shot", 0))
    return None if k_shot == 0 else f"AdaptCLIP with k_shot={k_shot} needs reference images at test time."


def _winclip(model: nn.Module) -> str | None:
    k_shot = int(getattr(model, "k_shot", 0))
    return None if k_shot == 0 else f"WinCLIP+ (k_shot={k_shot}) needs reference images at test time; use k_shot=0."


def _adaclip(model: nn.Module) -> str | None:  # noqa: ARG001
    return (
        "AdaCLIP cannot be traced faithfully: its hybrid semantic fusion runs a seeded k-means++ per image whose "
        "Lloyd loop stops when the labels or centres converge (data-dependent: a trace would freeze the iteration "
        "count and random draws of the tracing image), and its prompted text tower runs once per image over the "
        "batch's category list (a trace would freeze the batch size)."
    )


def _musc(model: nn.Module) -> str | None:  # noqa: ARG001
    return "MuSc is transductive: every score depends on the other test images of the category, not on one image."


#: Class name → check returning ``None`` (exportable) or the reason this instance cannot be exported.
EXPORTABLE: dict[str, Callable[[nn.Module], str | None]] = {
    "LearnableVectors": always,
    "AnomalyCLIP": always,
    "AdaptCLIP": _adaptclip,
    "CLIPADA": always,
    "APRILGAN": always,
    "WinCLIP": _winclip,
    "MSFlow": always,
    "AdaCLIP": _adaclip,
    "MuSc": _musc,
}

#: Methods whose text features depend on the image's category: exported for one category (``--category``).
CLASS_AWARE: frozenset[str] = frozenset({"APRILGAN", "WinCLIP", "AdaCLIP"})


@dataclass
class _ImageBatch:
    """What a method's ``predict_batch`` reads from a batch when it is traced: the images and their categories."""

    image: torch.Tensor
    category: Sequence[str]


class InferenceGraph(nn.Module):
    """``image -> (pred_score, anomaly_map)`` around a method's eval-mode model (what is traced).

    Args:
        model: The Lightning model. Without ``category`` its torch model (``model.model``) is called on the images;
            with one, its ``predict_batch`` receives the images and ``category`` repeated over the batch, so a
            class-aware method scores them with that class's text (a constant of the trace).
        category: The category folded into the graph (class-aware methods only).
    """

    def __init__(self, model: nn.Module, category: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.category = category

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score ``[B]`` and map ``[B, S, S]`` of normalised images ``[B, 3, S, S]``."""
        if self.category is None:
            out = self.model.model(image)
        else:
            out = self.model.predict_batch(_ImageBatch(image, [self.category] * image.shape[0]))
        anomaly_map = out.anomaly_map
        if anomaly_map.ndim == 4:
            anomaly_map = anomaly_map[:, 0]
        return out.pred_score.reshape(-1).float(), anomaly_map.float()


def load_model(ckpt_path: str | Path) -> nn.Module:
    """Rebuild a model from a zsad checkpoint alone (class from its record, ``weights_only=True``)."""
    from zsad.methods.checkpoint_io import checkpoint_class_path

    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    # zsad's own record (any Trainer / Engine run of a ZSADModule), else LightningCLI's hyper-parameter.
    class_path = checkpoint_class_path(checkpoint)
    if not class_path:
        msg = f"{ckpt_path} does not record its model class (not written by zsad); cannot rebuild the model."
        raise ValueError(msg)
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    with warnings.catch_warnings():
        # zsad checkpoints omit the frozen backbone by design (rebuilt from the hyper-parameters): not a problem.
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in")
        model = cls.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    return model.eval()


def _image_size(model: nn.Module) -> int:
    size = model.hparams.get("image_size") if hasattr(model, "hparams") else None
    if size is None:
        msg = f"{type(model).__name__} has no image_size hyper-parameter; cannot fix the exported input size."
        raise ValueError(msg)
    return int(size[0] if isinstance(size, tuple | list) else size)


def _normalisation(model: nn.Module) -> tuple[list[float], list[float]]:
    """Mean and std of the method's own pre-processor (MSFlow: ImageNet), else OpenAI CLIP's."""
    from torchvision.transforms.v2 import Normalize

    from zsad.backbone import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    transform = getattr(getattr(model, "pre_processor", None), "transform", None)
    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, Normalize):
            return [float(v) for v in step.mean], [float(v) for v in step.std]
    return list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)


def class_word_of(model: nn.Module, category: str) -> str:
    """The class word a class-aware method's prompts use for ``category`` (its own mapping and overrides)."""
    if hasattr(model, "word"):  # WinCLIP's Lightning model maps category -> word itself
        return str(model.word(category))
    return str(model.model.class_word(category))


def metadata_of(model: nn.Module, source: str | None = None, category: str | None = None) -> dict[str, str]:
    """String metadata of an export of ``model`` (thresholds from ``zsad calibrate`` when it has them).

    ``category`` / ``class_word`` are empty unless a class-aware method was exported for one category.
    """
    mean, std = _normalisation(model)
    thresholds = Thresholds.from_dict(getattr(model, CHECKPOINT_KEY, None))
    backbone = getattr(model, "backbone", None)
    hparams = {k: v for k, v in dict(getattr(model, "hparams", {})).items() if not k.startswith("_")}
    return {
        "format": FORMAT,
        "class_path": f"{type(model).__module__}.{type(model).__qualname__}",
        "image_size": str(_image_size(model)),
        "mean": json.dumps(mean),
        "std": json.dumps(std),
        "category": category or "",
        "class_word": "" if category is None else class_word_of(model, category),
        "backbone": json.dumps(backbone.identity() if hasattr(backbone, "identity") else None, default=str),
        "hparams": json.dumps(hparams, sort_keys=True, default=str),
        "thresholds": json.dumps(thresholds.to_dict()),
        "image_threshold": "" if thresholds.image_threshold is None else repr(thresholds.image_threshold),
        "pixel_threshold": "" if thresholds.pixel_threshold is None else repr(thresholds.pixel_threshold),
        "source": source or "",
    }


def check_exportable(model: nn.Module, category: str | None = None) -> None:
    """Raise ``ValueError`` naming the reason when ``model`` cannot be exported as an image-only graph.

    A class-aware method (:data:`CLASS_AWARE`) needs ``category``; any other method refuses one.
    """
    name = type(model).__name__
    if name not in EXPORTABLE:
        msg = (
            f"{name} is not registered as exportable (zsad.deploy.graph.EXPORTABLE: {sorted(EXPORTABLE)}). Methods "
            "that need test-time references or per-category state cannot be one image-only graph."
        )
        raise ValueError(msg)
    reason = EXPORTABLE[name](model)
    if reason is not None:
        raise ValueError(f"{name} cannot be exported: {reason}")
    if name in CLASS_AWARE and not category:
        msg = (
            f"{name} is class-aware (its text depends on the image's category) and an export takes only the image: "
            "pass the category to fold in, e.g. `zsad export --category bottle` (export_graph(..., category=...))."
        )
        raise ValueError(msg)
    if name not in CLASS_AWARE and category is not None:
        msg = f"{name} does not use the category (its text is the same for every class): drop --category."
        raise ValueError(msg)


def _export_onnx(model: nn.Module, path: Path, batch_size: int, category: str | None) -> None:
    size = _image_size(model)
    graph = InferenceGraph(model, category).eval()
    example = torch.zeros(batch_size, 3, size, size)
    with torch.no_grad():
        graph(example)  # fills the text-feature caches, so tracing sees them as constants
    with warnings.catch_warnings():
        # Tracer warnings flag Python ints taken from shapes; S is fixed by design and B stays dynamic (tested).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            input_names=["image"],
            output_names=["pred_score", "anomaly_map"],
            dynamic_axes={"image": {0: "batch"}, "pred_score": {0: "batch"}, "anomaly_map": {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,  # the TorchScript exporter: no onnxscript dependency, handles the HF attention as is
        )


def _add_onnx_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"zsad.{key}", value
    onnx.save(proto, str(path))


def export_graph(
    model: nn.Module,
    output: str | Path,
    fmt: ExportFormat = "onnx",
    source: str | None = None,
    batch_size: int = 1,
    category: str | None = None,
) -> Path:
    """Export ``model`` (a zsad method in eval mode) as ONNX (``.onnx``) or OpenVINO IR (``.xml`` + ``.bin``).

    Args:
        model: The Lightning model (its ``model`` attribute is traced).
        output: Destination file.
        fmt: ``"onnx"`` or ``"openvino"`` (converted from the ONNX graph with ``openvino.convert_model``).
        source: Checkpoint the model came from (recorded in the metadata).
        batch_size: Batch size of the tracing example (the batch axis stays dynamic).
        category: The category whose text a class-aware method (:data:`CLASS_AWARE`) folds in; required for those,
            refused for the others.

    Returns:
        The written file.
    """
    if fmt not in ("onnx", "openvino"):
        msg = f"format must be 'onnx' or 'openvino', got {fmt!r}."
        raise ValueError(msg)
    check_exportable(model, category)
    model = model.eval()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    metadata = metadata_of(model, source, category)
    if fmt == "onnx":
        with atomic_path(output) as tmp:
            _export_onnx(model, Path(tmp), batch_size, category)
            _add_onnx_metadata(Path(tmp), metadata)
        return output
    try:
        import openvino as ov
    except ImportError as err:
        msg = "OpenVINO export needs the `deploy` extra: pip install 'zsad[deploy]'."
        raise ImportError(msg) from err
    with tempfile.TemporaryDirectory() as tmp_dir:
        onnx_path = Path(tmp_dir) / "graph.onnx"
        _export_onnx(model, onnx_path, batch_size, category)
        ov_model = ov.convert_model(str(onnx_path))
    ov_model.set_rt_info(json.dumps(metadata), [OV_RT_KEY])
    # fp32 weights: the default fp16 compression would change the scores beyond the 1e-4 parity of the tests.
    ov.save_model(ov_model, str(output), compress_to_fp16=False)
    return output


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Decoded metadata of an ONNX or OpenVINO export written by :func:`export_graph`."""
    path = Path(path)
    if path.suffix.lower() == ".xml":
        import openvino as ov

        ov_model = ov.Core().read_model(str(path))
        raw = json.loads(ov_model.get_rt_info([OV_RT_KEY]).astype(str)) if ov_model.has_rt_info([OV_RT_KEY]) else {}
    else:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        raw = {p.key.removeprefix("zsad."): p.value for p in proto.metadata_props if p.key.startswith("zsad.")}
    if raw.get("format") != FORMAT:
        msg = f"{path} is not a zsad inference export (format {raw.get('format')!r}); write one with `zsad export`."
        raise ValueError(msg)
    meta: dict[str, Any] = dict(raw)
    for key in ("mean", "std", "backbone", "hparams", "thresholds"):
        meta[key] = json.loads(raw[key])
    meta["image_size"] = int(raw["image_size"])
    for key in ("category", "class_word"):  # exports written before class-aware methods joined lack them
        meta.setdefault(key, "")
    return meta


def export_from_checkpoint(
    ckpt_path: str | Path, output: str | Path, fmt: ExportFormat, category: str | None = None
) -> Path:
    """``zsad export --format onnx|openvino [--category C]``: rebuild the model from a checkpoint, export its graph."""
    model = load_model(ckpt_path)
    return export_graph(model, output, fmt, source=str(ckpt_path), category=category)
