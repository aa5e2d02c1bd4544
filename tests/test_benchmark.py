"""`zsad benchmark`: exact parameter counts, images/s of the method and of its bare encoder, their ratio, the
Table-2 row — for any method config, with `--weights random` and backbone overrides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from zsad.benchmark import human_count, main

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_prints_counts_speeds_and_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    # The paper config (pretrained ViT-L) with the overrides: random tiny weights at 98 px, no download.
    result = main([
        "--config", str(ROOT / "configs/learnable_vectors/visa_to_mvtec.yaml"), "--weights", "random",
        "--backbone", "tiny", "--image_size", "98", "--batches", "2", "--batch_size", "2",
    ])
    out = capsys.readouterr().out
    assert "trainable parameters: 164\n" in out  # (1 + 4) x 2 x 16 + 4, exact integer
    assert "total parameters: 225252\n" in out
    assert re.search(r"inference: \d+\.\d+ images/s", out)
    assert re.search(r"bare encoder: \d+\.\d+ images/s \(model\.model\.encode\(images\)\)", out)
    assert re.search(r"ratio inference / bare encoder: \d+\.\d+", out)
    assert "batch size 2, dtype float32, device cpu" in out
    assert "| LearnableVectors | 164 | 225.3K |" in out
    assert result["image_size"] == 98 and result["weights"] == "random"
    assert result["ratio"] == pytest.approx(result["inference_images_per_s"] / result["encoder_images_per_s"])


def test_human_counts_match_the_seed_table() -> None:
    assert human_count(7_684) == "7.7K"
    assert human_count(304_301_572) == "304.3M"
    assert human_count(431_905_025) == "431.9M"


def test_set_overrides_any_init_argument(capsys: pytest.CaptureFixture[str]) -> None:
    """CLIP-ADA's R is an init argument: `--set num_refinements=2` changes the trainable count (656 + 2 x 528)."""
    common = ["--config", str(ROOT / "configs/clip_ada/mvtec.yaml"), "--weights", "random", "--backbone", "tiny",
              "--image_size", "98", "--batches", "1", "--warmup", "0", "--no_plain_clip"]
    main([*common, "--set", "num_refinements=0"])
    assert "trainable parameters: 656\n" in capsys.readouterr().out
    main([*common, "--set", "num_refinements=2"])
    assert "trainable parameters: 1712\n" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no_such_argument"):
        main([*common, "--set", "no_such_argument=1"])


def test_april_gan_row_explains_the_papers_total(capsys: pytest.CaptureFixture[str]) -> None:
    """APRIL-GAN's count next to the paper's: the official table enlarged at load (+ logit_scale) is spelled out."""
    result = main([
        "--config", str(ROOT / "configs/april_gan/visa_to_mvtec.yaml"), "--weights", "random", "--backbone", "tiny",
        "--image_size", "98", "--batches", "1", "--warmup", "1", "--no_plain_clip",
    ])
    out = capsys.readouterr().out
    assert "trainable parameters: 2112\n" in out  # 4 x Linear(32 -> 16)
    total = result["total_parameters"]
    # tiny: 17 native position rows, 50 at 98 px, width 32 -> (50 - 17) x 32 = 1,056 more values in the paper's count.
    assert f"{total:,} + 1,056 + 1 = {total + 1057:,}" in out
