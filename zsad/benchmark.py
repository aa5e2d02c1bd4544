"""``zsad benchmark``: parameter counts and inference throughput of any method, next to its bare frozen encoder.

The seed-000 Table 2 for any configuration: exact trainable and total parameter counts, images/s of the method's
inference forward (``model.model(images)``: encoder, head, upsampling and Gaussian smoothing) and images/s of the
frozen encoder alone (``model.model.encode(images)``, or ``backbone.encode_image`` for methods without that split),
timed in the same process, interleaved batch by batch so that load from other processes hits both alike.

Example:
    zsad benchmark --config configs/learnable_vectors/visa_to_mvtec.yaml --weights random --batches 3

Random input at the model's input size; ``--weights random`` builds the shipped architecture with random weights
(no download; the throughput is the same as with pretrained weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def human_count(n: int) -> str:
    """``7684 → 7.7K``, ``304301572 → 304.3M`` (the seed's Table 2 style)."""
    if n >= 1_000_000_000:
        return f"{n / 1e9:.1f}B"
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    if n >= 1_000:
        return f"{n / 1e3:.1f}K"
    return str(n)


def _model_section(config_path: str | Path) -> dict[str, Any]:
    path = Path(config_path)
    config = yaml.safe_load(path.read_text()) or {}
    section = config.get("model", config if "class_path" in config else None)
    if isinstance(section, str):  # `model: path/to/model.yaml`, relative to the config
        section = yaml.safe_load((path.parent / section).read_text())
    if not isinstance(section, dict) or "class_path" not in section:
        msg = f"{path} has no `model: {{class_path: ..., init_args: ...}}` section."
        raise ValueError(msg)
    return section


def build_model(config_path: str | Path, overrides: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate the ``model`` of a LightningCLI config (jsonargparse, like ``zsad fit``) with init-arg overrides.

    Overrides whose name the model's constructor does not take are dropped (e.g. ``weights`` for anomalib's own
    models), so the same call works for every method.
    """
    import inspect

    from anomalib.models import AnomalibModule
    from jsonargparse import ArgumentParser

    import zsad.data  # noqa: F401 - registers short class names
    import zsad.methods  # noqa: F401

    section = _model_section(config_path)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(AnomalibModule, "model", required=True)
    cfg = parser.parse_object({"model": section})
    model_cfg = cfg.model
    if overrides:
        cls = _import(model_cfg.class_path)
        accepted = set(inspect.signature(cls.__init__).parameters)
        for key, value in overrides.items():
            if key in accepted:
                model_cfg.init_args[key] = value
    return parser.instantiate_classes(cfg).model


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_encoder(model: nn.Module) -> tuple[Callable[[torch.Tensor], Any], str] | None:
    """The frozen encoder of a module and how it is called (``None`` if there is none to time)."""
    inner = getattr(model, "model", model)
    if hasattr(inner, "encode"):
        return inner.encode, "model.model.encode(images)"
    backbone = getattr(inner, "backbone", None) or getattr(model, "backbone", None)
    if backbone is not None and hasattr(backbone, "encode_image"):
        return backbone.encode_image, "backbone.encode_image(images)"
    return None


def time_interleaved(
    calls: dict[str, Callable[[], Any]],
    batches: int,
    warmup: int,
    device: torch.device,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds per call of each function, run in turn batch by batch after ``warmup`` rounds.

    CPU seconds (``time.process_time``, summed over this process's threads) are barely affected by other processes
    on a shared machine, where wall-clock times can vary several-fold; on a GPU only the wall times mean anything.
    """
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(warmup + batches):
        for name, fn in calls.items():
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            if round_index >= warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def run_benchmark(
    model: nn.Module,
    batch_size: int = 1,
    batches: int = 3,
    warmup: int = 1,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    image_size: int | None = None,
    seed: int = 0,
    plain_clip: bool = True,
) -> dict[str, Any]:
    """Parameters and images/s of ``model.model(images)``, of its bare encoder and of the plain CLIP image tower."""
    from zsad.methods.base import count_parameters

    trainable, total = count_parameters(model)
    # A method may explain how its count relates to the paper's (e.g. tables the official code enlarged at load).
    table2_note = getattr(model, "table2_note", None)
    note = table2_note(trainable, total) if callable(table2_note) else None
    device = torch.device(device)
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    if image_size is None:
        image_size = int(getattr(model, "hparams", {}).get("image_size", 0) or 0) or _input_side(model)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device, DTYPES[dtype])
    inner = getattr(model, "model", model)
    calls = {"inference": lambda: inner(images)}
    encoder = bare_encoder(model)
    if encoder is not None:
        calls["encoder"] = lambda: encoder[0](images)
    backbone = getattr(inner, "backbone", None)
    if plain_clip and encoder is not None and encoder[0] is not getattr(backbone, "encode_image", None):
        # The CLIP image tower alone (global embedding, no layer taps or projections): the floor of any method.
        calls["clip"] = lambda: backbone.encode_image(images)
    with torch.inference_mode():
        times, cpu_times = time_interleaved(calls, batches, warmup, device)
    result: dict[str, Any] = {
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "trainable_parameters": trainable,
        "total_parameters": total,
        "image_size": image_size,
        "batch_size": batch_size,
        "dtype": dtype,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batches": batches,
        "warmup": warmup,
        "seconds": times,
        "cpu_seconds": cpu_times,
    }
    if note:
        result["table2_note"] = note
    for name in calls:
        result[f"{name}_images_per_s"] = batch_size / statistics.median(times[name])
        result[f"{name}_images_per_cpu_s"] = batch_size / statistics.median(cpu_times[name])
    if encoder is not None:
        result["encoder_call"] = encoder[1]
        result["ratio"] = result["inference_images_per_s"] / result["encoder_images_per_s"]
        result["ratio_cpu"] = result["inference_images_per_cpu_s"] / result["encoder_images_per_cpu_s"]
    if "clip" in calls:
        result["ratio_clip"] = result["inference_images_per_s"] / result["clip_images_per_s"]
        result["ratio_clip_cpu"] = result["inference_images_per_cpu_s"] / result["clip_images_per_cpu_s"]
    return result


