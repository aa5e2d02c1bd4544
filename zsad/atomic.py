"""Atomic file writes: readers (and a resumed run) never see a half-written result, cache item or export."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_MARKER = ".tmp-"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, rename it onto ``path``.

    The temporary name is ``<name>.tmp-<pid>-<random>`` in the same folder (so the rename is atomic on one file
    system); it is removed if the block fails. The final file gets the usual permissions (umask), unlike
    ``tempfile.mkstemp``'s 0600.

    Example:
        >>> with atomic_path("out/metrics.json") as tmp:  # doctest: +SKIP
        ...     tmp.write_text("{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb+") as handle:  # durable before it becomes visible under the final name
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
