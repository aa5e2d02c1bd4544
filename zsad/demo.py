"""``zsad demo`` / ``make demo``: the learnable-vector method end to end on generated data, in a few minutes on CPU.

1. Writes two MVTec-layout datasets with :func:`zsad.data.synthetic.make_mvtec_like`: domain A (the source, whose
   labelled test split trains the vectors) and domain B (the target, unseen categories).
2. Scores domain B with the *initial* (untrained) vectors — the reference that training must beat.
3. Runs ``zsad fit --config configs/learnable_vectors/demo.yaml --test_after_fit true`` in-process (the same
   LightningCLI path users run), with the data roots, backbone and output folders overridden: it trains on domain A
   over the frozen-feature cache, then tests on domain B, printing the per-category table and writing
   ``metrics.{csv,json,md}``, overlays and ROC / PRO curves.
4. Prints pixel AUROC on domain B before and after training, and where everything went.

The default backbone is the tiny random-weight CLIP: the numbers then show that the pipeline works and that training
transfers to unseen categories, nothing about CLIP. ``--backbone openai/clip-vit-large-patch14-336`` (``make demo
BACKBONE=...``) runs the same with real weights at 518 px.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zsad

DEFAULT_CONFIG = Path(zsad.__file__).resolve().parents[1] / "configs" / "learnable_vectors" / "demo.yaml"
REAL_BACKBONE = "openai/clip-vit-large-patch14-336"
SOURCE_CATEGORIES = ("alpha", "beta", "gamma")
TARGET_CATEGORIES = ("delta", "epsilon")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Command-line arguments of ``zsad demo``."""
    parser = argparse.ArgumentParser(
        prog="zsad demo",
        description="Generate a source and a target dataset, fit the learnable vectors on the source's labelled test "
        "split, test on the target: per-category table, overlays, before/after pixel AUROC.",
    )
    parser.add_argument("--backbone", default="tiny",
                        help=f"`tiny` (random weights, default) or a CLIP hub id / directory, e.g. {REAL_BACKBONE}.")
    parser.add_argument("--weights", choices=["pretrained", "random"], default=None,
                        help="Default: random for `tiny`, pretrained otherwise.")
    parser.add_argument("--output", default="runs/demo", help="Output folder (data, cache, checkpoints, results).")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="LightningCLI config of the run.")
    parser.add_argument("--image_size", type=int, default=None, help="Input side (default: 98 tiny, 518 otherwise).")
    parser.add_argument("--epochs", type=int, default=None, help="Override trainer.max_epochs.")
    parser.add_argument("--source_look", choices=["a", "b"], default="b",
                        help="Look of the generated source images (make_mvtec_like's domain).")
    parser.add_argument("--target_look", choices=["a", "b"], default="b",
                        help="Look of the target images; a different look from the source also shifts colours and "
                        "textures, which random-weight features cannot bridge.")
    parser.add_argument("--data_size", type=int, default=128, help="Side of the generated images in pixels.")
    parser.add_argument("--save_images", type=int, default=4, help="Overlays per target category.")
    parser.add_argument("--skip_initial", action="store_true", help="Do not score the target before training.")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 1 for the tiny model, which is slower with more; torch's "
                        "default otherwise).")
    return parser.parse_args(list(argv))


def make_data(root: Path, size: int, source_look: str, target_look: str) -> tuple[Path, Path]:
    """Write domain A (source) and domain B (target); both are rewritten so that every run starts the same."""
    from zsad.data.synthetic import make_mvtec_like

    domain_a, domain_b = root / "domain_A", root / "domain_B"
    for folder in (domain_a, domain_b):
        shutil.rmtree(folder, ignore_errors=True)
    make_mvtec_like(domain_a, categories=SOURCE_CATEGORIES, domain=source_look, n_test_good=4, n_test_defect=2,
                    size=size, seed=0)
    make_mvtec_like(domain_b, categories=TARGET_CATEGORIES, domain=target_look, n_test_good=4, n_test_defect=2,
                    size=size, seed=1)
    return domain_a, domain_b


def cli_args(args: argparse.Namespace, domain_a: Path, domain_b: Path, weights: str, image_size: int) -> list[str]:
    """The LightningCLI arguments shared by the initial test and the fit."""
    out = Path(args.output)
    overrides = [
        "--config", args.config,
        f"--data.init_args.train={{dataset: mvtec, root: {domain_a}, name: domain_A}}",
        f"--data.init_args.test={{dataset: mvtec, root: {domain_b}, name: domain_B}}",
        f"--model.init_args.backbone={args.backbone}",
        f"--model.init_args.weights={weights}",
        f"--model.init_args.image_size={image_size}",
        f"--model.init_args.feature_cache={out / 'feature_cache'}",
        f"--model.init_args.evaluator.init_args.save_images={args.save_images}",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
    ]
    if args.epochs is not None:
        overrides.append(f"--trainer.max_epochs={args.epochs}")
    return overrides


def _run_cli(args: list[str]) -> Any:  # noqa: ANN401
    """``zsad <args>`` in-process (LightningCLI warns when it also sees this process's own ``sys.argv``)."""
    from zsad.cli import build_cli

    saved = sys.argv
    sys.argv = saved[:1]
    try:
        return build_cli(args)
    finally:
        sys.argv = saved


