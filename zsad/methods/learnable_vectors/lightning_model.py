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

from typing import Any, Literal

import torch
from anomalib.metrics import Evaluator
from anomalib.models import AnomalibModule
from anomalib.visualization import Visualizer
from torch import nn

from zsad.backbone import DEFAULT_BACKBONE, CLIPBackbone, create_backbone
from zsad.methods.anomaly_map import upsample
from zsad.methods.base import ZSADModule
from zsad.methods.learnable_vectors.torch_model import ImageScore, LayerWeighting, LearnableVectorsModel
from zsad.methods.losses import BinaryDiceLoss, FocalLoss, segmentation_loss

#: Prompts whose frozen-CLIP text features initialise the vectors with ``init="text"`` (ablation ``use_text_init``).
TEXT_INIT_PROMPTS = ("a photo of a normal object.", "a photo of a damaged object.")


class LearnableVectors(ZSADModule, AnomalibModule):
    """Image-encoder-only ZSAD with per-layer learnable normal/abnormal vectors and learnable layer weights.

    Faithful defaults (``shared/specs/learnable_vectors.md`` §7): ViT-L/14@336 image encoder only, 518 px, residual
    tokens of layers 6/12/18/24 through the frozen ``post_layernorm`` + ``visual_projection``, five independent 768-d
    pairs, ``w = softmax(θ)``, ``τ = 0.07``, Focal + Dice on the fused map + Focal on the image score, Adam 1e-3
    β (0.5, 0.999): 7,684 trainable parameters. Items marked ``[unverified]`` are project defaults.

    Args:
        backbone: CLIP hub id, local directory or shipped architecture (``tiny`` for tests).
        weights: ``"pretrained"`` or ``"random"``.
        image_size: Input side (518 as the compared baselines; ``[unverified]`` for the seed).
        layers: 1-based patch layers ``L``.
        temperature: ``τ`` (0.07 default, ``[unverified]``); fixed, never learned.
        sigma: Gaussian sigma of the test maps (4, ``[unverified]``).
        global_ln_post: ``post_layernorm`` on the global token (default True, ``[unverified]``).
        layer_weighting: ``"softmax"`` learnable ``w(l) = softmax(θ)`` (``[unverified]`` parametrisation) or
            ``"fixed"`` equal weights (ablation, 7,680 parameters).
        shared_vectors: One pair for the image and every layer (ablation, 1,540 parameters).
        init: ``"normal"``: vectors ~ N(0, ``init_std``²) (``[unverified]``); ``"text"``: every pair starts at the
            frozen-CLIP text features of ``TEXT_INIT_PROMPTS`` (ablation; the text tower is loaded once at
            construction and dropped).
        init_std: Standard deviation of the ``"normal"`` initialisation.
        dpam_start: Use DPAM value-value tokens from this layer (ablation; ``None`` = residual stream, faithful).
        image_score: ``"global"`` (faithful) or ``"global+max"`` (ablation).
        upsample_mode: Interpolation of the layer maps to the input size (probabilities, ``align_corners=False``).
        image_loss: ``"focal"`` on ``[1−s, s]`` (default, ``[unverified]``) or ``"ce"`` on the logits (AnomalyCLIP).
        image_loss_weight: Weight of the image-level term (1, ``[unverified]``).
        per_layer_loss: Also apply the pixel loss to every upsampled layer map ``S^(l)`` (option).
        lr: Adam learning rate (1e-3, ``[unverified]``).
        betas: Adam betas (AnomalyCLIP's (0.5, 0.999), ``[unverified]`` for the seed).
        feature_cache: Directory of the frozen-feature cache; training then runs over stored encoder features
            (:mod:`zsad.backbone.cache`). ``None``: encode every batch.
        pre_processor: anomalib pre-processor or flag.
        post_processor: anomalib post-processor or flag (none by default: raw scores).
        evaluator: Evaluator or flag (zsad's exact per-category evaluator by default).
        visualizer: anomalib visualizer or flag (off by default).
    """

    supports_feature_cache = True

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        weights: Literal["pretrained", "random"] = "pretrained",
        image_size: int = 518,
        layers: tuple[int, ...] = (6, 12, 18, 24),
        temperature: float = 0.07,
        sigma: float = 4.0,
        global_ln_post: bool = True,
        layer_weighting: LayerWeighting = "softmax",
        shared_vectors: bool = False,
        init: Literal["normal", "text"] = "normal",
        init_std: float = 0.02,
        dpam_start: int | None = None,
        image_score: ImageScore = "global",
        upsample_mode: Literal["bilinear", "bicubic"] = "bilinear",
        image_loss: Literal["focal", "ce"] = "focal",
        image_loss_weight: float = 1.0,
        per_layer_loss: bool = False,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.5, 0.999),
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
        if init not in ("normal", "text"):
            msg = f"init must be 'normal' or 'text', got {init!r}."
            raise ValueError(msg)
        if image_loss not in ("focal", "ce"):
            msg = f"image_loss must be 'focal' or 'ce', got {image_loss!r}."
            raise ValueError(msg)
        # Vision tower only: the method has no text encoder, so none is held in memory (``init="text"`` loads the
        # text tower for the initial vectors and drops it).
        clip = create_backbone(backbone, weights=weights, image_size=image_size, load_text=init == "text")
        self.model = LearnableVectorsModel(
            clip,
            layers=tuple(layers),
            temperature=temperature,
            sigma=sigma,
            global_ln_post=global_ln_post,
            layer_weighting=layer_weighting,
            shared_vectors=shared_vectors,
            init_std=init_std,
            upsample_mode=upsample_mode,
            dpam_start=dpam_start,
            image_score=image_score,
        )
        if init == "text":
            self.model.set_vectors(_text_pair(clip))
        self.feature_cache = feature_cache
        self.focal = FocalLoss()
        self.dice = BinaryDiceLoss()

    def loss_from_outputs(self, outputs: dict[str, torch.Tensor], batch: Any) -> dict[str, torch.Tensor]:  # noqa: ANN401
        """``Focal([1−s, s], y) + Focal([1−M, M], G) + Dice(M, G) + Dice(1−M, 1−G)`` (plus the options)."""
        anomaly_map = outputs["anomaly_map"]
        mask = batch.gt_mask
        if mask is None:
            mask = torch.zeros_like(anomaly_map, dtype=torch.bool)
        mask = mask.reshape(anomaly_map.shape).to(anomaly_map.device)
        score = outputs["image_score"]
        labels = batch.gt_label.to(score.device).long()
        if self.hparams.image_loss == "ce":
            image_loss = nn.functional.cross_entropy(outputs["image_logits"], labels)
        else:
            image_loss = self.focal(torch.stack([1.0 - score, score], dim=1), labels)
        pixel_loss = segmentation_loss(anomaly_map, mask, self.focal, self.dice)
        terms = {"image": image_loss.detach(), "pixel": pixel_loss.detach()}
        if self.hparams.per_layer_loss:
            layer_maps = upsample(outputs["layer_maps"], anomaly_map.shape[-2:], mode=self.model.upsample_mode)
            layer_loss = sum(
                segmentation_loss(layer_maps[:, i], mask, self.focal, self.dice) for i in range(layer_maps.shape[1])
            )
            pixel_loss = pixel_loss + layer_loss
            terms["layers"] = layer_loss.detach()
        loss = self.hparams.image_loss_weight * image_loss + pixel_loss
        return {"loss": loss, **terms}

    def compute_loss(self, batch: Any) -> dict[str, torch.Tensor]:  # noqa: ANN401
        """Loss on a batch of source-domain images with masks (or their cached encoder features)."""
        features, image_size = self.batch_features(batch)
        return self.loss_from_outputs(self.model.forward_features(features, image_size), batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over the vectors and layer weights."""
        return torch.optim.Adam(self.trainable_parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas))


def _text_pair(clip: CLIPBackbone) -> torch.Tensor:
    """Frozen-CLIP text features of :data:`TEXT_INIT_PROMPTS`, after which the text tower is dropped."""
    pair = clip.encode_text(list(TEXT_INIT_PROMPTS)).clone()
    clip.text = None
    clip.text_projection = None
    clip._text_cache.clear()  # noqa: SLF001 - the cache holds text features only
    return pair
