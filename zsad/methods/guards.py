"""Reliability callbacks every zsad method adds by default (``ZSADModule.configure_callbacks``).

They hold from the CLI, from anomalib's ``Engine`` and from a plain Lightning ``Trainer``.

* :class:`DivergenceGuard` stops training at the first non-finite loss, or at the first optimiser step that leaves a
  trainable parameter non-finite, with a message naming the step, the loss terms, the learning rate and the likely
  causes. Raising before the epoch ends means ``ModelCheckpoint`` never writes the diverged state (and
  :meth:`zsad.methods.base.ZSADModule.on_save_checkpoint` refuses non-finite tensors as a last wall).
* :class:`RunSetupGuard` makes an unreadable ``ckpt_path`` fail naming the file
  (:class:`~zsad.methods.checkpoint_io.NamedFileCheckpointIO`) and switches W&B to offline mode when no API key is
  configured (:func:`zsad.wandb_fallback.ensure_wandb_usable`), before anything loads or logs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from zsad.methods.checkpoint_io import NamedFileCheckpointIO

LIKELY_CAUSES = (
    "Likely causes: a learning rate too high for this method (lower --model.init_args.lr), fp16 overflow "
    "(train with --trainer.precision=32-true or bf16-mixed), or bad input (non-finite pixels or features in the data "
    "or the feature cache; delete the cache directory to rebuild it)."
)


class TrainingDivergedError(RuntimeError):
    """Training produced a non-finite loss or parameter; nothing after that step is saved."""


def _finite(value: torch.Tensor) -> bool:
    return bool(torch.isfinite(value.detach()).all())


def _describe(value: torch.Tensor) -> str:
    value = value.detach().float()
    if value.numel() == 1:
        return f"{value.item():.4g}"
    return f"tensor with {int((~torch.isfinite(value)).sum())} non-finite values"


class DivergenceGuard(Callback):
    """Raise :class:`TrainingDivergedError` at the first non-finite training loss or trainable parameter.

    Args:
        check_parameters: Also check every trainable parameter after each optimiser step (a pass over the learnable
            tensors only: kilobytes for prompt methods).
    """

    def __init__(self, check_parameters: bool = True) -> None:
        self.check_parameters = check_parameters

    @staticmethod
    def _context(trainer: Trainer, pl_module: LightningModule, step: int) -> str:
        lrs = sorted({group["lr"] for opt in trainer.optimizers for group in opt.param_groups if "lr" in group})
        terms = getattr(pl_module, "last_loss_terms", None) or {}
        described = ", ".join(f"{name}={_describe(value)}" for name, value in terms.items())
        lr_text = ", ".join(f"{lr:.3g}" if math.isfinite(lr) else str(lr) for lr in lrs) or "?"
        return (
            f"epoch {trainer.current_epoch}, optimiser step {step}; loss terms: {described or '?'}; "
            f"lr {lr_text}; precision {trainer.precision}"
        )

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        """Stop before a non-finite loss reaches the parameters."""
        # Decided over all ranks: one rank raising while the others enter backward's all-reduce would hang DDP.
        if trainer.strategy.reduce_boolean_decision(not _finite(loss), all=False):
            context = self._context(trainer, pl_module, trainer.global_step + 1)  # the step about to be taken
            msg = (
                f"Training diverged: the loss is {_describe(loss)} ({context}). Stopped "
                f"before the backward pass; no checkpoint of this state is written. {LIKELY_CAUSES}"
            )
            raise TrainingDivergedError(msg)

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,  # noqa: ANN401
        batch: Any,  # noqa: ANN401
        batch_idx: int,  # noqa: ARG002
    ) -> None:
        """After the optimiser step: every trainable parameter must still be finite."""
        if not self.check_parameters:
            return
        bad = [name for name, p in pl_module.named_parameters() if p.requires_grad and not _finite(p)]
        if trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            context = self._context(trainer, pl_module, trainer.global_step)  # global_step counts the step just taken
            msg = (
                f"Training diverged: the optimiser step made {len(bad)} trainable parameter(s) non-finite "
                f"({', '.join(bad[:4]) or 'on another process'}) at {context}. Training stopped; no checkpoint of "
                f"this state is written. {LIKELY_CAUSES}"
            )
            raise TrainingDivergedError(msg)


class RunSetupGuard(Callback):
    """At setup: name the file when ``ckpt_path`` is unreadable; use W&B offline when no API key is configured."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:  # noqa: ARG002
        """Wrap the strategy's checkpoint IO (loading happens after this hook) and check W&B loggers."""
        from zsad.wandb_fallback import ensure_wandb_usable

        strategy = trainer.strategy
        if not isinstance(strategy.checkpoint_io, NamedFileCheckpointIO):
            strategy.checkpoint_io = NamedFileCheckpointIO(strategy.checkpoint_io)
        ensure_wandb_usable(trainer.loggers)
