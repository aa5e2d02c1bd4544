"""Lightning glue for APRIL-GAN (VAND 2023 zero-shot winner), faithful to the official code ByChelsea/VAND-APRIL-GAN.

Spec ``shared/specs/baselines.md`` §1, §7.

Example:
    >>> from zsad.methods.april_gan import APRILGAN
    >>> model = APRILGAN(backbone="tiny", weights="random", image_size=98)
    >>> sum(p.numel() for p in model.parameters() if p.requires_grad)  # 4 x Linear(32 -> 16)
    2112
    >>> official = APRILGAN(official_checkpoint="exps/pretrained/visa_pretrained.pth")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from anomalib.metrics import Evaluator
from anomalib.models import AnomalibModule
from anomalib.visualization import Visualizer
from torch import nn

from zsad.backbone import DEFAULT_BACKBONE, create_backbone
from zsad.data.dataclasses import batch_categories
from zsad.methods.april_gan.torch_model import APRILGANModel
from zsad.methods.base import ZSADModule
from zsad.methods.losses import BinaryDiceLoss, FocalLoss

#: Gogan's categories are named after the way the blocks are laid (seed 003); neither name means anything to CLIP,
#: so the prompts say "concrete block" (``shared/specs/baselines.md`` §6, [unverified]: the seed does not say).
GOGAN_CLASS_WORDS: dict[str, str] = {"nunozumi": "concrete block", "tanizumi": "concrete block"}


class APRILGAN(ZSADModule, AnomalibModule):
    """APRIL-GAN: four linear heads map frozen CLIP patch tokens onto a fixed, class-aware text ensemble.

    Args:
        backbone: CLIP hub id (default OpenAI ViT-L/14@336), local directory or shipped architecture (``tiny``).
        weights: ``"pretrained"`` or ``"random"``.
        image_size: Input side (518; position table resized bicubically to it).
        layers: 1-based layers whose raw residual tokens are mapped ((6, 12, 18, 24)).
        class_words: ``category → class word`` in the prompts. ``None``: Gogan's ``nunozumi`` / ``tanizumi`` →
            "concrete block" (:data:`GOGAN_CLASS_WORDS`); every other category uses its raw folder name, as the
            official code (``metal_nut``, ``pipe_fryum``). A given mapping replaces the default entirely.
        hidden_act: Activation of both CLIP towers. ``"gelu"`` (exact erf GELU) is what the official code ran the
            OpenAI weights with (open_clip's ``ViT-L-14-336.json`` has no ``quick_gelu`` flag) and what its released
            heads were trained on; ``"quick_gelu"`` is the activation CLIP was trained with.
        pos_antialias: Resize the position table with antialias, as the official open_clip does (bicubic with
            ``antialias=True``); ``False`` is transformers' plain bicubic.
        logit_scale: Fixed scale of the cosine similarities (100).
        lr: Adam learning rate (1e-3).
        betas: Adam betas ((0.5, 0.999)).
        official_checkpoint: Path of released heads (``exps/pretrained/{mvtec,visa}_pretrained.pth``) loaded after
            construction: the published model without training.
        feature_cache: Directory of the frozen-feature cache; training then runs over stored encoder features
            (:mod:`zsad.backbone.cache`). ``None``: encode every batch. Refused with mosaics (random per epoch).
        pre_processor: anomalib pre-processor or flag.
        post_processor: anomalib post-processor or flag (none by default: raw scores).
        evaluator: Evaluator or flag (zsad's exact per-category evaluator by default).
        visualizer: anomalib visualizer or flag (off by default).
    """

    #: The paper's 431.9M total counts the official enlarged position table (zsad benchmark explains it).
    official_counts_enlarged_position_table = True

    supports_feature_cache = True

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        weights: str = "pretrained",
        image_size: int = 518,
        layers: tuple[int, ...] = (6, 12, 18, 24),
        class_words: dict[str, str] | None = None,
        hidden_act: str = "gelu",
        pos_antialias: bool = True,
        logit_scale: float = 100.0,
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
        if hidden_act not in ("gelu", "quick_gelu"):
            msg = f"hidden_act must be 'gelu' (the official code) or 'quick_gelu' (CLIP's own), got {hidden_act!r}."
            raise ValueError(msg)
        clip = create_backbone(
            backbone,
            weights=weights,
            image_size=image_size,
            pos_interpolation="bicubic",
            pos_antialias=pos_antialias,
            load_text=True,
            hidden_act=hidden_act,
        )
        self.model = APRILGANModel(
            clip,
            layers=tuple(layers),
            class_words=GOGAN_CLASS_WORDS if class_words is None else class_words,
            logit_scale=logit_scale,
        )
        self.feature_cache = feature_cache
        self.focal = FocalLoss()
        self.dice = BinaryDiceLoss()
        if official_checkpoint is not None:
            self.load_official_checkpoint(official_checkpoint)

    # -- official weights -------------------------------------------------------------------------------------------

    def load_official_checkpoint(self, path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor]) -> None:
        """Load linear heads released with the official code (strict key and shape checks; see the torch model)."""
        self.model.load_official_checkpoint(path_or_state_dict)

    # -- training ---------------------------------------------------------------------------------------------------

    def loss_from_outputs(self, outputs: dict[str, torch.Tensor], batch: Any) -> dict[str, torch.Tensor]:  # noqa: ANN401
        """``Σ_l [Focal(S_l, G) + Dice(S_l[abnormal], G)]`` (no normal-channel Dice, no image term)."""
        if batch.gt_mask is None:
            msg = (
                "APRIL-GAN trains on pixel masks only (its loss has no image term): the training batches carry no "
                "gt_mask. Train on a dataset with masks (the test split of MVTec AD / VisA, as the official protocol)."
            )
            raise ValueError(msg)
        maps = outputs["maps"]  # [B, L, 2, H, W]
        mask = batch.gt_mask.to(maps.device).float().reshape(maps.shape[0], -1, *batch.gt_mask.shape[-2:])[:, 0]
        if mask.shape[-2:] != maps.shape[-2:]:
            mask = F.interpolate(mask.unsqueeze(1), size=maps.shape[-2:], mode="nearest").squeeze(1)
        mask = (mask > 0.5).float()
        loss = maps.new_zeros(())
        for index in range(maps.shape[1]):
            loss = loss + self.focal(maps[:, index], mask) + self.dice(maps[:, index, 1], mask)
        return {"loss": loss}

    def compute_loss(self, batch: Any) -> dict[str, torch.Tensor]:  # noqa: ANN401
        """Loss on a batch of source-domain images (or their cached features), each scored with its own class text."""
        features, image_size = self.batch_features(batch)
        outputs = self.model.forward_features(features, image_size, batch_categories(batch))
        return self.loss_from_outputs(outputs, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over the four heads (lr 1e-3, betas (0.5, 0.999))."""
        return torch.optim.Adam(self.trainable_parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas))

    # -- inference --------------------------------------------------------------------------------------------------

    def predict_batch(self, batch: Any) -> InferenceBatch:  # noqa: ANN401
        """Score each image against its own category's text (the official test used the first image's class)."""
        return self.model(batch.image, categories=batch_categories(batch))
