#!/usr/bin/env python
"""Time and memory of zsad's exact pixel metrics on one large category, against anomalib's ``AUPRO``.

Default size: 168 maps of 518 x 518 = 45.1 M pixels, the largest MVTec AD category (pill) at the ZSAD resolution.
Synthetic maps (smoothed noise, blob and crack defects, some missed, false-positive blobs, float32) are generated once;
each measurement then runs in a forked child so its peak RSS is its own:

* ``zsad``: :func:`zsad.metrics.pixel_metrics` — pixel AUROC, AP, F1-max and AU-PRO from one sort.
* ``zsad-aupro``: :func:`zsad.metrics.aupro` alone.
* ``anomalib-aupro``: ``anomalib.metrics.AUPRO`` (update with the whole tensor, then compute), on the same data.
* ``evaluator`` (``--evaluator``): the evaluator's path — ``PerCategoryMetrics.update`` in batches of 8, then compute.
* ``anomalib-auroc`` (``--anomalib-all``): anomalib's pixel ``AUROC`` (torchmetrics ROC, exact), for scale.

Peak memory is the child's ``VmHWM``; "extra" subtracts the RSS at fork (the shared input data, ~5 B/pixel, and the
imported libraries).

Usage:
    python experiments/benchmarks/metrics_benchmark.py                    # 45 M pixels
    python experiments/benchmarks/metrics_benchmark.py --pixels 5e6       # quicker
    python experiments/benchmarks/metrics_benchmark.py --evaluator --anomalib-all
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

SIDE = 518
DEFAULT_PIXELS = 168 * SIDE * SIDE
# MVTec AD test images per category (good + defective): 1,725 images, 462.9 M pixels at 518 x 518.
MVTEC_TEST_SIZES = {
    "bottle": 83, "cable": 150, "capsule": 132, "carpet": 117, "grid": 78, "hazelnut": 110, "leather": 124,
    "metal_nut": 115, "pill": 167, "screw": 160, "tile": 117, "toothbrush": 42, "transistor": 100, "wood": 79,
    "zipper": 151,
}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def make_category(n_images: int, side: int = SIDE, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 maps in a narrow CLIP-like band with defects; ~85% of the images anomalous, as in MVTec's pill."""
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    maps = torch.empty(n_images, side, side, dtype=torch.float32)
    masks = torch.zeros(n_images, side, side, dtype=torch.bool)
    yy, xx = np.mgrid[0:side, 0:side]
    for start in range(0, n_images, 16):  # chunks keep the float temporaries small
        stop = min(start + 16, n_images)
        noise = torch.rand(stop - start, 1, 40, 40, generator=generator)
        maps[start:stop] = torch.nn.functional.interpolate(noise, size=(side, side), mode="bicubic")[:, 0]
    maps.mul_(0.3)
    for i in range(n_images):
        mask = np.zeros((side, side), dtype=bool)
        if rng.random() < 0.85:
            for _ in range(rng.integers(1, 4)):
                cy, cx = rng.integers(30, side - 30, 2)
                if rng.random() < 0.7:  # blob
                    ry, rx = rng.integers(4, 70, 2)
                    mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
                else:  # thin crack
                    angle, length = rng.uniform(0, np.pi), rng.integers(40, 200)
                    t = np.linspace(-length / 2, length / 2, 4 * length)
                    ys = np.clip((cy + t * np.sin(angle)).astype(int), 0, side - 1)
                    xs = np.clip((cx + t * np.cos(angle)).astype(int), 0, side - 1)
                    mask[ys, xs] = True
        strength = rng.uniform(0.0, 0.5) if rng.random() < 0.8 else 0.0  # some defects missed entirely
        amap = maps[i].numpy()
        amap += strength * mask
        for _ in range(rng.integers(0, 3)):  # false-positive blobs
            cy, cx = rng.integers(0, side, 2)
            amap += rng.uniform(0.1, 0.4) * np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 15.0**2)))
        masks[i] = torch.from_numpy(mask)
    # Squash into a narrow band like softmax/cosine maps (many near-equal float32 values, realistic ties).
    maps.mul_(0.027).add_(0.492)
    return maps, masks


