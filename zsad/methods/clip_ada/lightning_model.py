"""Lightning glue for CLIP-ADA (seed 004): unified multi-class training on normal images with synthetic anomalies.

Paper: Cai, He, Liang, Tong, Bai, "Anomaly Detection by Adapting a pre-trained Vision Language Model",
arXiv 2403.09493 (``shared/seeds/004_0e57b5d1c8f7e3c7.txt``); spec ``shared/specs/clip_ada.md``. No public
implementation exists; the choices zsad made where the paper is silent are listed in this folder's ``README.md``.

Example:
    >>> from zsad.methods.clip_ada import CLIPADA
    >>> model = CLIPADA(backbone="tiny", image_size=98)
    >>> sum(p.numel() for p in model.parameters() if p.requires_grad)  # 4 * 32 + 2 * (32 * 16 + 16)
    1184
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
from zsad.methods.clip_ada.loss import CLIPADALoss, LossResolution
from zsad.methods.clip_ada.torch_model import (
    TEMPERATURE,
    TEMPLATE,
    TOP_K,
    CLIPADAModel,
    Interpolation,
    PromptMode,
    RefineSpace,
)


class CLIPADA(ZSADModule, AnomalibModule):
    """CLIP-ADA: learnable prompt + linear patch projection + anomaly-region refinement over a frozen CLIP.

    Trained self-supervised (BCE against synthetic-anomaly masks) on the normal training images of every category of
    a dataset (unified multi-class protocol), then tested on each category; a trained model can also be applied to
    another dataset (cross-dataset use, a project extension).

    Args:
        backbone: CLIP hub id, local directory or shipped architecture (``tiny`` for tests). The paper uses ViT-B/16
            (``openai/clip-vit-base-patch16``); the project default is ViT-L/14@336.
        weights: ``"pretrained"`` or ``"random"``.
        image_size: Input side (the paper's is lost; 518 on ViT-L/14@336, 256 in the ViT-B/16 config) [unverified].
        layer: 1-based image-encoder layer of the patch tokens (lost in the paper; 18 of 24 default) [unverified].
        num_refinements: Anomaly-region refinement passes ``R`` (1 in the paper; 0 and 2 in its ablation).
        n_ctx: Learnable prompt vectors ``M`` (4 in the paper).
        template: Prompt template; ``{}`` marks where [CLS] was and the vectors go.
        prompt: ``"learnable"`` (the method) or ``"fixed"`` (ablation with the class word "object").
        temperature: ``τ`` of ``sigmoid(cos/τ)`` [unverified].
        learn_scale_bias: Learn the logit scale and a bias (+2 parameters) [option].
        ln_post: Frozen ``post_layernorm`` on the layer tokens before the projection [option, default off].
        detach_coarse: Stop gradients at the map that multiplies the image (default: end-to-end) [option].
        refine_space: Multiply the ``"rgb"`` [0, 1] image (default) or the ``"normalized"`` tensor.
        refine_interpolation: Resize of the coarse map to the image for the product.
        refine_weight: ``λ`` of ``L = L_coarse + λ L_refine`` (1 in the paper).
        loss_resolution: ``"grid"`` (mask area-averaged to the patch grid) or ``"image"`` (map upsampled).
        sigma: Gaussian sigma of the test map (the paper's is lost) [unverified].
        top_k: ``K`` of the image score (500 in the paper).
        top_k_fraction: Use ``K = fraction · H · W`` instead of ``top_k`` [option].
        init_std: Initial standard deviation of the prompt vectors [unverified].
        lr: AdamW learning rate (lost in the paper) [unverified].
        weight_decay: AdamW weight decay (torch default) [unverified].
        milestones: Epochs where the learning rate is multiplied by ``lr_gamma`` (MVTec 400, 700; VisA 250).
        lr_gamma: Learning-rate factor at the milestones (0.2 in the paper).
        pos_interpolation: Position-embedding resize mode of the backbone [unverified].
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
        layer: int = 18,
        num_refinements: int = 1,
        n_ctx: int = 4,
        template: str = TEMPLATE,
        prompt: PromptMode = "learnable",
        temperature: float = TEMPERATURE,
        learn_scale_bias: bool = False,
        ln_post: bool = False,
        detach_coarse: bool = False,
        refine_space: RefineSpace = "rgb",
        refine_interpolation: Interpolation = "bilinear",
        refine_weight: float = 1.0,
        loss_resolution: LossResolution = "grid",
        sigma: float = 4.0,
        top_k: int = TOP_K,
        top_k_fraction: float | None = None,
        init_std: float = 0.02,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        milestones: tuple[int, ...] = (400, 700),
        lr_gamma: float = 0.2,
        pos_interpolation: str = "bicubic",
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
            pos_interpolation=pos_interpolation,
            load_text=True,
        )
        self.model = CLIPADAModel(
            clip,
            layer=layer,
            num_refinements=num_refinements,
            n_ctx=n_ctx,
            template=template,
            prompt=prompt,
            temperature=temperature,
            learn_scale_bias=learn_scale_bias,
            ln_post=ln_post,
            detach_coarse=detach_coarse,
            refine_space=refine_space,
            refine_interpolation=refine_interpolation,
            sigma=sigma,
            top_k=top_k,
            top_k_fraction=top_k_fraction,
            init_std=init_std,
        )
        self.loss = CLIPADALoss(refine_weight=refine_weight, resolution=loss_resolution)

    def compute_loss(self, batch: Any) -> dict[str, torch.Tensor]:  # noqa: ANN401
        """``L_coarse + λ L_refine`` on a batch of (synthetically perturbed) images and their masks.

        Images without a mask (clean normal images) count as all-normal.
        """
        outputs = self.model(batch.image)
        size = tuple(batch.image.shape[-2:])
        mask = batch.gt_mask
        if mask is None:
            mask = torch.zeros(len(batch.image), *size, dtype=torch.bool, device=batch.image.device)
        return self.loss(outputs["logits"], mask.reshape(len(batch.image), *mask.shape[-2:]))

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over the prompt and the projections; learning rate × ``lr_gamma`` at each milestone epoch."""
        optimizer = torch.optim.AdamW(
            self.trainable_parameters(),
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer,
            milestones=list(self.hparams.milestones),
            gamma=self.hparams.lr_gamma,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
