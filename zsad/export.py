"""``zsad export``: a method's learned parameters as one safetensors file (no pickle, no frozen backbone).

A zsad checkpoint already holds only the trainable parameters (``ZSADModule.on_save_checkpoint``); the export writes
those tensors with safetensors and puts in its metadata what is needed to use them again: the model class, the
backbone identity (hub id, weights, input size, position-embedding interpolation, activation) and the
hyper-parameters as JSON. Reading it back (:func:`load_exported`, :func:`apply_exported`) never unpickles anything.

Examples:
    zsad export --ckpt_path runs/.../checkpoints/last.ckpt --output vectors.safetensors
    zsad export --config configs/learnable_vectors/demo.yaml --ckpt_path last.ckpt --output vectors.safetensors
    zsad export --config configs/learnable_vectors/demo.yaml --output init.safetensors   # a fresh model's parameters
    zsad export --ckpt_path last.ckpt --format onnx --output model.onnx        # whole inference graph (zsad.deploy)
    zsad export --ckpt_path last.ckpt --format openvino --output model.xml
    zsad export --ckpt_path april_gan.ckpt --format onnx --category bottle   # class-aware: one category's text
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from zsad.atomic import atomic_path
from zsad.methods.checkpoint_io import check_finite, read_lightning_checkpoint

FORMAT = "zsad-trainable/1"


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _class_path(obj: object) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _write(tensors: dict[str, torch.Tensor], metadata: dict[str, str], output: str | Path) -> Path:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return output


def export_module(model: nn.Module, output: str | Path) -> Path:
    """Write ``model.trainable_state_dict()`` with the backbone identity and hyper-parameters as metadata."""
    tensors = model.trainable_state_dict()
    backbone = getattr(model, "backbone", None)
    metadata = {
        "format": FORMAT,
        "class_path": _class_path(model),
        "backbone": _json(backbone.identity() if hasattr(backbone, "identity") else None),
        "hparams": _json(dict(getattr(model, "hparams", {}))),
        "trainable_parameters": str(sum(v.numel() for v in tensors.values())),
    }
    return _write(tensors, metadata, output)


def export_checkpoint(ckpt_path: str | Path, output: str | Path, class_path: str | None = None) -> Path:
    """Write the parameters of a zsad checkpoint (loaded with ``weights_only=True``) without building the model.

    Args:
        ckpt_path: Lightning checkpoint written by a zsad method (frozen backbone already dropped).
        output: Destination ``.safetensors`` file.
        class_path: Model class when the checkpoint does not record it (runs not started by the CLI).
    """
    # A corrupt/truncated file names itself and the fix; NaN/inf tensors (a diverged run) are never exported.
    checkpoint = read_lightning_checkpoint(ckpt_path)
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    tensors = {k: v for k, v in checkpoint.get("state_dict", {}).items() if isinstance(v, torch.Tensor)}
    if "zsad_backbone" not in checkpoint:
        msg = f"{ckpt_path} was not written by a zsad method (no `zsad_backbone` entry)."
        raise ValueError(msg)
    check_finite(tensors, str(ckpt_path))
    # LightningCLI's short path first (what earlier exports held); zsad's own record covers Engine / Trainer runs.
    recorded = str(hparams.pop("_class_path", "") or checkpoint.get("zsad_class", ""))
    metadata = {
        "format": FORMAT,
        "class_path": class_path or recorded,
        "backbone": _json(checkpoint["zsad_backbone"]),
        "hparams": _json({k: v for k, v in hparams.items() if not k.startswith("_")}),
        "trainable_parameters": str(sum(v.numel() for v in tensors.values())),
        "source": str(ckpt_path),
    }
    return _write(tensors, metadata, output)


def load_exported(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and decoded metadata of an export (safetensors only: no code is executed)."""
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    if raw.get("format") != FORMAT:
        msg = f"{path} is not a zsad export (format {raw.get('format')!r}, expected {FORMAT!r})."
        raise ValueError(msg)
    metadata: dict[str, Any] = dict(raw)
    for key in ("backbone", "hparams"):
        metadata[key] = json.loads(raw[key])
    metadata["trainable_parameters"] = int(raw["trainable_parameters"])
    return load_file(str(path)), metadata


