"""Safe reading of third-party checkpoint files (the official repositories' ``.pth`` releases).

Every method that imports an official checkpoint reads the file through :func:`read_checkpoint_file`, so a missing,
truncated or foreign file fails the same way everywhere: an :class:`OfficialCheckpointError` that names the file and
says what was expected, never a bare ``IndexError`` / ``OSError`` from deep inside ``torch.load``.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch


class OfficialCheckpointError(ValueError):
    """A checkpoint file or state dict that does not hold what the importing method expects."""


def read_checkpoint_file(path: str | os.PathLike, what: str) -> Mapping:
    """Load ``path`` with ``torch.load(weights_only=True)`` and check that it is a mapping.

    Args:
        path: The checkpoint file.
        what: What the file should be, for the messages (e.g. ``"APRIL-GAN checkpoint (exps/pretrained/*.pth)"``).

    Returns:
        The loaded mapping (not yet validated key by key: that is the caller's layout check).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        OfficialCheckpointError: The file is unreadable (truncated, garbage bytes, a pickle that is not plain
            tensors) or holds something other than a dict (a bare tensor, a list).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"{what} {str(path)!r} not found."
        raise FileNotFoundError(msg)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, RuntimeError, IndexError, ValueError) as e:
        msg = (
            f"{str(path)!r} is not a readable {what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "The file is truncated or corrupt (download it again), or it is not a PyTorch checkpoint."
        )
        raise OfficialCheckpointError(msg) from None
    if not isinstance(raw, Mapping):
        msg = f"{str(path)!r} holds a {type(raw).__name__}, not a state dict: it is not a {what}."
        raise OfficialCheckpointError(msg)
    return raw


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`OfficialCheckpointError` naming ``source`` and the keys whose tensors hold NaN or inf."""
    bad = [
        k
        for k, v in state_dict.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if bad:
        msg = f"{source}: non-finite values (NaN/inf) in {sorted(bad)[:8]}; the checkpoint is corrupt or diverged."
        raise OfficialCheckpointError(msg)
