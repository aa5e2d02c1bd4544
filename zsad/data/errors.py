"""Errors of the data layer: one exception per problem class, each message naming the files and the fix.

Bad input is never skipped silently — a dropped test image changes the metrics — so every check collects *all* the
problems it finds and raises once, before training starts, with a message that lists them (the first
:data:`MAX_LISTED` in full).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MAX_LISTED = 20


@dataclass(frozen=True)
class Problem:
    """One bad file or folder: where it is, what is wrong, and how to fix it."""

    path: Path | str
    issue: str
    fix: str

    def __str__(self) -> str:
        """One line: ``<path>: <issue> Fix: <fix>``."""
        return f"{self.path}: {self.issue} Fix: {self.fix}"


class DataError(Exception):
    """Base class of every error the data layer raises on bad input."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """The dataset root (or a category folder in it) does not exist; the message shows the expected layout."""


class DatasetLayoutError(DataError, ValueError):
    """Folders and files do not form the expected layout (missing masks, empty or unknown category, symlinks, ...)."""


class BadImageError(DataError, ValueError):
    """An image or mask file cannot be used as it is (empty, truncated, unreadable, incompatible mask)."""


def format_problems(summary: str, problems: Sequence[Problem | str]) -> str:
    """Build one error message from a summary line and a list of problems.

    Args:
        summary: First line, e.g. ``"2 bad files in MVTec AD 'bottle'"``.
        problems: The problems; the first :data:`MAX_LISTED` are listed, the rest counted.

    Returns:
        The multi-line message.
    """
    lines = [summary]
    lines += [f"  - {problem}" for problem in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more of the same kind.")
    return "\n".join(lines)