def _input_side(model: nn.Module) -> int:
    size = getattr(model, "input_size", None)
    if size:
        return int(size[0])
    msg = "Cannot tell the model's input size; pass --image_size."
    raise ValueError(msg)


def _device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_report(result: dict[str, Any], backbone: str | None, weights: str | None, config: str) -> str:
    """The lines ``zsad benchmark`` prints."""
    name = result["model"].rsplit(".", 1)[-1]
    lines = [
        f"zsad benchmark: {result['model']} from {config}",
        f"backbone: {backbone} (weights: {weights})"
        + ("  -- RANDOM weights: throughput and parameter counts only, scores would be meaningless" if weights ==
           "random" else ""),
        f"trainable parameters: {result['trainable_parameters']}",
        f"total parameters: {result['total_parameters']}",
        f"input: 3x{result['image_size']}x{result['image_size']}, batch size {result['batch_size']}, "
        f"dtype {result['dtype']}, device {result['device_name']}; median of {result['batches']} timed batches "
        f"after {result['warmup']} warm-up, calls interleaved",
        f"inference: {result['inference_images_per_s']:.3f} images/s (model.model(images): encoder + head + "
        "upsampling + smoothing)",
    ]
    if "ratio" in result:
        lines += [
            f"bare encoder: {result['encoder_images_per_s']:.3f} images/s ({result['encoder_call']})",
            f"ratio inference / bare encoder: {result['ratio']:.3f}",
        ]
    if "ratio_clip" in result:
        lines.append(
            f"plain CLIP image encoder: {result['clip_images_per_s']:.3f} images/s (backbone.encode_image(images), "
            f"no layer taps); ratio inference / plain: {result['ratio_clip']:.3f}",
        )
    if result["device"].startswith("cpu"):
        cpu_line = f"per CPU-second (robust to other processes): inference {result['inference_images_per_cpu_s']:.3f}"
        if "ratio" in result:
            cpu_line += (f", bare encoder {result['encoder_images_per_cpu_s']:.3f} images, "
                         f"ratio {result['ratio_cpu']:.3f}")
        if "ratio_clip" in result:
            cpu_line += f", plain CLIP {result['clip_images_per_cpu_s']:.3f}, ratio {result['ratio_clip_cpu']:.3f}"
        lines.append(cpu_line)
    lines += [
        "seed-000 Table 2 row | method | trainable | total | images/s |",
        f"                    | {name} | {human_count(result['trainable_parameters'])} | "
        f"{human_count(result['total_parameters'])} | {result['inference_images_per_s']:.2f} |",
    ]
    if result.get("table2_note"):
        lines.append(f"                    note: {result['table2_note']}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Command-line arguments of ``zsad benchmark``."""
    parser = argparse.ArgumentParser(
        prog="zsad benchmark",
        description="Trainable/total parameters and inference images/s of a method (seed 000's Table 2), with the "
        "bare frozen encoder's images/s measured in the same run.",
    )
    parser.add_argument("--config", required=True, help="A method config (LightningCLI YAML with a `model:` block).")
    parser.add_argument("--weights", choices=["pretrained", "random"], default=None,
                        help="Override model.init_args.weights (`random`: no download, same speed).")
    parser.add_argument("--backbone", default=None, help="Override model.init_args.backbone.")
    parser.add_argument("--image_size", type=int, default=None, help="Override model.init_args.image_size.")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--batches", type=int, default=10, help="Timed batches (after the warm-up).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed warm-up batches.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    parser.add_argument("--no_plain_clip", action="store_true",
                        help="Do not also time the plain CLIP image tower (backbone.encode_image).")
    parser.add_argument("--json", default=None, help="Also write the result as JSON to this file.")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                        help="Override any model init argument (YAML value), e.g. --set num_refinements=2. Repeatable.")
    return parser.parse_args(list(argv))


