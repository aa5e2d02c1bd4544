"""Lightning glue for AnomalyCLIP (Zhou et al., ICLR 2024), faithful to the official code zqhang/AnomalyCLIP.

Spec ``shared/specs/anomalyclip.md``; seed ``shared/seeds/001_7fd4718f6c841dc8.txt``.

Example:
    >>> from zsad.methods.anomalyclip import AnomalyCLIP
    >>> model = AnomalyCLIP(backbone="tiny", image_size=98)
    >>> sum(p.numel() for p in model.parameters() if p.requires_grad)  # (2 * 12 + 8 * 4) * 32
    1792
    >>> official = AnomalyCLIP.from_official_checkpoint("checkpoints/9_12_4_multiscale/epoch_15.pth")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.metrics import Evaluator
from anomalib.models import AnomalibModule
from anomalib.visualization import Visualizer
from torch import nn

from zsad.backbone import DEFAULT_BACKBONE, create_backbone
from zsad.methods.anomalyclip.torch_model import AnomalyCLIPModel
from zsad.methods.base import ZSADModule
from zsad.methods.losses import BinaryDiceLoss, FocalLoss


class AnomalyCLIP(ZSADModule, AnomalibModule):
    """AnomalyCLIP: object-agnostic normal/abnormal prompts + deep text prompts, DPAM patch features.

    Args:
        backbone: CLIP hub id (default OpenAI ViT-L/14@336), local directory or shipped architecture (``tiny``).
        weights: ``"pretrained"`` or ``"random"``.
        image_size: Input side (518; position embeddings bilinearly interpolated to it).
        layers: 1-based DPAM layers whose maps are scored and trained. ``[24]`` reproduces every published number
            and released checkpoint (an aliasing bug made the official 6/12/18 maps copies of 24);
            ``[6, 12, 18, 24]`` is the paper's genuinely multi-layer model, a different (weaker) model.
        n_ctx: Learnable context vectors per prompt (12).
        prompt_depth: Input + number of text layers with deep prompts (9).
        deep_prompt_length: Hidden positions replaced by each deep prompt (4).
        dpam_start: First DPAM layer (6 = the official ``DPAM_layer=20``: the last 19 of 24 blocks).
        temperature: Fixed logit temperature (0.07).
        sigma: Gaussian sigma of the test maps (4).
        map_loss_weight: ``λ`` of the pixel terms per map layer (4: the official ``train.py`` weights the pixel
            loss by 4 whatever ``features_list`` is, also with ``[6, 12, 18, 24]``). ``None`` means 4 as well
            (kept for old configs); 1 is the paper's text.
        init_std: Standard deviation of the prompts' initialisation (0.02).
        fp16_deep_prompts: Round deep prompts to float16 before use, like the official code.
        lr: Adam learning rate (1e-3).
        betas: Adam betas ((0.5, 0.999)).
        official_checkpoint: Path of a released official prompt learner (``epoch_15.pth``) loaded after
            construction: the published model without training.
        feature_cache: Directory of the frozen-feature cache; training then runs over stored DPAM features
            (:mod:`zsad.backbone.cache`, fp16 by default). ``None``: encode every batch.
        pre_processor: anomalib pre-processor or flag.
        post_processor: anomalib post-processor or flag (none by default: raw scores).
        evaluator: Evaluator or flag (zsad's exact per-category evaluator by default).
        visualizer: anomalib visualizer or flag (off by default).
    """

    supports_feature_cache = True

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        weights: str = "pretrained",
        image_size: int = 518,
        layers: tuple[int, ...] = (24,),
        n_ctx: int = 12,
        prompt_depth: int = 9,
        deep_prompt_length: int = 4,
        dpam_start: int = 6,
        temperature: float = 0.07,
        sigma: float = 4.0,
        map_loss_weight: float | None = 4.0,
        init_std: float = 0.02,
        fp16_deep_prompts: bool = True,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.5, 0.999),
        official_checkpoint: str | None = None,
        feature_cache: str | None = None,
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
        clip = create_backbone(
            backbone,
            weights=weights,
            image_size=image_size,
            pos_interpolation="bilinear",
            load_text=True,
            hidden_act="quick_gelu",
        )
        self.model = AnomalyCLIPModel(
            clip,
            layers=tuple(layers),
            n_ctx=n_ctx,
            prompt_depth=prompt_depth,
            deep_prompt_length=deep_prompt_length,
            dpam_start=dpam_start,
            temperature=temperature,
            sigma=sigma,
            init_std=init_std,
            fp16_deep_prompts=fp16_deep_prompts,
        )
        if map_loss_weight is None:
            map_loss_weight = 4.0
        self.map_loss_weight = float(map_loss_weight)
        self.feature_cache = feature_cache
        self.focal = FocalLoss()
        self.dice = BinaryDiceLoss()
        if official_checkpoint is not None:
            self.load_official_checkpoint(official_checkpoint)

    # -- official weights -------------------------------------------------------------------------------------------

    def load_official_checkpoint(self, path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor]) -> None:
        """Load a prompt learner released with the official code into this model (see :mod:`.checkpoint`)."""
        self.model.load_official_checkpoint(path_or_state_dict)

    # -- training ---------------------------------------------------------------------------------------------------

    def loss_from_outputs(self, outputs: dict[str, torch.Tensor], batch: Any) -> dict[str, torch.Tensor]:  # noqa: ANN401
        """``CE(ĝT̂ᵀ/τ, y) + λ Σ_l [Focal(S^(l), G) + Dice(S^(l)_abn, G) + Dice(S^(l)_norm, 1 − G)]``.

        Without masks (``gt_mask`` is ``None``: a custom dataset with labels only) the global term alone is used,
        as the authors advise.
        """
        logits = outputs["image_logits"]
        labels = batch.gt_label.to(logits.device).long().reshape(-1)
        image_loss = F.cross_entropy(logits, labels)
        terms = {"image": image_loss.detach()}
        loss = image_loss
        if batch.gt_mask is not None:
            maps = outputs["maps"]  # [B, L, 2, H, W] upsampled probabilities
            mask = batch.gt_mask.to(maps.device).float().reshape(maps.shape[0], -1, *batch.gt_mask.shape[-2:])[:, 0]
            if mask.shape[-2:] != maps.shape[-2:]:
                mask = F.interpolate(mask.unsqueeze(1), size=maps.shape[-2:], mode="nearest").squeeze(1)
            mask = (mask > 0.5).float()
            pixel_loss = maps.new_zeros(())
            for index in range(maps.shape[1]):
                layer = maps[:, index]
                pixel_loss = pixel_loss + self.focal(layer, mask)
                pixel_loss = pixel_loss + self.dice(layer[:, 1], mask) + self.dice(layer[:, 0], 1.0 - mask)
            loss = loss + self.map_loss_weight * pixel_loss
            terms["pixel"] = pixel_loss.detach()
        return {"loss": loss, **terms}

    def compute_loss(self, batch: Any) -> dict[str, torch.Tensor]:  # noqa: ANN401
        """Loss on a batch of source-domain images or their cached DPAM features.

        The two prompts go through the text tower once for the whole batch (they change at every optimiser step).
        """
        features, image_size = self.batch_features(batch)
        return self.loss_from_outputs(self.model.forward_features(features, image_size, full_maps=True), batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over the prompts (lr 1e-3, betas (0.5, 0.999))."""
        return torch.optim.Adam(self.trainable_parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas))
