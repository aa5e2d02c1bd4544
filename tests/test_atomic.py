"""Atomic writes: a failure leaves the previous file intact and no temporary file behind."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from zsad.atomic import atomic_path, atomic_write_text


def test_atomic_write_replaces_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "out" / "metrics.json"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    reference = tmp_path / "reference"
    reference.write_text("")
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)  # umask, not mkstemp's 0600
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]
