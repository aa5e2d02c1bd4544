#!/usr/bin/env python
"""Time and peak memory of MuSc on one 200-image category at 518 px with ViT-L/14@336 (random weights).

Two stages, measured apart because they scale differently:

1. ``scoring`` — LNAMD + MSM + RsCIN (:meth:`zsad.methods.musc.MuScModel.score_maps` / ``rescore``) on real-shaped
   random tokens of the whole category (``[200, 4, 1369, 1024]`` float16, as the official stores them). MSM costs
   O(N²·G⁴·C) per (r, layer): about 1.8 PFLOP for N = 200, hours on a CPU. ``--queries q`` scores only the first
   ``q`` images against all 199 others (every LNAMD feature of the category is still computed and held, so the
   memory is the full category's) and the MSM time is extrapolated linearly to all N queries (MSM is a loop over
   query images of identical cost). ``--queries 0`` (default on CUDA) scores the full category.
2. ``encoder`` — the ViT-L/14 forward at 518 per image on ``--encode_images`` images, extrapolated to N.

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
from zsad.methods.musc import MuScModel


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


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

    # 1. scoring on real-shaped random tokens of the whole category
    tokens = torch.randn(n, len(model.layers), grid * grid, backbone.width, device=device).to(model.feature_dtype)
    embedding = torch.nn.functional.normalize(torch.randn(n, backbone.embed_dim, device=device), dim=-1)
    measured = list(range(n)) if queries in (0, None) or queries >= n else list(range(queries))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start, cpu_start = time.perf_counter(), time.process_time()
    maps = model.score_maps(tokens, (args.image_size, args.image_size), queries=measured)
    scores = model.rescore(torch.rand(n, dtype=torch.float64, device=device), embedding)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    full = len(measured) == n
    report["scoring"] = {
        "queries_measured": len(measured),
        "seconds_measured": round(seconds, 2),
        "cpu_seconds_measured": round(time.process_time() - cpu_start, 2),
        "seconds_full_category": round(seconds * (1 if full else n / len(measured)), 1),
        "full_category_extrapolated": not full,
        "tokens_gib": round(tokens.numel() * tokens.element_size() / 2**30, 2),
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "cuda_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "maps_shape": list(maps.shape),
        "rscin_finite": bool(torch.isfinite(scores).all()),
    }
    del tokens, maps

    # 2. encoder per image
    if not args.skip_encoder and args.encode_images > 0:
        images = torch.randn(args.encode_images, 3, args.image_size, args.image_size, device=device)
        model.encode(images[:1])  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(args.encode_images):
            model.encode(images[i : i + 1])
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_image = (time.perf_counter() - start) / args.encode_images
        report["encoder"] = {
            "images_measured": args.encode_images,
            "seconds_per_image": round(per_image, 2),
            "seconds_full_category_extrapolated": round(per_image * n, 1),
        }
        report["total_seconds_extrapolated"] = round(per_image * n + report["scoring"]["seconds_full_category"], 1)
    report["peak_rss_gib"] = round(peak_rss_gib(), 2)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
        print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
