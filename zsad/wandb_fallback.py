"""W&B never stops or blocks a zsad run: without an API key (or without a reachable server) runs log offline.

``wandb.init`` with ``WANDB_MODE`` unset and no API key asks "Enter your choice" and waits forever on a terminal, and
dies with ``UsageError`` without one. :func:`ensure_wandb_usable` runs before a ``WandbLogger`` creates its run (from
``zsad.cli`` right after the classes are built, and from every zsad method's setup callback for anomalib's ``Engine``
and a plain ``Trainer``): when the mode is not already ``offline``/``disabled`` and no key is configured
(``WANDB_API_KEY``, a settings file or ``~/.netrc``, read with ``wandb.login(prompt=False, verify=False)``, which
neither prompts nor touches the network), or the server does not answer within a few seconds, it switches to offline
mode and says so once. Offline runs land in ``./wandb/offline-run-*``; ``wandb sync`` uploads them later.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlparse

#: Seconds to wait for the W&B server's TCP port before logging offline.
CONNECT_TIMEOUT = 3.0
_NO_NETWORK_MODES = ("offline", "disabled", "dryrun")
_announced: set[str] = set()


def _configured_mode(loggers: Iterable[Any]) -> str | None:
    for lg in loggers:
        if getattr(lg, "_offline", False):  # WandbLogger(offline=True) sets WANDB_MODE itself when the run starts
            return "offline"
        mode = getattr(lg, "_wandb_init", {}).get("mode")
        if mode:
            return str(mode)
    return os.environ.get("WANDB_MODE") or None


def _has_api_key() -> bool:
    import wandb

    try:
        return bool(wandb.login(prompt=False, verify=False, referrer="zsad"))
    except Exception:  # noqa: BLE001 - any failure to find credentials means: no usable key
        return False


def _server_reachable(timeout: float = CONNECT_TIMEOUT) -> bool:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "api.wandb.ai", port), timeout=timeout):
            return True
    except OSError:
        return False


def _go_offline(loggers: list[Any], reason: str) -> None:
    os.environ["WANDB_MODE"] = "offline"
    for lg in loggers:
        init = getattr(lg, "_wandb_init", None)
        if isinstance(init, dict):
            init["mode"] = "offline"
    if reason not in _announced:  # one message per process, not one per logger or stage
        _announced.add(reason)
        message = (
            f"W&B: {reason}; logging offline to ./wandb/offline-run-* instead (upload later with `wandb sync`). "
            "Set WANDB_API_KEY or run `wandb login` to log online, or WANDB_MODE=disabled to turn W&B off."
        )
        # One line on stderr (not logging: without handlers configured, logging's last resort would print it too).
        print(message, file=sys.stderr, flush=True)  # noqa: T201


def ensure_wandb_usable(loggers: Iterable[Any]) -> bool:
    """Switch not-yet-started ``WandbLogger`` runs to offline mode when online logging would prompt, fail or hang.

    Args:
        loggers: The trainer's loggers (anything else than a ``WandbLogger`` is ignored).

    Returns:
        ``True`` if it switched to offline mode.
    """
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover - wandb extra not installed
        return False
    pending = [lg for lg in loggers if isinstance(lg, WandbLogger) and getattr(lg, "_experiment", None) is None]
    if not pending:
        return False
    mode = _configured_mode(pending)
    if mode in _NO_NETWORK_MODES:
        return False
    if not _has_api_key():
        _go_offline(pending, "no API key configured (WANDB_API_KEY, `wandb login`)")
        return True
    if not _server_reachable():
        _go_offline(pending, f"the server {os.environ.get('WANDB_BASE_URL', 'https://api.wandb.ai')} is unreachable")
        return True
    return False
