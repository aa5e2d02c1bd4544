"""2-process CPU DDP gives exactly the single-process metrics, although DistributedSampler repeats a sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ddp_launch import launch_ddp
from metrics_toy import ToyDataset, expected_metrics, run_test

from zsad.metrics import ZSADEvaluator
from zsad.metrics import functional as F

SCRIPT = Path(__file__).with_name("evaluator_ddp_script.py")
N_SAMPLES = 25  # odd: the sampler pads rank 1 with a copy of sample 0 (a good "bottle" image)


def test_two_process_ddp_equals_single_process(tmp_path: Path) -> None:
    launch_ddp(SCRIPT, ["--out", str(tmp_path / "ddp"), "--n", str(N_SAMPLES)])
    ddp_rows = {row.pop("category"): row for row in json.loads((tmp_path / "ddp" / "metrics.json").read_text())}

    single = ZSADEvaluator(stages=("test",), output_dir=str(tmp_path / "single"), report_pro_repo=True)
    run_test(single, str(tmp_path / "single"), n=N_SAMPLES)

    assert set(ddp_rows) == set(single.results)
    for category, values in single.results.items():
        for metric, value in values.items():
            # Same samples in the same canonical order: bit-identical, not merely close.
            assert ddp_rows[category][metric] == value, (category, metric)

    # Logged scalars went through Lightning's sync as well (float32).
    logged = json.loads((tmp_path / "ddp" / "logged.json").read_text())
    assert logged["test/toy/mean/pixel_aupro"] == pytest.approx(single.results["mean"]["pixel_aupro"], abs=1e-6)

    # The trap is real: counting the padded duplicate would have changed the numbers.
    dataset = ToyDataset(N_SAMPLES)
    dataset.samples.append(dataset.samples[0])
    with_duplicate = expected_metrics(dataset, report_pro_repo=True)["bottle"]
    assert any(not np.isclose(with_duplicate[m], ddp_rows["bottle"][m], rtol=0, atol=1e-9) for m in F.PIXEL_METRICS)
