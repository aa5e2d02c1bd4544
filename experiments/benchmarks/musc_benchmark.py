#!/usr/bin/env python
"""Time and peak memory of MuSc on one 200-image category at 518 px with ViT-L/14@336 (random weights).

Two stages, measured apart because they scale differently:

1. ``scoring`` — the loop of :meth:`zsad.methods.musc.MuScModel.score_maps` on real-shaped random tokens of the
   whole category (``[200, 4, 1369, 1024]`` float16, as the official stores them), timed per stage: LNAMD of every
   image for each (r, layer) — a fixed cost of the category, always measured in full — and MSM, a loop over query
   images of identical cost. MSM costs O(N²·G⁴·C) per (r, layer), about 1.8 PFLOP for N = 200: hours on a CPU.
   ``--queries q`` scores the first ``q`` images against all 199 others (every LNAMD feature set of the category is
   still computed and held, so the memory is the full category's) and the MSM time is extrapolated linearly to all
   N queries. ``--queries 0`` (default on CUDA) scores the full category.
2. ``encoder`` — the ViT-L/14 forward at 518 per image on ``--encode_images`` images, extrapolated to N.

Times are given as ``[wall, cpu]`` seconds: on a shared machine other processes stretch wall times, the process CPU
time of a 1-thread run does not.

Peak memory: the process's peak RSS (``ru_maxrss``) and, on CUDA, ``torch.cuda.max_memory_allocated``. The JSON
printed at the end says which figures are measured and which extrapolated.

Usage:
    python experiments/benchmarks/musc_benchmark.py                          # CPU: 1 query, 2 encoded images
    python experiments/benchmarks/musc_benchmark.py --device cuda --queries 0 --encode_images 8
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from zsad.backbone import create_backbone
from zsad.methods.musc import MuScModel, lnamd, mutual_k, mutual_scores
from zsad.methods.musc.torch_model import LNAMD_CHUNK


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work so that timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    """Measure both stages and print (and optionally write) the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="images in the category (N)")
    parser.add_argument("--image_size", type=int, default=518)
    parser.add_argument("--backbone", default="vit_l_14_336")
    parser.add_argument("--queries", type=int, default=None, help="query images scored (0: all; default 1 on CPU)")
    parser.add_argument("--encode_images", type=int, default=2, help="images through the encoder")
    parser.add_argument("--ref_chunk", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip_encoder", action="store_true")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    queries = args.queries if args.queries is not None else (0 if device.type == "cuda" else 1)
    n = args.images

    backbone = create_backbone(args.backbone, weights="random", image_size=args.image_size, load_text=False).to(device)
    model = MuScModel(backbone, ref_chunk=args.ref_chunk).to(device).eval()
    grid = args.image_size // backbone.patch_size
    report: dict[str, object] = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "images": n,
        "image_size": args.image_size,
        "grid": grid,
        "backbone": f"{args.backbone} (random weights)",
    }

    # 1. scoring on real-shaped random tokens of the whole category, generated image by image straight into the
    # stored dtype (a single float32 randn of the category would itself take 4.5 GB and dominate the peak).
    grid_shape = (grid, grid)
    tokens = torch.empty(n, len(model.layers), grid * grid, backbone.width, dtype=model.feature_dtype, device=device)
    for i in range(n):
        tokens[i] = torch.randn(tokens.shape[1:], device=device)
    embedding = torch.nn.functional.normalize(torch.randn(n, backbone.embed_dim, device=device), dim=-1)
    rss_tokens = peak_rss_gib()
    measured = list(range(n)) if queries in (0, None) or queries >= n else list(range(queries))
    k = mutual_k(n, model.k_ratio)
    references = [[j for j in range(n) if j != i] for i in measured]
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # The loop of MuScModel.score_maps, timed per stage: LNAMD is a fixed cost of the category, MSM a cost per query.
    clock = {"lnamd": [0.0, 0.0], "msm": [0.0, 0.0]}
    per_r = []
    for r in model.r_list:
        per_layer = []
        for layer in range(len(model.layers)):
            wall, cpu = time.perf_counter(), time.process_time()
            features = torch.cat(
                [lnamd(tokens[start : start + LNAMD_CHUNK, layer], grid_shape, r) for start in range(0, n, LNAMD_CHUNK)]
            )
            sync(device)
            clock["lnamd"][0] += time.perf_counter() - wall
            clock["lnamd"][1] += time.process_time() - cpu
            wall, cpu = time.perf_counter(), time.process_time()
            per_layer.append(mutual_scores(features, measured, references, k, args.ref_chunk))
            sync(device)
            clock["msm"][0] += time.perf_counter() - wall
            clock["msm"][1] += time.process_time() - cpu
            del features
        per_r.append(torch.stack(per_layer).mean(dim=0))
    wall, cpu = time.perf_counter(), time.process_time()
    maps = torch.nn.functional.interpolate(
        torch.stack(per_r).mean(dim=0).view(len(measured), 1, grid, grid),
        size=(args.image_size, args.image_size),
        mode="bilinear",
        align_corners=True,
    )[:, 0]
    scores = model.rescore(torch.rand(n, dtype=torch.float64, device=device), embedding)
    sync(device)
    rest = (time.perf_counter() - wall, time.process_time() - cpu)
    full = len(measured) == n
    scale = 1 if full else n / len(measured)
    report["scoring"] = {
        "queries_measured": len(measured),
        "k": k,
        "lnamd_seconds_wall_cpu": [round(v, 1) for v in clock["lnamd"]],
        "msm_seconds_wall_cpu_measured": [round(v, 1) for v in clock["msm"]],
        "msm_seconds_wall_cpu_full_category": [round(v * scale, 1) for v in clock["msm"]],
        "upsample_rscin_seconds_wall_cpu": [round(v, 2) for v in rest],
        "full_category_seconds_wall_cpu": [
            round(clock["lnamd"][i] + clock["msm"][i] * scale + rest[i] * scale, 1) for i in range(2)
        ],
        "msm_extrapolated": not full,
        "tokens_gib": round(tokens.numel() * tokens.element_size() / 2**30, 2),
        "peak_rss_gib_after_tokens": round(rss_tokens, 2),
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "cuda_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "maps_shape": list(maps.shape),
        "rscin_finite": bool(torch.isfinite(scores).all()),
    }
    del tokens, maps

    # 2. encoder per image (no warm-up on CPU: the first image is as slow as the others there)
    if not args.skip_encoder and args.encode_images > 0:
        images = torch.randn(args.encode_images, 3, args.image_size, args.image_size, device=device)
        if device.type == "cuda":
            model.encode(images[:1])  # CUDA context and kernels
        sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(args.encode_images):
            model.encode(images[i : i + 1])
        sync(device)
        per_image = (
            (time.perf_counter() - wall) / args.encode_images,
            (time.process_time() - cpu) / args.encode_images,
        )
        report["encoder"] = {
            "images_measured": args.encode_images,
            "seconds_per_image_wall_cpu": [round(v, 2) for v in per_image],
            "full_category_seconds_wall_cpu_extrapolated": [round(v * n, 1) for v in per_image],
        }
        report["total_seconds_wall_cpu_extrapolated"] = [
            round(per_image[i] * n + report["scoring"]["full_category_seconds_wall_cpu"][i], 1) for i in range(2)
        ]
    report["peak_rss_gib"] = round(peak_rss_gib(), 2)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
        print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
