"""Launch a script as N CPU (gloo) DDP ranks for the DDP-equals-one-process tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).parents[1]


def free_port() -> int:
    """A free TCP port on the loopback interface (the ranks' rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_ddp(script: Path, args: list[str], world_size: int = 2, timeout_s: float = 240) -> None:
    """Start every rank at once (``LOCAL_RANK`` set: Lightning creates no processes itself) and require rc 0.

    A rank still running after ``timeout_s`` is killed with its process group and the test fails.
    """
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "NODE_RANK": "0",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, str(script), *args, "--devices", str(world_size)]
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
    deadline = time.monotonic() + timeout_s
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"DDP run timed out after {timeout_s}s")
    for rank, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"rank {rank}:\n{output[-4000:]}"
