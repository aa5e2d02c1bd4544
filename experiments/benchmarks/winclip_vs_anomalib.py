#!/usr/bin/env python
"""Images/s of zsad's WinCLIP against anomalib 2.7's WinClip, same weights, same images, same run.

anomalib's ``WinClipModel`` is built with its default architecture (open_clip ``ViT-B-16-plus-240``, 240 px) and
``pretrained=None`` (random weights, nothing downloaded); its open_clip state dict is converted with
``zsad convert-weights`` into a Hugging Face directory that zsad's ``WinCLIPModel`` loads. Both score the same random
images (zero-shot, or WinCLIP+ with ``--k_shot``); text embeddings are computed before timing (both compute them once
per class). The two models are timed alternately, ``--repeats`` times each, and the median is reported, so a load
spike on a shared machine hits both. The outputs are compared too (max absolute differences).

Usage:
    python experiments/benchmarks/winclip_vs_anomalib.py                      # 4 images, batch 2, 1 thread
    python experiments/benchmarks/winclip_vs_anomalib.py --k_shot 2 --threads 2 --output runs/bench/winclip.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    """Run the comparison and print (and optionally write) the result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="Images per timed pass.")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="Timed passes per model (median reported).")
    parser.add_argument("--k_shot", type=int, default=0, help="WinCLIP+ references (0 = zero-shot).")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads.")
    parser.add_argument("--output", type=Path, default=None, help="Write the result as JSON here.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import anomalib.models.image.winclip.torch_model as anomalib_winclip

    from zsad.backbone import create_backbone
    from zsad.convert_weights import convert_weights
    from zsad.methods.winclip import WinCLIPModel

    anomalib_winclip.PRETRAINED = None  # random weights of the default architecture, no download
    torch.manual_seed(0)
    reference = anomalib_winclip.WinClipModel(class_name="bottle").eval()
    size = int(reference.clip.visual.image_size[0])
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(reference.clip.state_dict(), Path(tmp) / "open_clip.pt")
        converted = convert_weights(
            "open_clip", anomalib_winclip.BACKBONE, Path(tmp) / "open_clip.pt", Path(tmp) / "hf"
        )
        ours = WinCLIPModel(create_backbone(str(converted), image_size=size)).eval()

    images = torch.randn(args.images, 3, size, size)
    memory = None
    if args.k_shot:
        refs = torch.randn(args.k_shot, 3, size, size)
        reference.setup(reference_images=refs)
        memory = ours.encode_references(refs)
    ours.text_embeddings("bottle")  # prompt features cached, as anomalib's are after setup

    def run_anomalib() -> list:
        return [reference(chunk) for chunk in images.split(args.batch_size)]

    def run_zsad() -> list:
        return [ours(chunk, "bottle", memory) for chunk in images.split(args.batch_size)]

    times: dict[str, list[float]] = {"anomalib": [], "zsad": []}
    outputs = {}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for name, fn in (("anomalib", run_anomalib), ("zsad", run_zsad)):
                start = time.perf_counter()
                outputs[name] = fn()
                times[name].append(time.perf_counter() - start)
    score_diff = max(float((a.pred_score - b.pred_score).abs().max()) for a, b in zip(*outputs.values(), strict=True))
    map_diff = max(float((a.anomaly_map - b.anomaly_map).abs().max()) for a, b in zip(*outputs.values(), strict=True))
    rate = {name: args.images / statistics.median(t) for name, t in times.items()}
    result = {
        "backbone": f"open_clip {anomalib_winclip.BACKBONE} (random weights) at {size} px",
        "mode": f"{args.k_shot}-shot" if args.k_shot else "zero-shot",
        "images": args.images,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "images_per_s": rate,
        "ratio_zsad_over_anomalib": rate["zsad"] / rate["anomalib"],
        "seconds": times,
        "max_abs_diff": {"pred_score": score_diff, "anomaly_map": map_diff},
    }
    print(json.dumps(result, indent=2))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2))
        print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