def _pixel_auroc(cli: Any) -> float | None:  # noqa: ANN401
    results = getattr(cli.model.evaluator, "results_by_stage", {}).get("test", {})
    return results.get("mean", {}).get("pixel_auroc")


def banner(backbone: str, weights: str, image_size: int) -> str:
    """What the demo runs, and plainly whether the backbone is random."""
    if weights == "random":
        return (
            f"zsad demo: backbone {backbone!r} with RANDOM weights at {image_size} px.\n"
            "  The numbers below show that the pipeline runs and that training transfers to unseen categories;\n"
            "  they say nothing about CLIP. To run with real CLIP weights (518 px; needs the weights in the Hugging\n"
            f"  Face cache or a local directory, and is slow on CPU):\n    make demo BACKBONE={REAL_BACKBONE}\n"
            f"  or: zsad demo --backbone {REAL_BACKBONE}"
        )
    return f"zsad demo: backbone {backbone!r} with pretrained weights at {image_size} px."


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``zsad demo``; returns the pixel AUROC before/after and the output paths."""
    from zsad.backbone.clip import BackboneWeightsNotFoundError

    try:
        return _demo(parse_args(sys.argv[1:] if argv is None else argv))
    except BackboneWeightsNotFoundError as err:
        raise SystemExit(f"zsad demo: {err}") from None


def _check_weights(backbone: str) -> None:
    """Fail early, with the way out, when pretrained weights are neither a directory nor in the offline HF cache."""
    if Path(backbone).expanduser().exists() or os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false", "False"):
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(backbone, "config.json"), str):
        return
    msg = (
        f"zsad demo: CLIP weights {backbone!r} are not in the Hugging Face cache and the hub is offline.\n"
        f"  Download them once with network access (huggingface-cli download {backbone}) or pass a directory "
        "written by save_pretrained (--backbone weights/clip);\n  or run the demo with random weights: make demo."
    )
    raise SystemExit(msg)


def _demo(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from zsad.backbone.clip import is_architecture_name

    tiny = args.backbone == "tiny"
    weights = args.weights or ("random" if tiny or is_architecture_name(args.backbone) else "pretrained")
    image_size = args.image_size or (98 if tiny else 518)
    if weights == "pretrained":
        _check_weights(args.backbone)
    threads = args.threads or int(os.environ.get("ZSAD_NUM_THREADS", "0")) or (1 if tiny else None)
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    print(banner(args.backbone, weights, image_size), flush=True)  # noqa: T201
    out = Path(args.output)
    domain_a, domain_b = make_data(out / "data", args.data_size, args.source_look, args.target_look)
    print(  # noqa: T201
        f"data: domain A (source, look {args.source_look!r}: {', '.join(SOURCE_CATEGORIES)}) -> {domain_a}\n"
        f"      domain B (target, look {args.target_look!r}: {', '.join(TARGET_CATEGORIES)}, unseen) -> {domain_b}",
        flush=True,
    )
    shared = cli_args(args, domain_a, domain_b, weights, image_size)
    before = None
    if not args.skip_initial:
        print("\n[1/2] domain B with the initial (untrained) vectors", flush=True)  # noqa: T201
        initial = _run_cli([
            "test", *shared,
            "--verbose=false",
            f"--model.init_args.evaluator.init_args.output_dir={out / 'initial'}",
            "--model.init_args.evaluator.init_args.save_images=0",
            "--trainer.logger=false",
        ])
        before = _pixel_auroc(initial)
    print("\n[2/2] fit on domain A's labelled test split, then test on domain B", flush=True)  # noqa: T201
    fitted = _run_cli([
        "fit", *shared,
        f"--model.init_args.evaluator.init_args.output_dir={out / 'results'}",
        "--test_after_fit=true",
    ])
    after = _pixel_auroc(fitted)
    checkpoint = getattr(fitted.trainer.checkpoint_callback, "last_model_path", "") or ""
    summary = {
        "pixel_auroc_before": before,
        "pixel_auroc_after": after,
        "results": str(out / "results"),
        "checkpoint": checkpoint,
        "seconds": time.perf_counter() - start,
        "weights": weights,
    }
    lines = ["", f"zsad demo done in {summary['seconds']:.0f} s."]
    if before is not None and after is not None:
        lines.append(f"  domain B mean pixel AUROC: initial vectors {100 * before:.1f} -> trained {100 * after:.1f}")
    lines += [
        f"  results: {out / 'results'}/metrics.md (+ .csv, .json), overlays in {out / 'results'}/images/",
        f"  checkpoint (trainable parameters only): {checkpoint}",
        f"  export: zsad export --ckpt_path {checkpoint or '<last.ckpt>'} --output {out / 'vectors.safetensors'}",
    ]
    if weights == "random":
        lines.append(f"  (RANDOM backbone weights; real ones: make demo BACKBONE={REAL_BACKBONE})")
    print("\n".join(lines))  # noqa: T201
    return summary


if __name__ == "__main__":
    main()