# --------------------------------------------------------------------------------------------------------------------
# Measurements (run in forked children)
# --------------------------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _child(task: Callable[[], Any], queue: mp.Queue) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    rss_at_fork = _status_kib("VmRSS")
    start = time.perf_counter()
    try:
        value = task()
        error = None
    except Exception as exc:  # noqa: BLE001 - reported by the parent
        value, error = None, repr(exc)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    queue.put(
        {
            "value": value,
            "seconds": seconds,
            "peak_mib": peak / 1024,
            "extra_mib": (peak - rss_at_fork) / 1024,
            "error": error,
        }
    )


def measure(name: str, task: Callable[[], Any]) -> dict[str, Any]:
    """Run ``task`` in a forked child; return its value, wall time and peak memory."""
    context = mp.get_context("fork")  # the child shares the generated data copy-on-write
    queue = context.Queue()
    process = context.Process(target=_child, args=(task, queue))
    process.start()
    result = queue.get()
    process.join()
    result["name"] = name
    status = f"ERROR {result['error']}" if result["error"] else f"value {result['value']}"
    print(
        f"{name:16s} {result['seconds']:8.2f} s   peak RSS {result['peak_mib']:8.0f} MiB   "
        f"extra {result['extra_mib']:8.0f} MiB   {status}",
        flush=True,
    )
    return result


def run_mvtec_sized(fpr_limit: float, batch_size: int = 8) -> None:
    """The evaluator over an MVTec-AD-sized test set: all samples stored, then computed one category at a time."""
    from anomalib.data import ImageBatch

    from zsad.metrics.per_category import PerCategoryMetrics, unweighted_mean

    def evaluate() -> dict[str, float]:
        state = PerCategoryMetrics(fpr_limit=fpr_limit)
        start = time.perf_counter()
        for seed, (category, n_images) in enumerate(MVTEC_TEST_SIZES.items()):
            for s in range(0, n_images, batch_size):
                size = min(batch_size, n_images - s)
                maps, masks = make_category(size, seed=1000 * seed + s)
                state.update(
                    ImageBatch(
                        image=torch.zeros(size, 3, 4, 4),
                        gt_label=masks.flatten(1).any(1).long(),
                        gt_mask=masks,
                        anomaly_map=maps,
                        pred_score=maps.flatten(1).amax(1),
                        image_path=[f"/bench/{category}/test/x/{i:04d}.png" for i in range(s, s + size)],
                    )
                )
        generated = time.perf_counter() - start
        rss_stored = _status_kib("VmRSS") / 1024
        start = time.perf_counter()
        per_category = state.compute()["metrics"]
        computed = time.perf_counter() - start
        mean = unweighted_mean(per_category, state.columns)
        return {
            "generate+update s": round(generated, 1),
            "compute s": round(computed, 1),
            "RSS with all maps stored MiB": round(rss_stored),
            "mean pixel_aupro": round(mean["pixel_aupro"], 4),
        }

    print(
        f"MVTec-AD-sized test set: {sum(MVTEC_TEST_SIZES.values())} maps, "
        f"{sum(MVTEC_TEST_SIZES.values()) * SIDE * SIDE / 1e6:.1f} M pixels",
        flush=True,
    )
    measure("evaluator-mvtec", evaluate)


