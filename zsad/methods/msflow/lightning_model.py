"""Lightning glue for MSFlow (Zhou et al., TNNLS 2024), an unsupervised baseline of seed 003's Gogan benchmark.

Spec ``shared/specs/baselines.md`` §5; official code cool-xuan/msflow. Unlike zsad's CLIP methods MSFlow is trained
per category on normal images (``zsad.data.Gogan(root, category)`` / ``zsad.data.MVTecAD``) and uses an ImageNet
CNN, not CLIP.

Example:
    >>> from zsad.methods.msflow import MSFlow
    >>> model = MSFlow(backbone="resnet18", pretrained=False, image_size=64, blocks=(1, 1, 1))
    >>> model.learning_type.value
    'one_class'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from anomalib import LearningType
from anomalib.metrics import Evaluator
from anomalib.models import AnomalibModule
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from torch import nn
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

from zsad.backbone.cnn import ResNetStages
from zsad.methods.base import ZSADModule
from zsad.methods.msflow.torch_model import MSFlowModel

#: ImageNet normalisation of the official ``datasets.py`` (``img_mean``, ``img_std``).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MSFlow(ZSADModule, AnomalibModule):
    """MSFlow: parallel normalising flows on multi-scale ResNet features + a fusion flow; low likelihood = anomaly.

    Args:
        backbone: Feature extractor, a torchvision ResNet name (``wide_resnet50_2``; ``resnet18`` for tests).
        pretrained: torchvision ImageNet weights from the torch hub cache (an offline miss names the file and the
            folder); ``False``: random weights (tests, benchmarks — never results).
        image_size: Input side (256).
        condition_channels: Positional-encoding channels per scale ((64, 64, 64)).
        blocks: All-in-one blocks per scale's parallel flow ((2, 5, 8)).
        clamp: Affine soft-clamping alpha of both flows (1.9).
        top_k: Fraction of the map's pixels averaged into the image score (0.1).
        anomaly_map: Map handed to the evaluator: ``"add"`` (official pixel AUROC) or ``"mul"`` (official AU-PRO).
        lr: Adam learning rate (1e-4).
        warmup_epochs: Epochs of linear warm-up (12: the official 3 meta-epochs x 4 sub-epochs).
        warmup_from: Warm-up start factor of the learning rate (0.3).
        lr_milestones: Epochs at which the learning rate is multiplied by ``lr_gamma`` ((75, 90)).
        lr_gamma: Learning-rate decay factor (0.33).
        grad_clip_norm: Gradient-norm clipping of every step (2).
        pre_processor: anomalib pre-processor or flag (``True``: bicubic resize + ImageNet normalisation).
        post_processor: anomalib post-processor or flag (none by default: raw scores).
        evaluator: Evaluator or flag (zsad's exact per-category evaluator by default).
        visualizer: anomalib visualizer or flag (off by default).
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        pretrained: bool = True,
        image_size: int = 256,
        condition_channels: Sequence[int] = (64, 64, 64),
        blocks: Sequence[int] = (2, 5, 8),
        clamp: float = 1.9,
        top_k: float = 0.1,
        anomaly_map: str = "add",
        lr: float = 1e-4,
        warmup_epochs: int = 12,
        warmup_from: float = 0.3,
        lr_milestones: Sequence[int] = (75, 90),
        lr_gamma: float = 0.33,
        grad_clip_norm: float = 2.0,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = False,
    ) -> None:
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.model = MSFlowModel(
            ResNetStages(backbone, pretrained=pretrained),
            condition_channels=tuple(condition_channels),
            blocks=tuple(blocks),
            clamp=clamp,
            top_k=top_k,
            anomaly_map=anomaly_map,
        )
        self.lr = float(lr)
        self.warmup_epochs = int(warmup_epochs)
        self.warmup_from = float(warmup_from)
        self.lr_milestones = [int(m) for m in lr_milestones]
        self.lr_gamma = float(lr_gamma)
        self.grad_clip_norm = float(grad_clip_norm)

    def configure_pre_processor(self, image_size: int | tuple[int, int] | None = None) -> PreProcessor:
        """Resize to ``image_size`` + ImageNet normalisation, as the official dataset.

        The official resize is PIL's Lanczos, which torchvision's tensor transforms lack; antialiased bicubic is the
        closest tensor filter.
        """
        if image_size is None:
            image_size = self.hparams.get("image_size", 256)
        side = int(image_size[0] if isinstance(image_size, tuple | list) else image_size)
        return PreProcessor(
            transform=Compose(
                [
                    Resize((side, side), interpolation=InterpolationMode.BICUBIC, antialias=True),
                    Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
                ]
            ),
        )

    @property
    def learning_type(self) -> LearningType:
        """One-class: trained per category on normal images."""
        return LearningType.ONE_CLASS

    @property
    def backbone(self) -> ResNetStages:
        """The frozen feature extractor."""
        return self.model.extractor

    def _frozen_prefixes(self) -> list[str]:
        # Pretrained extractor weights are rebuilt from the hyper-parameters; random ones are kept, else a reloaded
        # checkpoint would pair the trained flows with a different random extractor.
        return ["model.extractor."] if self.backbone.pretrained else []

    def compute_loss(self, batch: Any) -> torch.Tensor:  # noqa: ANN401
        """Negative log-likelihood of the batch's normal images under the parallel + fusion flows."""
        return self.model(batch.image)

    def configure_optimizers(self) -> dict[str, Any]:
        """Adam on the flows; per epoch a linear warm-up and a step decay, chained as in the official loop."""
        optimizer = torch.optim.Adam(self.trainable_parameters(), lr=self.lr)
        schedulers = []
        if self.warmup_epochs > 0:
            schedulers.append(
                torch.optim.lr_scheduler.LinearLR(
                    optimizer, start_factor=self.warmup_from, end_factor=1.0, total_iters=self.warmup_epochs
                )
            )
        if self.lr_milestones:
            schedulers.append(
                torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=self.lr_milestones, gamma=self.lr_gamma)
            )
        if not schedulers:
            return {"optimizer": optimizer}
        # Both step once per epoch on the same optimiser; chainable schedulers compose multiplicatively.
        scheduler = (
            schedulers[0] if len(schedulers) == 1 else torch.optim.lr_scheduler.ChainedScheduler(schedulers, optimizer)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip the gradient norm to ``grad_clip_norm`` every step (official ``clip_grad_norm_(params, 2)``)."""
        if gradient_clip_val is None and self.grad_clip_norm > 0:
            gradient_clip_val, gradient_clip_algorithm = self.grad_clip_norm, "norm"
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
