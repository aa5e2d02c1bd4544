"""`zsad demo` (what `make demo` runs): generated data, fit on domain A, test on domain B, table + overlays, a plain
statement that the backbone is random — and training transfers: the trained vectors beat the initial ones on B."""

from __future__ import annotations

from pathlib import Path

import pytest

from zsad.demo import main


def test_demo_fits_on_a_transfers_to_b_and_writes_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = main(["--output", str(tmp_path / "demo"), "--save_images", "2"])
    printed = capsys.readouterr().out
    assert "RANDOM weights" in printed and "make demo BACKBONE=openai/clip-vit-large-patch14-336" in printed
    # Training transfers: pixel AUROC on the unseen target categories, initial random vectors vs trained ones.
    assert summary["pixel_auroc_after"] > summary["pixel_auroc_before"] + 0.1, summary
    assert summary["pixel_auroc_after"] > 0.75, summary
    results = Path(summary["results"])
    table = (results / "metrics.md").read_text()
    assert "delta" in table and "epsilon" in table and "mean" in table and "pixel AUROC" in table
    assert "delta" in printed and "pixel AUROC" in printed  # the table is printed too
    for category in ("delta", "epsilon"):
        assert len(list((results / "images" / category).glob("*.png"))) == 2
    checkpoint = Path(summary["checkpoint"])
    assert checkpoint.is_file() and checkpoint.stat().st_size < 64 * 1024
    assert summary["seconds"] < 300
