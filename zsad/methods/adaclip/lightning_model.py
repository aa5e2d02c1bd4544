"""Lightning glue for AdaCLIP (Cao et al., ECCV 2024), faithful to the official code caoyunkang/AdaCLIP (e27ee32).

Spec ``shared/specs/baselines.md`` §2 and §7.

Example:
    >>> from zsad.methods.adaclip import AdaCLIP
    >>> model = AdaCLIP(backbone="tiny", weights="random", image_size=98, evaluator=False)
    >>> official = AdaCLIP.from_official_checkpoint("weights/pretrained_mvtec_colondb.pth")  # doctest: +SKIP
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
from zsad.methods.adaclip.checkpoint import convert_official_state_dict
from zsad.methods.adaclip.torch_model import AdaCLIPModel
from zsad.methods.base import ZSADModule
from zsad.methods.losses import BinaryDiceLoss, FocalLoss


class AdaCLIP(ZSADModule, AnomalibModule):
    """AdaCLIP: hybrid static + dynamic prompts in both CLIP towers, linear heads, hybrid semantic fusion.

    Args:
        backbone: CLIP hub id (default OpenAI ViT-L/14@336), local directory or shipped architecture (``tiny``).
        weights: ``"pretrained"`` or ``"random"``.
        image_size: Input side (518; position table resized bicubically without antialias, like open_clip).
        hidden_act: Activation of both towers. ``"gelu"`` (exact) is what the official code ran (open_clip built
            from ``ViT-L-14-336.json`` without ``quick_gelu``) and what its checkpoints expect; ``"quick_gelu"`` is
            OpenAI's training activation.
        layers: 1-based layers whose patch tokens are scored (6, 12, 18, 24).
        prompt_length: Tokens per prompt (5).
        prompt_depth: Prompted blocks from block 0 (4: visual 0–3, text 1–3).
        k_clusters: HSF clusters (20; the top 100 patches are clustered).
        use_hsf: Hybrid semantic fusion for the image score.
        hsf_alpha: Weight of the HSF feature (0.2).
        kmeans_seed: Seed of the HSF k-means++ draws.
        kmeans_backend: ``"torch"`` (on the model's device) or ``"sklearn"`` (the official KMeans on the CPU with
            ``random_state=kmeans_seed``, for parity checks against the official code).
        sigma: Gaussian sigma of the test maps (4).
        fp16_prompts: Round prompts to float16 before use (the official ``.half()``).
        class_words: Category → class word, e.g. ``{nunozumi: concrete block}`` (Gogan's categories default to
            "concrete block"; other categories use the folder name with ``-`` → space, as the official code).
        lr: AdamW learning rate (0.01).
        betas: AdamW betas ((0.5, 0.999)).
        weight_decay: AdamW weight decay (0.01, torch's default the official code relies on).
        official_checkpoint: A released official ``.pth`` loaded after construction.
        pre_processor: anomalib pre-processor or flag.
        post_processor: anomalib post-processor or flag (none by default: raw scores).
        evaluator: Evaluator or flag (zsad's exact per-category evaluator by default).
        visualizer: anomalib visualizer or flag (off by default).
    """

    #: The paper's 439.4M total counts the official enlarged position table (zsad benchmark explains it).
    official_counts_enlarged_position_table = True

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        weights: str = "pretrained",
        image_size: int = 518,
        hidden_act: str = "gelu",
        layers: tuple[int, ...] = (6, 12, 18, 24),
        prompt_length: int = 5,
        prompt_depth: int = 4,
        k_clusters: int = 20,
        use_hsf: bool = True,
        hsf_alpha: float = 0.2,
        kmeans_seed: int = 111,
        kmeans_backend: str = "torch",
        sigma: float = 4.0,
        fp16_prompts: bool = True,
        class_words: dict[str, str] | None = None,
        lr: float = 0.01,
        betas: tuple[float, float] = (0.5, 0.999),
        weight_decay: float = 0.01,
        official_checkpoint: str | None = None,
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
            pos_interpolation="bicubic",
            load_text=True,
            hidden_act=hidden_act,
        )
        self.model = AdaCLIPModel(
            clip,
            layers=tuple(layers),
            prompt_length=prompt_length,
            prompt_depth=prompt_depth,
            k_clusters=k_clusters,
            use_hsf=use_hsf,
            hsf_alpha=hsf_alpha,
            kmeans_seed=kmeans_seed,
            kmeans_backend=kmeans_backend,
            sigma=sigma,
            fp16_prompts=fp16_prompts,
            class_words=class_words,
        )
        self.focal = FocalLoss()
        self.dice = BinaryDiceLoss()
        if official_checkpoint is not None:
            self.load_official_checkpoint(official_checkpoint)

    # -- official weights -------------------------------------------------------------------------------------------

    def load_official_checkpoint(self, path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor]) -> None:
        """Load a released official checkpoint (strict keys and shapes, finite values; see :mod:`.checkpoint`)."""
        expected = {name: p.shape for name, p in self.model.named_parameters() if not name.startswith("backbone.")}
        converted = convert_official_state_dict(path_or_state_dict, expected)
        with torch.no_grad():
            for name, value in converted.items():
                self.model.get_parameter(name).copy_(value)

    # -- inference --------------------------------------------------------------------------------------------------

    def predict_batch(self, batch: Any) -> InferenceBatch:  # noqa: ANN401
        """Score a batch with each image's own class text (``batch.category``)."""
        return self.model(batch.image, getattr(batch, "category", None))

    # -- training ---------------------------------------------------------------------------------------------------

    def loss_from_outputs(self, outputs: dict[str, torch.Tensor], batch: Any) -> dict[str, torch.Tensor]:  # noqa: ANN401
        """``Focal([1−s, s], y) + Σ_l [Focal(S_l, G) + Dice(S_l,abn, G) + Dice(S_l,norm, 1 − G)]``.

        Dice is per image (the official batch-1 code squeezes the mask and so sums per image row; zsad's batches
        need the per-image form). Without masks only the image term is used.
        """
        probs = outputs["image_probs"]
        labels = (batch.gt_label.to(probs.device).float().reshape(-1) > 0.5).long()
        image_loss = self.focal(probs, labels)
        terms = {"image": image_loss.detach()}
        loss = image_loss
        if batch.gt_mask is not None:
            maps = outputs["maps"]  # [B, L, 2, H, W]
            mask = batch.gt_mask.to(maps.device).float().reshape(maps.shape[0], -1, *batch.gt_mask.shape[-2:])[:, 0]
            if mask.shape[-2:] != maps.shape[-2:]:
                mask = F.interpolate(mask.unsqueeze(1), size=maps.shape[-2:], mode="nearest").squeeze(1)
            mask = (mask > 0.5).float()
            pixel = maps.new_zeros(())
            for index in range(maps.shape[1]):
                layer = maps[:, index]
                pixel = pixel + self.focal(layer, mask) + self.dice(layer[:, 1], mask)
                pixel = pixel + self.dice(layer[:, 0], 1 - mask)
            loss = loss + pixel
            terms["pixel"] = pixel.detach()
        return {"loss": loss, **terms}

    def compute_loss(self, batch: Any) -> dict[str, torch.Tensor]:  # noqa: ANN401
        """Loss on a batch of source images (each scored against its own class text)."""
        outputs = self.model.forward_features(batch.image, getattr(batch, "category", None), full_maps=True)
        return self.loss_from_outputs(outputs, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over prompts, prompt generators and heads (lr 0.01, betas (0.5, 0.999), weight decay 0.01)."""
        return torch.optim.AdamW(
            self.trainable_parameters(),
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            weight_decay=self.hparams.weight_decay,
        )
