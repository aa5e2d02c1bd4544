"""What every zsad method shares, as a mixin for anomalib's :class:`~anomalib.models.AnomalibModule`.

Each public method subclasses ``AnomalibModule`` *directly* (``class LearnableVectors(ZSADModule, AnomalibModule)``):
anomalib's ``get_model("learnable_vectors")`` and ``list_models()`` only see direct subclasses, and anomalib has no
plugin registry (``shared/specs/ecosystem.md`` §2). The mixin supplies the ZSAD conventions:

* CLIP pre-processing: squash-resize to the method's input size (bicubic, antialiased) + OpenAI normalisation.
* No post-processor: raw scores go to zsad's exact, threshold-free evaluator (anomalib's PostProcessor would
  min-max-clamp them with statistics a zero-shot model never saw).
* Steps: ``training_step`` calls the method's :meth:`ZSADModule.compute_loss`; ``validation_step``/``test_step``/
  ``predict_step`` write ``pred_score`` and ``anomaly_map`` into the batch in place (anomalib's contract).
* Checkpoints hold the trainable parameters only (kilobytes, not the 1.2 GB frozen CLIP) plus the backbone identity
  and the class that wrote them; loading rebuilds the frozen backbone from the hyper-parameters and refuses a
  checkpoint of another class, or with missing / unexpected trainable keys, naming both classes (only the frozen
  backbone may be absent). Non-finite trainable tensors are never saved.
* Reliability callbacks (:mod:`zsad.methods.guards`): training stops at the first non-finite loss or parameter; an
  unreadable ``ckpt_path`` names the file; W&B logs offline without an API key. Validation/test warn when every
  score or map is constant (a diverged model: all metrics 50).
* Frozen-feature cache: a method whose ``compute_loss`` reads features through :meth:`ZSADModule.batch_features`
  sets ``supports_feature_cache = True``; a ``feature_cache`` attribute (the method's ``feature_cache`` argument)
  then attaches :class:`zsad.backbone.cache.FeatureCache`, and training runs over stored encoder features.

A method defines only its torch model (``self.model``, which owns the :class:`~zsad.backbone.CLIPBackbone` as
``self.model.backbone``), its loss and its optimiser.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import InferenceBatch
from anomalib.pre_processing import PreProcessor
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

from zsad.backbone import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CLIPBackbone
from zsad.methods.checkpoint_io import CheckpointError, checkpoint_class_path, read_lightning_checkpoint


def clip_pre_processor(image_size: int) -> PreProcessor:
    """Anomalib pre-processor for CLIP: squash resize (bicubic, antialias) to ``image_size`` + OpenAI normalisation.

    Only ``Resize``/``Normalize``/``Compose`` are used, the transforms anomalib 2.7 persists in checkpoints.
    """
    return PreProcessor(
        transform=Compose(
            [
                Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC, antialias=True),
                Normalize(mean=list(OPENAI_CLIP_MEAN), std=list(OPENAI_CLIP_STD)),
            ]
        ),
    )


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of a module (shared parameters counted once)."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _batch_size(batch: Any) -> int | None:  # noqa: ANN401
    image = getattr(batch, "image", None)
    if image is not None:
        return len(image)
    features = getattr(batch, "features", None)
    return len(next(iter(features.values()))) if features else None


class ZSADModule:
    """Mixin with the shared ZSAD behaviour; put it *before* ``AnomalibModule`` in the bases.

    Subclasses must set ``self.model`` (a plain ``nn.Module`` whose eval-mode ``forward(images)`` returns an
    :class:`~anomalib.data.InferenceBatch` with ``pred_score`` ``[B]`` and ``anomaly_map`` ``[B, H, W]``) and implement
    :meth:`compute_loss` if the method trains. Their ``__init__`` must take ``image_size: int``.
    """

    model: nn.Module
    #: Frozen CLIP weights are rebuilt from the hyper-parameters, so checkpoints omit them and Lightning's loading is
    #: not strict; :meth:`on_load_checkpoint` is strict on the class and the trainable keys instead.
    strict_loading = False
    #: ``compute_loss`` reads frozen features via :meth:`batch_features`, so training can replay cached features.
    supports_feature_cache: bool = False
    #: Cache directory of frozen features (``None``: no cache); methods set it from their ``feature_cache`` argument.
    feature_cache: str | None = None
    #: Scores depend on other batches (a transductive method): steps only store, and the evaluator takes the scored
    #: batches from ``pop_deferred_predictions(final: bool) -> list[batch]`` (``final`` at epoch end, on every rank).
    defers_predictions: bool = False
    #: The official code resizes CLIP's position table to the input grid at load (and counts it, plus CLIP's unused
    #: ``logit_scale``, in its parameter total); zsad interpolates the native table on the fly. ``zsad benchmark``
    #: then explains the difference (:meth:`table2_note`).
    official_counts_enlarged_position_table: bool = False

    # -- anomalib components ----------------------------------------------------------------------------------------

    def configure_pre_processor(self, image_size: int | tuple[int, int] | None = None) -> PreProcessor:
        """CLIP pre-processor at the method's input size (``hparams.image_size``)."""
        if image_size is None:
            image_size = self.hparams.get("image_size", 518)
        if isinstance(image_size, tuple | list):
            image_size = int(image_size[0])
        return clip_pre_processor(int(image_size))

    def configure_post_processor(self) -> None:
        """No post-processing: metrics are computed on raw scores (exact and threshold-free)."""
        return

    def configure_evaluator(self):  # noqa: ANN201 - zsad.metrics.ZSADEvaluator
        """Zsad's exact per-category evaluator (image AUROC/AP/F1-max, pixel AUROC/AP/F1-max/AU-PRO)."""
        from zsad.metrics import ZSADEvaluator

        return ZSADEvaluator()

    def configure_visualizer(self) -> None:
        """No anomalib visualizer by default: overlays come from the evaluator (``save_images``), far cheaper."""
        return

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No Trainer overrides: the YAML config decides epochs, precision and devices."""
        return {}

    @property
    def learning_type(self) -> LearningType:
        """``ZERO_SHOT`` when nothing is trainable, else ``ONE_CLASS``.

        A trained CLIP method must not report ``ZERO_SHOT`` while it trains: anomalib's ``Engine.fit`` would then run
        validation instead of training (``ecosystem.md`` §2).
        """
        trainable, _ = count_parameters(self)
        return LearningType.ONE_CLASS if trainable else LearningType.ZERO_SHOT

    # -- parts ------------------------------------------------------------------------------------------------------

    @property
    def backbone(self) -> CLIPBackbone:
        """The frozen CLIP backbone (owned by the torch model)."""
        return self.model.backbone

    def table2_note(self, trainable: int, total: int) -> str | None:  # noqa: ARG002 - the signature zsad benchmark calls
        """How the paper's parameter total relates to zsad's ``total`` (``None`` when they count the same)."""
        if not self.official_counts_enlarged_position_table:
            return None
        backbone = self.backbone
        native = backbone.vision.embeddings.position_embedding.weight.shape[0]
        side = int(self.hparams.image_size) // backbone.patch_size
        extra = (side * side + 1 - native) * backbone.width
        paper = total + extra + 1
        return (
            f"the paper's total counts {extra:,} more position-table values ({side * side + 1:,} rows enlarged at "
            f"load vs the native {native:,}; zsad interpolates them on the fly) and CLIP's unused logit_scale (1): "
            f"{total:,} + {extra:,} + 1 = {paper:,}"
        )

    @classmethod
    def from_official_checkpoint(cls, path_or_state_dict: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        """Build the method (``kwargs`` = constructor arguments) and load a checkpoint released with the official code.

        Available on methods that define ``load_official_checkpoint(path_or_state_dict)`` (strict key/shape checks,
        :class:`~zsad.methods.checkpoint_io.OfficialCheckpointError` naming the file on anything malformed).
        """
        model = cls(**kwargs)
        if not hasattr(model, "load_official_checkpoint"):
            msg = f"{cls.__name__} has no official-checkpoint import."
            raise TypeError(msg)
        model.load_official_checkpoint(path_or_state_dict)
        return model

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the optimiser updates."""
        return (p for p in self.parameters() if p.requires_grad)

    def _frozen_prefixes(self) -> list[str]:
        return [f"{name}." for name, module in self.named_modules() if isinstance(module, CLIPBackbone)]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict without the frozen backbone: what checkpoints and ``zsad export`` store."""
        prefixes = tuple(self._frozen_prefixes())
        return {k: v for k, v in self.state_dict().items() if not k.startswith(prefixes)}

    def configure_callbacks(self):  # noqa: ANN201 - Sequence[Callback]
        """The anomalib component callbacks, zsad's guards, plus the feature cache when ``feature_cache`` is set."""
        from zsad.methods.guards import DivergenceGuard, RunSetupGuard

        callbacks = [*super().configure_callbacks(), RunSetupGuard(), DivergenceGuard()]
        if self.feature_cache:
            from zsad.backbone.cache import FeatureCache

            callbacks.append(FeatureCache(cache_dir=str(self.feature_cache)))
        return callbacks

    def batch_features(self, batch: Any) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:  # noqa: ANN401
        """Frozen features of a batch and the input size they belong to.

        From the store for a :class:`~zsad.backbone.cache.CachedFeatureBatch`, else ``self.model.encode(images)``.
        """
        features = getattr(batch, "features", None)
        if features is not None:
            return features, tuple(int(s) for s in batch.image_size)
        return self.model.encode(batch.image), tuple(int(s) for s in batch.image.shape[-2:])

    # -- steps ------------------------------------------------------------------------------------------------------

    def compute_loss(self, batch: Any) -> torch.Tensor | dict[str, torch.Tensor]:  # noqa: ANN401
        """The method's training loss on a batch (a tensor, or a dict with ``"loss"`` and named terms to log)."""
        msg = f"{type(self).__name__} has no training objective; use `zsad test` / `zsad validate` directly."
        raise NotImplementedError(msg)

    def training_step(self, batch: Any, batch_idx: int) -> STEP_OUTPUT:  # noqa: ANN401, ARG002
        """Compute and log the loss."""
        out = self.compute_loss(batch)
        terms = out if isinstance(out, dict) else {"loss": out}
        # What DivergenceGuard names when the loss is not finite.
        self.last_loss_terms = {name: value.detach() for name, value in terms.items()}
        batch_size = _batch_size(batch)
        for name, value in terms.items():
            key = "train_loss" if name == "loss" else f"train/{name}"
            self.log(key, value.detach(), prog_bar=name == "loss", batch_size=batch_size, sync_dist=True)
        return terms["loss"]

    def predict_batch(self, batch: Any) -> InferenceBatch:  # noqa: ANN401
        """Predictions for one batch; methods that need more than the images (e.g. references) override this."""
        return self.model(batch.image)

    def _infer(self, batch: Any) -> Any:  # noqa: ANN401
        predictions = self.predict_batch(batch)
        fields = {k: v for k, v in predictions._asdict().items() if v is not None}
        self._track_output_range(fields)
        # In place: anomalib's evaluator and visualiser read this very batch object.
        return batch.update(**fields)

    def validation_step(self, batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> STEP_OUTPUT:  # noqa: ANN401, ARG002
        """Score the batch; the evaluator computes validation metrics from it."""
        return self._infer(batch)

    def test_step(self, batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> STEP_OUTPUT:  # noqa: ANN401, ARG002
        """Score the batch; the evaluator computes test metrics from it."""
        return self._infer(batch)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> STEP_OUTPUT:  # noqa: ANN401, ARG002
        """Score the batch for ``zsad predict``."""
        return self._infer(batch)

    # -- constant outputs -------------------------------------------------------------------------------------------

    def _track_output_range(self, fields: Mapping[str, Any]) -> None:
        # Min / max / non-finite count of the scores and maps of the current evaluation epoch (a few reductions).
        ranges = self.__dict__.setdefault("_output_ranges", {})
        for name in ("pred_score", "anomaly_map"):
            value = fields.get(name)
            if not isinstance(value, torch.Tensor) or value.numel() == 0:
                continue
            value = value.detach().float()
            finite = torch.isfinite(value)
            nonfinite = int((~finite).sum())
            values = value[finite]
            low, high, count = ranges.get(name, (float("inf"), float("-inf"), 0))
            if values.numel():
                low, high = min(low, float(values.min())), max(high, float(values.max()))
            ranges[name] = (low, high, count + nonfinite)

    def _warn_constant_outputs(self, stage: str) -> None:
        ranges = self.__dict__.pop("_output_ranges", {})
        problems = []
        for name, (low, high, nonfinite) in ranges.items():
            if nonfinite:
                problems.append(f"{nonfinite} non-finite values in {name}")
            elif low == high:
                problems.append(f"every {name} equals {low:.6g}")
        if problems:
            rank_zero_warn(
                f"{type(self).__name__} {stage}: {'; '.join(problems)}. The model cannot rank anything (every AUROC "
                "and AP is chance level, 50.0): the checkpoint probably diverged during training (lr too high, fp16 "
                "overflow) or the weights are not the trained ones. Retrain with a lower lr or check --ckpt_path.",
                category=UserWarning,
            )

    def on_validation_epoch_start(self) -> None:
        """Reset the output-range statistics."""
        super().on_validation_epoch_start()
        self.__dict__.pop("_output_ranges", None)

    def on_validation_epoch_end(self) -> None:
        """Warn when every score or map was constant or non-finite."""
        super().on_validation_epoch_end()
        self._warn_constant_outputs("validation")

    def on_test_epoch_start(self) -> None:
        """Reset the output-range statistics."""
        super().on_test_epoch_start()
        self.__dict__.pop("_output_ranges", None)

    def on_test_epoch_end(self) -> None:
        """Warn when every score or map was constant or non-finite."""
        super().on_test_epoch_end()
        self._warn_constant_outputs("test")

    # -- checkpoints ------------------------------------------------------------------------------------------------

    def class_path(self) -> str:
        """Import path of this model's class, as stored in its checkpoints (``zsad_class``)."""
        cls = type(self)
        return f"{cls.__module__}.{cls.__qualname__}"

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the frozen backbone from the checkpoint, record what it was and which class wrote it.

        Raises:
            CheckpointError: A trainable tensor is NaN/inf: a diverged state is never written as a checkpoint.
        """
        super().on_save_checkpoint(checkpoint)
        prefixes = tuple(self._frozen_prefixes())
        state = checkpoint.get("state_dict", {})
        checkpoint["state_dict"] = {k: v for k, v in state.items() if not k.startswith(prefixes)}
        bad = [
            k
            for k, v in checkpoint["state_dict"].items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())
        ]
        if bad:
            msg = (
                f"Refusing to save a checkpoint of {type(self).__name__} with non-finite values in {sorted(bad)[:4]}: "
                "training diverged (lr too high, fp16 overflow or bad input). The previous checkpoint is kept."
            )
            raise CheckpointError(msg)
        checkpoint["zsad_backbone"] = self.backbone.identity()
        checkpoint["zsad_class"] = self.class_path()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another class or with missing / unexpected trainable keys (naming both classes).

        ``strict_loading`` is off only because the frozen backbone is not stored; everything else must match.
        """
        super().on_load_checkpoint(checkpoint)
        trainer = getattr(self, "_trainer", None)
        path = getattr(trainer, "ckpt_path", None) if trainer is not None else None
        self.check_checkpoint_fits(checkpoint, f"The checkpoint {str(path)!r}" if path else "The checkpoint")
        # Calibrated decision thresholds (`zsad calibrate`) for the predictions writer and exports.
        self.zsad_thresholds = checkpoint.get("zsad_thresholds")

    def check_checkpoint_fits(self, checkpoint: Mapping[str, Any], source: str = "The checkpoint") -> None:
        """Raise :class:`CheckpointError` unless ``checkpoint`` was written by this class with these trainable keys.

        Args:
            checkpoint: A loaded Lightning checkpoint.
            source: How to name it in the message (e.g. the file).
        """
        theirs = checkpoint_class_path(checkpoint)
        ours = type(self)
        if theirs is not None and not _same_class(theirs, ours):
            msg = (
                f"{source} was written by {theirs}, but the model is {self.class_path()}. Load it with "
                f"{theirs.rsplit('.', 1)[-1]} (from the CLI: drop --model, or pass --model {theirs}), or pass a "
                f"checkpoint of {ours.__name__}."
            )
            raise CheckpointError(msg)
        state = checkpoint.get("state_dict") or {}
        prefixes = tuple(self._frozen_prefixes())
        own_state = self.state_dict()
        trainable = [name for name, p in self.named_parameters() if p.requires_grad]
        missing = sorted(k for k in trainable if k not in state)
        unexpected = sorted(k for k in state if k not in own_state and not k.startswith(prefixes))
        mismatched = [
            f"{k}: {tuple(v.shape)} vs {tuple(own_state[k].shape)}"
            for k, v in state.items()
            if k in own_state and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(own_state[k].shape)
        ]
        if mismatched:
            msg = (
                f"{source} (written by {theirs or 'an unrecorded class'}) has other shapes than this "
                f"{type(self).__name__} (checkpoint vs model): {mismatched[:6]}. It was trained with other settings "
                "(layers, n_ctx, backbone, ...): use the checkpoint's own config."
            )
            raise CheckpointError(msg)
        if missing or unexpected:
            written_by = theirs or "an unrecorded class"
            msg = (
                f"{source} (written by {written_by}) does not fit {self.class_path()}: missing trainable keys "
                f"{missing[:6]}, unexpected keys {unexpected[:6]}. It belongs to another method or other settings "
                "(layers, n_ctx, ...): pass the checkpoint's own config, or drop --model so the CLI rebuilds the model "
                "from the checkpoint's hyper-parameters."
            )
            raise CheckpointError(msg)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        """Lightning's ``load_from_checkpoint``, refusing unreadable files and checkpoints of another class.

        Raises:
            CheckpointError: The file is unreadable (the message names it and the fix), was written by another class
                (both named), or its trainable keys do not fit.
        """
        if isinstance(checkpoint_path, str | os.PathLike):
            checkpoint = read_lightning_checkpoint(checkpoint_path)  # kilobytes: read once more for clear errors
            theirs = checkpoint_class_path(checkpoint)
            if theirs is not None and not _same_class(theirs, cls):
                msg = (
                    f"{str(checkpoint_path)!r} was written by {theirs}, not {cls.__module__}.{cls.__qualname__}: "
                    f"load it with {theirs.rsplit('.', 1)[-1]}.load_from_checkpoint."
                )
                raise CheckpointError(msg)
        with warnings.catch_warnings():
            # The frozen backbone is rebuilt, never stored: Lightning's non-strict loading would list every one of its
            # keys as missing. on_load_checkpoint has already checked that every trainable key is there.
            warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the")
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)


def _same_class(path: str, cls: type) -> bool:
    """Whether the import path ``path`` names ``cls`` (re-exports such as ``zsad.methods.X`` included)."""
    module_name, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return name == cls.__name__
    return found is cls
