"""Safe reading of third-party checkpoint files (the official repositories' ``.pth`` releases).

Every method that imports an official checkpoint reads the file through :func:`read_checkpoint_file`, so a missing,
truncated or foreign file fails the same way everywhere: an :class:`OfficialCheckpointError` that names the file and
says what was expected, never a bare ``IndexError`` / ``OSError`` from deep inside ``torch.load``.

zsad's own Lightning checkpoints get the same treatment: :func:`read_lightning_checkpoint` (the CLI's ``--ckpt_path``,
``load_from_checkpoint``) and :class:`NamedFileCheckpointIO` (the Trainer's ``ckpt_path``, e.g. anomalib's
``Engine.test``) turn an unreadable file into a :class:`CheckpointError` naming the file and the fix.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO

#: What ``torch.load`` raises on a truncated, corrupt or foreign file (``OSError: [Errno 22]`` on a truncated zip,
#: ``IndexError: pop from empty list`` / ``UnpicklingError`` on garbage, ``RuntimeError`` from the zip reader).
_LOAD_ERRORS = (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, RuntimeError, IndexError, ValueError)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, of another method, or not fitting the model."""


class OfficialCheckpointError(CheckpointError):
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
    except _LOAD_ERRORS as e:
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


def _first_line(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def unreadable_lightning_checkpoint(path: str | os.PathLike, error: BaseException) -> CheckpointError:
    """The error for a Lightning checkpoint ``torch.load`` could not read: names the file, the cause and the fix."""
    size = Path(path).stat().st_size if Path(path).is_file() else None
    msg = (
        f"Cannot read the checkpoint {str(path)!r} ({size} bytes): {_first_line(error)}. The file is truncated or "
        "corrupt (a copy or a run interrupted while saving?) or it is not a Lightning checkpoint. Fix: copy it again, "
        "use the run's checkpoints/last.ckpt (written atomically at the end of each epoch), or re-save it."
    )
    return CheckpointError(msg)


def read_lightning_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a Lightning checkpoint (``weights_only=True``), with errors that name the file and the fix.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: The file is unreadable or not a Lightning checkpoint (no ``state_dict`` mapping).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"Checkpoint {str(path)!r} not found."
        raise FileNotFoundError(msg)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as e:
        raise unreadable_lightning_checkpoint(path, e) from None
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        kind = type(checkpoint).__name__ if not isinstance(checkpoint, Mapping) else "dict without 'state_dict'"
        msg = (
            f"{str(path)!r} holds a {kind}, not a Lightning checkpoint. Pass a checkpoint written by `zsad fit` "
            "(<run>/checkpoints/last.ckpt); official releases load with the method's `official_checkpoint` argument."
        )
        raise CheckpointError(msg)
    return dict(checkpoint)


def checkpoint_class_path(checkpoint: Mapping[str, Any]) -> str | None:
    """The model class a Lightning checkpoint was written by (zsad's record, else LightningCLI's ``_class_path``)."""
    hparams = checkpoint.get("hyper_parameters") or {}
    name = checkpoint.get("zsad_class") or (hparams.get("_class_path") if isinstance(hparams, Mapping) else None)
    return str(name) if name else None


class NamedFileCheckpointIO(CheckpointIO):
    """Wraps the Trainer's checkpoint IO so that an unreadable ``ckpt_path`` fails naming the file and the fix.

    Saving and removing are delegated unchanged; only ``torch.load``'s low-level errors on loading are translated.
    """

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:  # noqa: ANN401
        """Delegate."""
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:  # noqa: ANN401
        """Delegate, translating a corrupt or truncated file into :class:`CheckpointError`."""
        kwargs: dict[str, Any] = {"weights_only": weights_only}
        if map_location is not None:
            kwargs["map_location"] = map_location
        try:
            return self.inner.load_checkpoint(path, **kwargs)
        except FileNotFoundError:
            raise
        except _LOAD_ERRORS as e:
            raise unreadable_lightning_checkpoint(path, e) from None

    def remove_checkpoint(self, path: Any) -> None:  # noqa: ANN401
        """Delegate."""
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        """Delegate."""
        self.inner.teardown()