def parse_sets(sets: Sequence[str]) -> dict[str, Any]:
    """``["num_refinements=2", "layers=[24]"]`` → ``{"num_refinements": 2, "layers": [24]}`` (values parsed as YAML).

    Raises:
        ValueError: An item without ``=``, or a name the ``--weights/--backbone/--image_size`` flags own.
    """
    out: dict[str, Any] = {}
    for item in sets:
        name, sep, value = item.partition("=")
        name = name.strip().removeprefix("model.").removeprefix("init_args.")
        if not sep or not name:
            msg = f"--set takes NAME=VALUE (a model init argument), got {item!r}."
            raise ValueError(msg)
        out[name] = yaml.safe_load(value)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``zsad benchmark``."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides: dict[str, Any] = {"evaluator": False, "visualizer": False}
    for key in ("weights", "backbone", "image_size"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    unknown = set(parse_sets(args.sets))
    overrides.update(parse_sets(args.sets))
    model = build_model(args.config, overrides)
    hparams_now = dict(getattr(model, "hparams", {}))
    missing = sorted(name for name in unknown if name not in hparams_now)
    if missing:
        msg = f"--set names no init argument of {type(model).__name__}: {missing}."
        raise SystemExit(msg)
    hparams = dict(getattr(model, "hparams", {}))
    result = run_benchmark(
        model,
        batch_size=args.batch_size,
        batches=args.batches,
        warmup=args.warmup,
        dtype=args.dtype,
        device=args.device,
        image_size=args.image_size,
        plain_clip=not args.no_plain_clip,
    )
    result["device_name"] = _device_name(args.device)
    result["config"] = str(args.config)
    result["backbone"] = hparams.get("backbone")
    result["weights"] = hparams.get("weights")
    print(format_report(result, result["backbone"], result["weights"], str(args.config)))  # noqa: T201
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
