"""W&B never stops or blocks a run (issue 15, item 3): with no API key and ``WANDB_MODE`` unset, ``zsad fit`` with a
``WandbLogger`` logs offline after one message — without a terminal (before: ``UsageError`` after 20 s; run in this
process to save the ~10 s of imports) and under a pseudo-terminal in a subprocess (before: waited forever at "Enter
your choice")."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds; a run that prompts never ends, one that works takes ~15 s of CPU (imports included)


def _fit_command(tmp_path: Path, train: Path, test: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "zsad.cli",
        "fit",
        "--model=zsad.methods.LearnableVectors",
        "--model.backbone=tiny",
        "--model.weights=random",
        "--model.image_size=98",
        "--model.evaluator=false",
        "--data=zsad.data.CrossDataset",
        f"--data.train={{dataset: mvtec, root: {train}}}",
        f"--data.test={{dataset: mvtec, root: {test}}}",
        "--data.train_batch_size=8",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.logger=WandbLogger",
        "--trainer.logger.init_args.project=zsad-test",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]


def _clean_env(home: Path) -> dict[str, str]:
    """No key anywhere: an empty HOME (no ~/.netrc, no wandb settings), no WANDB_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k not in ("NETRC", "XDG_CONFIG_HOME")}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _check(output: str, tmp_path: Path) -> None:
    assert "Enter your choice" not in output and "UsageError" not in output, output[-3000:]
    assert output.count("logging offline") == 1, output[-3000:]  # one message, not one per stage
    assert list((tmp_path / "wandb").glob("offline-run-*")), output[-3000:]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


def test_no_api_key_without_terminal_logs_offline(
    tmp_path: Path,
    home: Path,
    mvtec_like_root: Path,
    mvtec_like_root_b: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """In this process (stdin is not a terminal under pytest): the same ``zsad fit`` through ``build_cli``."""
    import wandb

    import zsad.wandb_fallback
    from zsad.cli import build_cli

    for name, value in _clean_env(home).items():
        monkeypatch.setenv(name, value)
    for name in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(zsad.wandb_fallback, "_announced", set())
    monkeypatch.chdir(tmp_path)
    wandb.teardown()  # settings cached by an earlier test (e.g. disabled mode) must not leak in
    try:
        build_cli(_fit_command(tmp_path, mvtec_like_root, mvtec_like_root_b)[3:])
    finally:
        wandb.finish()
        wandb.teardown()
    captured = capsys.readouterr()
    _check(captured.out + captured.err, tmp_path)


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_no_api_key_under_a_pseudo_terminal_never_prompts(
    tmp_path: Path, home: Path, mvtec_like_root: Path, mvtec_like_root_b: Path
) -> None:
    master, slave = os.openpty()
    process = subprocess.Popen(
        _fit_command(tmp_path, mvtec_like_root, mvtec_like_root_b),
        cwd=tmp_path,
        env={**_clean_env(home), "TERM": "xterm"},
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                if not data and process.poll() is not None:
                    break
                chunks.append(data)
            elif process.poll() is not None:
                break
        else:
            pytest.fail("zsad fit hung under a terminal:\n" + b"".join(chunks).decode(errors="replace")[-3000:])
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        os.close(master)
    output = b"".join(chunks).decode(errors="replace")
    assert process.returncode == 0, output[-3000:]
    _check(output, tmp_path)


def test_unreachable_server_or_disabled_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key but no server (refused port): offline. ``WANDB_MODE=disabled``/``offline`` are left alone."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from zsad.wandb_fallback import ensure_wandb_usable

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = WandbLogger(project="zsad-test", save_dir=str(tmp_path))
    assert not ensure_wandb_usable([logger])
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: connection refused at once
    try:
        logger = WandbLogger(project="zsad-test", save_dir=str(tmp_path))
        assert ensure_wandb_usable([logger])
        assert logger._wandb_init["mode"] == "offline"  # noqa: SLF001
        assert os.environ["WANDB_MODE"] == "offline"
    finally:
        wandb.teardown()
