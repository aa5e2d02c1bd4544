"""2-process CPU DDP (gloo) gives exactly the single-process MuSc scores and metrics.

27 test images over 2 ranks: the DistributedSampler pads rank 1 with a repeat of the first image, and the categories
fall into the ranks' batches at different steps; MuSc gathers each category's tokens, de-duplicates them by path and
scores every image against the same set as one process would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ddp_launch import launch_ddp
from musc_ddp_script import run

SCRIPT = Path(__file__).with_name("musc_ddp_script.py")


def test_two_process_ddp_equals_single_process(tmp_path: Path, gogan_like_root: Path) -> None:
    launch_ddp(SCRIPT, ["--root", str(gogan_like_root), "--out", str(tmp_path / "ddp")])
    model = run(str(gogan_like_root), str(tmp_path / "single"), devices=1)

    single = json.loads((tmp_path / "single" / "scores_0.json").read_text())
    ranks = [json.loads((tmp_path / "ddp" / f"scores_{rank}.json").read_text()) for rank in range(2)]
    assert len(single) == 27
    assert set(ranks[0]) | set(ranks[1]) == set(single)
    # 28 sampled: rank 1's padding repeats rank 0's first image, long after its category was scored and freed.
    (repeat,) = set(ranks[0]) & set(ranks[1])
    assert len(ranks[0]) + len(ranks[1]) == 28 and "/nunozumi/" in repeat
    for scores in ranks:
        for path, values in scores.items():
            # Same images, same reference set in the same order (the repeat too): equal up to rounding of the sum.
            assert values == pytest.approx(single[path], rel=1e-6, abs=1e-9), path

    ddp_rows = {row.pop("category"): row for row in json.loads((tmp_path / "ddp" / "metrics.json").read_text())}
    assert set(ddp_rows) == set(model.evaluator.results) == {"nunozumi", "tanizumi", "mean"}
    for category, values in model.evaluator.results.items():
        for metric, value in values.items():
            assert ddp_rows[category][metric] == pytest.approx(value, abs=1e-6), (category, metric)