def main() -> None:
    """Generate one category, time every implementation on it, print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pixels", type=float, default=DEFAULT_PIXELS, help="total pixels (rounded to 518x518 maps)")
    parser.add_argument("--fpr-limit", type=float, default=0.3)
    parser.add_argument("--evaluator", action="store_true", help="also time the evaluator path (update + compute)")
    parser.add_argument("--anomalib-all", action="store_true", help="also time anomalib's pixel AUROC")
    parser.add_argument("--skip-anomalib", action="store_true", help="only time zsad")
    parser.add_argument(
        "--mvtec",
        action="store_true",
        help="only run the evaluator on a whole MVTec-AD-sized test set (15 categories, 1,725 maps of 518 x 518, "
        "generated batch by batch as a model would produce them) and report its peak memory",
    )
    args = parser.parse_args()
    if args.mvtec:
        run_mvtec_sized(args.fpr_limit)
        return

    # The field-less torchmetrics cores of anomalib's AUPRO / AUROC (the public classes only take batches).
    from anomalib.metrics.aupro import _AUPRO
    from anomalib.metrics.auroc import _AUROC

    from zsad.metrics import aupro, pixel_metrics
    from zsad.metrics.per_category import PerCategoryMetrics

    n_images = max(1, round(args.pixels / (SIDE * SIDE)))
    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, numpy {np.__version__}, "
        f"{os.cpu_count()} CPUs (load {os.getloadavg()[0]:.1f}), torch threads in children: "
        f"{os.environ.get('BENCH_THREADS', '1')}"
    )
    start = time.perf_counter()
    maps, masks = make_category(n_images)
    n_pixels = maps.numel()
    print(
        f"data: {n_images} x {SIDE} x {SIDE} = {n_pixels / 1e6:.1f} M pixels, {masks.float().mean():.2%} anomalous, "
        f"generated in {time.perf_counter() - start:.1f} s",
        flush=True,
    )

    limit = args.fpr_limit
    results = {"zsad": measure("zsad", lambda: pixel_metrics(maps, masks, fpr_limit=limit))}
    results["zsad-aupro"] = measure("zsad-aupro", lambda: aupro(maps, masks, fpr_limit=limit))

    if args.evaluator:

        def evaluator_path() -> float:
            from anomalib.data import ImageBatch

            state = PerCategoryMetrics(fpr_limit=limit)
            for s in range(0, n_images, 8):
                batch = ImageBatch(
                    image=torch.zeros(min(8, n_images - s), 3, 4, 4),
                    gt_label=masks[s : s + 8].flatten(1).any(1).long(),
                    gt_mask=masks[s : s + 8],
                    anomaly_map=maps[s : s + 8],
                    pred_score=maps[s : s + 8].flatten(1).amax(1),
                    image_path=[f"/bench/pill/test/x/{i:04d}.png" for i in range(s, min(s + 8, n_images))],
                )
                state.update(batch)
            return state.compute()["metrics"]["pill"]["pixel_aupro"]

        results["evaluator"] = measure("evaluator", evaluator_path)

    if not args.skip_anomalib:

        def anomalib_aupro() -> float:
            metric = _AUPRO(fpr_limit=limit)
            metric.update(maps, masks)
            return float(metric.compute())

        results["anomalib-aupro"] = measure("anomalib-aupro", anomalib_aupro)
        if args.anomalib_all:

            def anomalib_auroc() -> float:
                metric = _AUROC()
                metric.update(maps, masks)
                return float(metric.compute())

            results["anomalib-auroc"] = measure("anomalib-auroc", anomalib_auroc)

    print()
    ours, theirs = results["zsad-aupro"], results.get("anomalib-aupro")
    if theirs and not theirs["error"]:
        difference = abs(ours["value"] - theirs["value"])
        print(
            f"AU-PRO  zsad {ours['value']:.6f}  anomalib {theirs['value']:.6f}  |diff| {difference:.2e}"
            f"  ({'OK' if difference <= 1e-4 else 'MISMATCH'} at 1e-4)"
        )
        print(
            f"time    anomalib AUPRO / zsad AU-PRO  = {theirs['seconds'] / ours['seconds']:.1f}x;  "
            f"anomalib AUPRO / zsad all four pixel metrics = {theirs['seconds'] / results['zsad']['seconds']:.1f}x"
        )
        print(
            f"memory  extra peak: zsad all four {results['zsad']['extra_mib']:.0f} MiB, zsad AU-PRO "
            f"{ours['extra_mib']:.0f} MiB, anomalib AUPRO {theirs['extra_mib']:.0f} MiB "
            f"({results['zsad']['extra_mib'] / n_pixels * 2**20:.1f} vs {theirs['extra_mib'] / n_pixels * 2**20:.1f} "
            f"B/pixel)"
        )
    if math.isnan(results["zsad"]["value"]["pixel_aupro"]):
        sys.exit("zsad AU-PRO is NaN: the synthetic data has no regions")


if __name__ == "__main__":
    main()
