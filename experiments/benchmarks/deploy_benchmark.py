#!/usr/bin/env python
"""Images/s of one model in PyTorch eager, ONNX Runtime and OpenVINO, measured in one run on the same inputs.

The model is the learnable-vector method on ViT-L/14@336 at 518 px (random weights: speed does not depend on the
weight values; no pretrained checkpoint is needed or claimed), exported with ``zsad.deploy.graph.export_graph``
exactly as ``zsad export --format onnx|openvino`` does. Each runtime scores the same ``--batch`` images
``--runs`` times after one warm-up run; images/s use the median run. The exports are also checked against eager
(max |difference| of scores and maps). CPU seconds are given next to wall seconds because other processes on a
shared machine can stretch wall times.

Usage:
    python experiments/benchmarks/deploy_benchmark.py                                   # ViT-L/14@336, 518 px
    python experiments/benchmarks/deploy_benchmark.py --backbone tiny --image_size 98 --batch 8 --runs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from zsad.deploy.graph import export_graph
from zsad.deploy.runtime import GraphRunner
from zsad.methods import LearnableVectors


def _time(fn: Callable[[], tuple[np.ndarray, np.ndarray]], runs: int) -> tuple[list[float], list[float], tuple]:
    out = fn()  # warm-up (allocations, OpenVINO / ORT first-run set-up)
    wall, cpu = [], []
    for _ in range(runs):
        start = (time.perf_counter(), time.process_time())
        out = fn()
        wall.append(time.perf_counter() - start[0])
        cpu.append(time.process_time() - start[1])
    return wall, cpu, out


def main() -> None:
    """Run the benchmark and print one JSON line per runtime plus the speed ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_l_14_336")
    parser.add_argument("--image_size", type=int, default=518)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", default=None, help="Also write the results as JSON here.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LearnableVectors(backbone=args.backbone, weights="random", image_size=args.image_size, evaluator=False)
    model.eval()
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))

    def eager() -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            out = model.model(images)
        return out.pred_score.numpy(), out.anomaly_map.numpy()

    results = {}
    wall, cpu, reference = _time(eager, args.runs)
    results["pytorch"] = {"wall_s": wall, "cpu_s": cpu}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fmt, suffix in (("onnxruntime", "onnx", ".onnx"), ("openvino", "openvino", ".xml")):
            start = time.perf_counter()
            path = export_graph(model, Path(tmp) / f"model{suffix}", fmt=fmt)
            export_s = time.perf_counter() - start
            runner = GraphRunner(path, threads=args.threads)
            wall, cpu, out = _time(lambda runner=runner: runner(images.numpy()), args.runs)
            diff = max(float(np.abs(out[0] - reference[0]).max()), float(np.abs(out[1] - reference[1]).max()))
            results[name] = {"wall_s": wall, "cpu_s": cpu, "export_s": export_s, "max_abs_diff_vs_pytorch": diff}
            del runner
    for name, result in results.items():
        result["images_per_s"] = args.batch / statistics.median(result["wall_s"])
        print(json.dumps({"runtime": name, **result}))  # noqa: T201
    base = results["pytorch"]["images_per_s"]
    ratios = {name: result["images_per_s"] / base for name, result in results.items()}
    summary = {
        "backbone": args.backbone,
        "weights": "random",
        "image_size": args.image_size,
        "batch": args.batch,
        "runs": args.runs,
        "threads": args.threads,
        "speedup_vs_pytorch": ratios,
    }
    print(json.dumps(summary))  # noqa: T201
    if args.output:
        Path(args.output).write_text(json.dumps({"summary": summary, "results": results}, indent=2))
        print(f"wrote {args.output}")  # noqa: T201


if __name__ == "__main__":
    main()
