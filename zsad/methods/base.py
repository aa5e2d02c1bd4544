"""What every zsad method shares, as a mixin for anomalib's :class:`~anomalib.models.AnomalibModule`.

Each public method subclasses ``AnomalibModule`` *directly* (``class LearnableVectors(ZSADModule, AnomalibModule)``):
anomalib's ``get_model("learnable_vectors")`` and ``list_models()`` only see direct subclasses, and anomalib has no
plugin registry (``shared/specs/ecosystem.md`` §2). The mixin supplies the ZSAD conventions:

* CLIP pre-processing: squash-resize to the method's input size (bicubic, antialiased) + OpenAI normalisation.
* No post-processor: raw scores go to zsad's exact, threshold-free evaluator (anomalib's PostProcessor would
  min-max-clamp them with statistics a zero-shot model never saw).
* Steps: ``training_step`` calls the method's :meth:`ZSADModule.compute_loss`; ``validation_step``/``test_step``/
  ``predict_step`` write ``pred_score`` and ``anomaly_map`` into the batch in place (anomalib's contract).
* Checkpoints hold the trainable parameters only (kilobytes, not the 1.2 GB frozen CLIP) plus the backbone identity;
  loading rebuilds the frozen backbone from the hyper-parameters.
* Frozen-feature cache: a method whose ``compute_loss`` reads features through :meth:`ZSADModule.batch_features`
  sets ``supports_feature_cache = True``; a ``feature_cache`` attribute (the method's ``feature_cache`` argument)
  then attaches :class:`zsad.backbone.cache.FeatureCache`, and training runs over stored encoder features.

A method defines only its torch model (``self.model``, which owns the :class:`~zsad.backbone.CLIPBackbone` as
``self.model.backbone``), its loss and its optimiser.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import InferenceBatch
from anomalib.pre_processing import PreProcessor
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

from zsad.backbone import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CLIPBackbone


def clip_pre_processor(image_size: int) -> PreProcessor:
    """Anomalib pre-processor for CLIP: squash resize (bicubic, antialias) to ``image_size`` + OpenAI normalisation.

    Only ``Resize``/``Normalize``/``Compose`` are used, the transforms anomalib 2.7 persists in checkpoints.
    """
    return PreProcessor(
        transform=Compose([
            Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC, antialias=True),
            Normalize(mean=list(OPENAI_CLIP_MEAN), std=list(OPENAI_CLIP_STD)),
        ]),
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
    #: Frozen CLIP weights are rebuilt from the hyper-parameters, so checkpoints omit them and loading is not strict.
    strict_loading = False
    #: ``compute_loss`` reads frozen features via :meth:`batch_features`, so training can replay cached features.
    supports_feature_cache: bool = False
    #: Cache directory of frozen features (``None``: no cache); methods set it from their ``feature_cache`` argument.
    feature_cache: str | None = None

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
        """The anomalib component callbacks, plus the feature cache when ``feature_cache`` is set."""
        callbacks = list(super().configure_callbacks())
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

    # -- checkpoints ------------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the frozen backbone from the checkpoint and record what it was."""
        super().on_save_checkpoint(checkpoint)
        prefixes = tuple(self._frozen_prefixes())
        state = checkpoint.get("state_dict", {})
        checkpoint["state_dict"] = {k: v for k, v in state.items() if not k.startswith(prefixes)}
        checkpoint["zsad_backbone"] = self.backbone.identity()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the calibrated decision thresholds (``zsad calibrate``) for the predictions writer and exports."""
        super().on_load_checkpoint(checkpoint)
        self.zsad_thresholds = checkpoint.get("zsad_thresholds")
