"""Lightning glue for the learnable-vector method (seed 000).

Paper: 「ゼロショット異常検知のための学習可能ベクトルと階層構造への適応によるファインチューニング」, MIRU 2025
(``shared/seeds/000_ea077a1c146f87c6.txt``); spec ``shared/specs/learnable_vectors.md``.

Example:
    >>> from zsad.methods import LearnableVectors
    >>> model = LearnableVectors(backbone="tiny", image_size=98)
    >>> sum(p.numel() for p in model.parameters() if p.requires_grad)  # (1 + 4) * 2 * 16 + 4
    164
"""

from __future__ import annotations

from typing import Any

import torch
from anomalib.metrics import Evaluator
from anomalib.models import AnomalibModule
from anomalib.visualization import Visualizer
from torch import nn

from zsad.backbone import DEFAULT_BACKBONE, create_backbone
from zsad.methods.base import ZSADModule
from zsad.methods.learnable_vectors.torch_model import LayerWeighting, LearnableVectorsModel
from zsad.methods.losses import BinaryDiceLoss, FocalLoss, segmentation_loss


class LearnableVectors(ZSADModule, AnomalibModule):
    """Image-encoder-only ZSAD with per-layer learnable normal/abnormal vectors and learnable layer weights.

    Args:
        backbone: CLIP hub id, local directory or shipped architecture (``tiny`` for tests).
        weights: ``"pretrained"`` or ``"random"``.
        image_size: Input side (518 as the compared baselines; ``[unverified]`` for the seed).
        layers: 1-based patch layers ``L``.
        temperature: ``τ`` (0.07 default, ``[unverified]``).
        sigma: Gaussian sigma of the test maps.
        global_ln_post: ``post_layernorm`` on the global token (default True, ``[unverified]``).
        layer_weighting: ``"softmax"`` learnable ``w(l)`` or ``"fixed"`` equal weights.
        shared_vectors: One pair for every level (ablation).
        init_std: Initial standard deviation of the vectors.
        dpam_start: Use DPAM value-value tokens from this layer (ablation; ``None`` = residual stream, faithful).
        image_loss_weight: Weight of the image-level focal term.
        lr: Adam learning rate.
        betas: Adam betas (AnomalyCLIP's (0.5, 0.999), ``[unverified]`` for the seed).
        pre_processor: anomalib pre-processor or flag.
        post_processor: anomalib post-processor or flag (none by default: raw scores).
        evaluator: Evaluator or flag (zsad's exact per-category evaluator by default).
        visualizer: anomalib visualizer or flag (off by default).
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        weights: str = "pretrained",
        image_size: int = 518,
        layers: tuple[int, ...] = (6, 12, 18, 24),
        temperature: float = 0.07,
        sigma: float = 4.0,
        global_ln_post: bool = True,
        layer_weighting: LayerWeighting = "softmax",
        shared_vectors: bool = False,
        init_std: float = 0.02,
        dpam_start: int | None = None,
        image_loss_weight: float = 1.0,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.5, 0.999),
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
        # Vision tower only: the method has no text encoder, so none is held in memory.
        clip = create_backbone(backbone, weights=weights, image_size=image_size, load_text=False)
        self.model = LearnableVectorsModel(
            clip,
            layers=tuple(layers),
            temperature=temperature,
            sigma=sigma,
            global_ln_post=global_ln_post,
            layer_weighting=layer_weighting,
            shared_vectors=shared_vectors,
            init_std=init_std,
            dpam_start=dpam_start,
        )
        self.focal = FocalLoss()
        self.dice = BinaryDiceLoss()

    def loss_from_outputs(self, outputs: dict[str, torch.Tensor], batch: Any) -> dict[str, torch.Tensor]:  # noqa: ANN401
        """``Focal([1−s, s], y) + Focal([1−M, M], G) + Dice(M, G) + Dice(1−M, 1−G)``."""
        anomaly_map = outputs["anomaly_map"]
        mask = batch.gt_mask
        if mask is None:
            mask = torch.zeros_like(anomaly_map, dtype=torch.bool)
        mask = mask.reshape(anomaly_map.shape).to(anomaly_map.device)
        score = outputs["image_score"]
        labels = batch.gt_label.to(score.device).long()
        image_loss = self.focal(torch.stack([1.0 - score, score], dim=1), labels)
        pixel_loss = segmentation_loss(anomaly_map, mask, self.focal, self.dice)
        loss = self.hparams.image_loss_weight * image_loss + pixel_loss
        return {"loss": loss, "image": image_loss.detach(), "pixel": pixel_loss.detach()}

    def compute_loss(self, batch: Any) -> dict[str, torch.Tensor]:  # noqa: ANN401
        """Loss on a batch of source-domain images with masks."""
        return self.loss_from_outputs(self.model(batch.image), batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over the vectors and layer weights."""
        return torch.optim.Adam(self.trainable_parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas))
