#!/usr/bin/env python
"""Epoch time of the learnable-vector method with and without the frozen-feature cache (``zsad.backbone.cache``).

Three Lightning fits of the same model on the same generated training set (the labelled test split of an MVTec-like
dataset, as in the cross-dataset protocol):

1. ``uncached`` — every epoch runs the frozen encoder on every image (what a run without the cache does);
2. ``extract`` — first run with ``feature_cache``: the encoder runs once per image into the store, then the epochs;
3. ``cached`` — a later run: the store is complete, the epochs replay the stored features (no pixels are read).

Epoch times come from ``on_train_epoch_start/end`` (data loading, forward, loss, backward, optimiser step); the
extraction is reported separately. CPU seconds of the process are given next to wall seconds because other processes
on a shared machine can stretch wall times several-fold.

Usage:
    python experiments/benchmarks/feature_cache_benchmark.py                                  # ViT-L/14@336, 518 px
    python experiments/benchmarks/feature_cache_benchmark.py --backbone tiny --image_size 98 --images 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from zsad.data import CrossDataset
from zsad.data.synthetic import make_mvtec_like
from zsad.methods import LearnableVectors


class EpochTimer(Callback):
    """Wall and process-CPU seconds of every training epoch."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001, D102
        self._start = (time.perf_counter(), time.process_time())

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001, D102
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])


def fit(
    args: argparse.Namespace, data: Path, cache: Path | None, epochs: int
) -> tuple[EpochTimer, float, torch.Tensor]:
    """One fit; returns the epoch timer, the total wall seconds and the trained vectors."""
    seed_everything(111)
    model = LearnableVectors(
        backbone=args.backbone, weights="random", image_size=args.image_size, evaluator=False,
        feature_cache=None if cache is None else str(cache),
    )
    datamodule = CrossDataset(
        train={"dataset": "mvtec", "root": str(data)}, test={"dataset": "mvtec", "root": str(data)},
        train_batch_size=args.batch_size, num_workers=args.workers, seed=111,
    )
    timer = EpochTimer()
    trainer = Trainer(
        max_epochs=epochs, accelerator=args.accelerator, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[timer],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    return timer, time.perf_counter() - start, model.model.vectors.detach().cpu().clone()


def main() -> None:
    """Run the three fits and print the epoch-time ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="openai/clip-vit-large-patch14-336")
    parser.add_argument("--image_size", type=int, default=518)
    parser.add_argument("--images", type=int, default=8, help="Training images (categories x (good + defects)).")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--uncached_epochs", type=int, default=1)
    parser.add_argument("--cached_epochs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workdir", default=None, help="Where data and cache go (default: a temporary folder).")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="zsad_cache_bench_"))
    # Two categories, each with good test images and one image per defect type (at most four types).
    per_category = max(2, args.images // 2)
    n_defects = min(4, per_category // 2)
    defects = ("scratch", "spot", "crack", "missing")[:n_defects]
    data = make_mvtec_like(work / "data", categories=("alpha", "beta"), domain="a",
                           n_test_good=per_category - n_defects, n_test_defect=1, defects=defects, size=256)
    n_images = len(list(data.glob("*/test/*/*.png")))
    cache = work / "cache"
    uncached, _, vectors_plain = fit(args, data, None, args.uncached_epochs)
    first, first_total, _ = fit(args, data, cache, 1)
    cached, _, _ = fit(args, data, cache, args.cached_epochs)
    _, _, vectors_cached = fit(args, data, cache, args.uncached_epochs)
    result = {
        "backbone": args.backbone, "image_size": args.image_size, "images": n_images, "batch_size": args.batch_size,
        "threads": torch.get_num_threads(), "device": args.accelerator,
        "uncached_epoch_s": statistics.median(uncached.wall), "uncached_epoch_cpu_s": statistics.median(uncached.cpu),
        "cached_epoch_s": statistics.median(cached.wall), "cached_epoch_cpu_s": statistics.median(cached.cpu),
        "extraction_s": first_total - sum(first.wall),
        "cache_mib": sum(p.stat().st_size for p in cache.rglob("*.safetensors")) / 2**20,
        "max_vector_difference": (vectors_plain - vectors_cached).abs().max().item(),
        "vectors_moved": vectors_plain.abs().max().item(),
    }
    result["speedup_wall"] = result["uncached_epoch_s"] / result["cached_epoch_s"]
    result["speedup_cpu"] = result["uncached_epoch_cpu_s"] / result["cached_epoch_cpu_s"]
    print(  # noqa: T201
        f"feature cache, {args.backbone} at {args.image_size} px, {n_images} training images, batch "
        f"{args.batch_size}, {args.accelerator} ({torch.get_num_threads()} threads)\n"
        f"  epoch without cache: {result['uncached_epoch_s']:.2f} s wall, {result['uncached_epoch_cpu_s']:.2f} s CPU\n"
        f"  epoch over the cache: {result['cached_epoch_s']:.3f} s wall, {result['cached_epoch_cpu_s']:.3f} s CPU "
        f"(median of {args.cached_epochs})\n"
        f"  speed-up: {result['speedup_wall']:.0f}x wall, {result['speedup_cpu']:.0f}x CPU\n"
        f"  one-off extraction: {result['extraction_s']:.1f} s; store: {result['cache_mib']:.1f} MiB\n"
        f"  same vectors: max |cached - uncached| after {args.uncached_epochs} epoch(s) = "
        f"{result['max_vector_difference']:.2e}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