def apply_exported(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load an export into a built model; every trainable tensor must be present with its shape.

    Returns:
        The export's metadata.

    Raises:
        ValueError: Missing, unexpected or mis-shaped tensors, or a backbone that differs from the export's.
    """
    tensors, metadata = load_exported(path)
    expected = model.trainable_state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        msg = f"{path} does not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}, shape {shapes}."
        raise ValueError(msg)
    backbone = getattr(model, "backbone", None)
    if hasattr(backbone, "identity") and metadata["backbone"] is not None:
        ours = json.loads(_json(backbone.identity()))
        if ours != metadata["backbone"]:
            msg = f"{path} was trained on backbone {metadata['backbone']}, this model has {ours}."
            raise ValueError(msg)
    model.load_state_dict(tensors, strict=False)
    return metadata


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Command-line arguments of ``zsad export``."""
    parser = argparse.ArgumentParser(
        prog="zsad export",
        description="Write a method's learned parameters as safetensors (+ backbone identity and hyper-parameters "
        "as metadata). Checkpoints are read with weights_only=True.",
    )
    parser.add_argument("--ckpt_path", default=None, help="Checkpoint of a zsad run (trainable parameters only).")
    parser.add_argument(
        "--config",
        default=None,
        help="Method config: names the model class for checkpoints that lack it; without "
        "--ckpt_path, a freshly built model's parameters are exported.",
    )
    parser.add_argument("--output", default=None, help="Destination file (default: model.<format suffix>).")
    parser.add_argument(
        "--format",
        choices=["safetensors", "onnx", "openvino"],
        default="safetensors",
        help="safetensors: learned parameters only; onnx / openvino: the whole inference graph (image -> score, "
        "map) with the calibrated thresholds in its metadata (needs --ckpt_path and the `deploy` extra).",
    )
    parser.add_argument(
        "--category",
        default=None,
        help="onnx / openvino of a class-aware method (APRIL-GAN, WinCLIP): the category whose class word the "
        "prompts use, folded into the graph (an export takes only the image). Recorded in the metadata.",
    )
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> Path:
    """Entry point of ``zsad export``."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.ckpt_path is None and args.config is None:
        msg = "zsad export needs --ckpt_path (a trained run) or --config (a fresh model)."
        raise SystemExit(msg)
    if args.format != "safetensors":
        return _export_graph(args)
    if args.category is not None:
        raise SystemExit("--category selects the text folded into an onnx / openvino graph; safetensors has none.")
    args.output = args.output or "trainable.safetensors"
    if args.ckpt_path is not None:
        class_path = None
        if args.config is not None:
            from zsad.benchmark import _model_section

            class_path = _model_section(args.config)["class_path"]
        output = export_checkpoint(args.ckpt_path, args.output, class_path=class_path)
    else:
        from zsad.benchmark import build_model

        output = export_module(build_model(args.config, {"evaluator": False}), args.output)
    _, metadata = load_exported(output)
    print(  # noqa: T201
        f"wrote {output} ({output.stat().st_size} bytes): {metadata['trainable_parameters']} parameters of "
        f"{metadata['class_path'] or 'an unnamed model'} on backbone {metadata['backbone']}",
    )
    return output


def _export_graph(args: argparse.Namespace) -> Path:
    from zsad.deploy.graph import export_from_checkpoint, read_metadata

    if args.ckpt_path is None:
        msg = f"--format {args.format} exports a trained model: pass --ckpt_path."
        raise SystemExit(msg)
    output = Path(args.output or ("model.onnx" if args.format == "onnx" else "model.xml"))
    try:
        output = export_from_checkpoint(args.ckpt_path, output, args.format, category=args.category)
    except ValueError as err:  # not exportable, or a missing / needless --category: the reason, not a traceback
        raise SystemExit(f"zsad export: {err}") from err
    metadata = read_metadata(output)
    thresholds = metadata["thresholds"]
    state = "thresholds " + (
        f"image {thresholds['image_threshold']!r}, pixel {thresholds['pixel_threshold']!r}"
        if thresholds["image_threshold"] is not None
        else "not calibrated"
    )
    print(  # noqa: T201
        f"wrote {output} ({args.format}, input image [B,3,{metadata['image_size']},{metadata['image_size']}], "
        f"{state}"
        + (f", category {metadata['category']!r} as {metadata['class_word']!r}" if metadata["category"] else "")
        + f") from {args.ckpt_path}",
    )
    return output


if __name__ == "__main__":
    main()
