"""2-process CPU DDP gives exactly the single-process metrics, although DistributedSampler repeats a sample."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from metrics_toy import ToyDataset, expected_metrics, run_test

from zsad.metrics import ZSADEvaluator
from zsad.metrics import functional as F

SCRIPT = Path(__file__).with_name("evaluator_ddp_script.py")
N_SAMPLES = 25  # odd: the sampler pads rank 1 with a copy of sample 0 (a good "bottle" image)
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ddp(out: Path, world_size: int = 2) -> None:
    """Start every rank at once (``LOCAL_RANK`` set: Lightning creates no processes itself)."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "NODE_RANK": "0",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
    }
    command = [sys.executable, str(SCRIPT), "--out", str(out), "--n", str(N_SAMPLES), "--devices", str(world_size)]
    procs = [
        subprocess.Popen(
            command,
            env={**env, "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # own process group, so a hung rank can be killed
        )
        for rank in range(world_size)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"DDP run timed out after {TIMEOUT_S}s")
    for rank, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"rank {rank}:\n{output[-4000:]}"


def test_two_process_ddp_equals_single_process(tmp_path: Path) -> None:
    run_ddp(tmp_path / "ddp")
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
