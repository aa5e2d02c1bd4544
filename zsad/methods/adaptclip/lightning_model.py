"""Lightning glue for AdaptCLIP (zero- and few-shot).

Paper: Gao et al., "AdaptCLIP: Adapting CLIP for Universal Visual Anomaly Detection", arXiv 2505.09926; official code
gaobb/AdaptCLIP; spec ``shared/specs/adaptclip.md``.

Training (cross-dataset protocol): the source dataset's labelled test split; every query gets one random normal image
of its category from the source's **train** split as prompt; all adapters are optimised together by one Adam.
Testing: ``k_shot=0`` is the zero-shot model (textual + visual adapters); ``k_shot>0`` also uses the prompt-query
adapter with ``k`` normal images per category from the target's train split, fetched and encoded once per category.

Example:
    >>> from zsad.methods.adaptclip import AdaptCLIP
    >>> model = AdaptCLIP(backbone="tiny", image_size=98, k_shot=1)
    >>> counts = model.model.parameter_counts()  # tiny CLIP (embed 16, text width 32)
    >>> counts["textual"], counts["visual"], counts["zero_shot"]  # 2*12*32, 2*(16*4 + 8 + 4*16)
    (768, 272, 1040)
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from anomalib.metrics import Evaluator
from anomalib.models import AnomalibModule
from anomalib.visualization import Visualizer
from torch import nn

from zsad.backbone import DEFAULT_BACKBONE, create_backbone
from zsad.data import batch_categories
from zsad.methods.adaptclip.official import load_official_checkpoint
from zsad.methods.adaptclip.torch_model import TEMPERATURE, AdaptCLIPModel
from zsad.methods.base import ZSADModule
from zsad.methods.losses import BinaryDiceLoss, FocalLoss, segmentation_loss

logger = logging.getLogger(__name__)


class AdaptCLIP(ZSADModule, AnomalibModule):
    """AdaptCLIP: visual, textual and prompt-query adapters around a frozen CLIP.

    Args:
        backbone: CLIP hub id, local directory or shipped architecture (``tiny`` for tests).
        weights: ``"pretrained"`` or ``"random"``.
        image_size: Input side (518).
        pos_interpolation: Position-embedding resize (``"bilinear"``, as the official code; needed for its adapters).
        layers: 1-based DPAM layers of the prompt-query adapter; the last one feeds the textual and visual adapters.
        dpam_start: First block of the value-value stream (6: the last 19 blocks of ViT-L/14).
        n_ctx: Learnable tokens per class of the textual adapter (12).
        reduction: Hidden-size reduction of the visual adapter (4).
        pq_mid_dim: Width of the prompt-query heads (128).
        pq_context: Joint feature ``q + |q − p|`` (True, released) or ``|q − p|`` (ablation).
        pq_topk: Top-k of the prompt-query image pooling (10).
        temperature: ``τ`` (0.07).
        sigma: Gaussian sigma of the test map (4).
        k_shot: Normal references per category at test time; 0 = zero-shot.
        reference_seed: Seed of the few-shot reference draw (official: 10, 20, 30 averaged).
        official_checkpoint: Path of an official ``epoch_15.pth`` to load into the adapters.
        lr: Adam learning rate.
        betas: Adam betas.
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
        pos_interpolation: str = "bilinear",
        layers: tuple[int, ...] = (6, 12, 18, 24),
        dpam_start: int | None = 6,
        n_ctx: int = 12,
        reduction: int = 4,
        pq_mid_dim: int = 128,
        pq_context: bool = True,
        pq_topk: int = 10,
        temperature: float = TEMPERATURE,
        sigma: float = 4.0,
        k_shot: int = 0,
        reference_seed: int = 10,
        official_checkpoint: str | None = None,
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
        if k_shot < 0:
            msg = f"k_shot must be >= 0 (0 = zero-shot), got {k_shot}."
            raise ValueError(msg)
        # Test-time choices, not properties of the trained adapters: kept out of the checkpoint's hyper-parameters so
        # that `zsad test --config <k-shot config> --ckpt_path <fit checkpoint>` uses the config's k (Lightning lets
        # checkpoint hyper-parameters override the config).
        self.k_shot = int(k_shot)
        self.reference_seed = int(reference_seed)
        self.remove_ignored_hparams(["k_shot", "reference_seed"])
        clip = create_backbone(
            backbone, weights=weights, image_size=image_size, pos_interpolation=pos_interpolation, load_text=True
        )
        self.model = AdaptCLIPModel(
            clip,
            layers=tuple(layers),
            dpam_start=dpam_start,
            n_ctx=n_ctx,
            reduction=reduction,
            pq_mid_dim=pq_mid_dim,
            pq_context=pq_context,
            pq_topk=pq_topk,
            temperature=temperature,
            sigma=sigma,
        )
        if official_checkpoint:
            load_official_checkpoint(self.model, official_checkpoint)
        self.focal = FocalLoss()
        self.dice = BinaryDiceLoss()
        # Few-shot memory: {category: [L, k·N, E]} patch tokens of the category's references (built once per run).
        self._reference_memory: dict[str, torch.Tensor] = {}
        self._reference_datamodule: int | None = None
        self._prompt_generator: torch.Generator | None = None

    # -- training ---------------------------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        """Seed the draw of the training prompts from the run's seed (``seed_everything``)."""
        self._prompt_generator = torch.Generator().manual_seed(torch.initial_seed())

    def _source_reference(self, category: str, seed: int) -> torch.Tensor:
        """One random normal image of ``category`` from the source dataset's train split, ``[1, 3, S, S]``.

        Resized, not normalised, from the datamodule's ``training_references(category, k, seed)``
        (:class:`zsad.data.CrossDataset`); ``few_shot_references`` would draw from the *target*.
        """
        datamodule = self.trainer.datamodule
        hook = getattr(datamodule, "training_references", None)
        if not callable(hook):
            msg = (
                "AdaptCLIP training needs one normal image of each sample's category from the source's train split: "
                f"{type(datamodule).__name__} has no `training_references(category, k, seed)` (use "
                "zsad.data.CrossDataset)."
            )
            raise RuntimeError(msg)
        return hook(category, 1, seed).image

    def _training_prompts(self, batch: Any) -> torch.Tensor:  # noqa: ANN401
        """One random normal train image of the sample's category per query (drawn with replacement), normalised."""
        if self._prompt_generator is None:
            self._prompt_generator = torch.Generator().manual_seed(torch.initial_seed())
        seeds = torch.randint(0, 2**31 - 1, (len(batch.image),), generator=self._prompt_generator).tolist()
        images = [
            self._source_reference(category, seed)
            for category, seed in zip(batch_categories(batch), seeds, strict=True)
        ]
        return self.pre_processor.transform(torch.cat(images).to(self.device))

    def loss_from_outputs(self, out: dict[str, torch.Tensor], batch: Any) -> dict[str, torch.Tensor]:  # noqa: ANN401
        """``Σ_b CE(logits_b, y) + Focal(S_b, G) + Dice(S_b[abn], G) + Dice(S_b[norm], 1 − G)``.

        ``b`` runs over VA, TA and the prompt-query adapter's layers; all weights 1.
        """
        size = out["va_maps"].shape[-2:]
        labels = batch.gt_label.to(self.device).long()
        mask = batch.gt_mask
        mask = torch.zeros(len(labels), *size, dtype=torch.bool) if mask is None else mask.reshape(len(labels), *size)
        mask = mask.to(self.device)
        branches = [
            ("visual", out["va_logits"], out["va_maps"][:, 1]),
            ("textual", out["ta_logits"], out["ta_maps"][:, 1]),
        ]
        if "pq_logits" in out:
            branches += [
                (f"prompt_query_{layer}", out["pq_logits"][:, i], out["pq_maps"][:, i, 1])
                for i, layer in enumerate(self.model.layers)
            ]
        terms = {
            name: F.cross_entropy(logits, labels) + segmentation_loss(probs, mask, self.focal, self.dice)
            for name, logits, probs in branches
        }
        loss = torch.stack(list(terms.values())).sum()
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}}

    def compute_loss(self, batch: Any) -> dict[str, torch.Tensor]:  # noqa: ANN401
        """One step: query and prompt images encoded in one frozen pass, then all three adapters (1-shot)."""
        images = batch.image
        prompts = self._training_prompts(batch)
        features = self.model.encode(torch.cat([images, prompts.to(images.dtype)]))
        batch_size = len(images)
        query = {k: v[:batch_size] for k, v in features.items()}
        out = self.model.forward_features(query, tuple(images.shape[-2:]), features["patch_tokens"][batch_size:])
        return self.loss_from_outputs(out, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """One Adam over all adapters (no scheduler, no weight decay)."""
        return torch.optim.Adam(self.trainable_parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas))

    # -- inference --------------------------------------------------------------------------------------------------

    def _clear_references(self) -> None:
        self._reference_memory = {}
        self._reference_datamodule = None

    def on_test_start(self) -> None:
        """References are drawn afresh for every test run (the datamodule or ``k_shot`` may have changed)."""
        self._clear_references()

    def on_predict_start(self) -> None:
        """As :meth:`on_test_start`."""
        self._clear_references()

    def reference_tokens(self, category: str) -> torch.Tensor:
        """``[L, k·N, E]`` patch tokens of the category's ``k`` normal references.

        Fetched from the datamodule, normalised and encoded once per category and run.
        """
        datamodule = self.trainer.datamodule
        if self._reference_datamodule != id(datamodule):
            self._reference_memory = {}
            self._reference_datamodule = id(datamodule)
        if category not in self._reference_memory:
            k, seed = self.k_shot, self.reference_seed
            references = datamodule.few_shot_references(category, k, seed)
            images = self.pre_processor.transform(references.image.to(self.device))
            self._reference_memory[category] = self.model.encode_references(images)
        return self._reference_memory[category]

    def predict_batch(self, batch: Any) -> InferenceBatch:  # noqa: ANN401
        """Zero-shot, or k-shot with each sample scored against its category's references."""
        if self.k_shot == 0:
            return self.model(batch.image)
        categories = batch_categories(batch)
        groups: dict[str, list[int]] = {}
        for index, category in enumerate(categories):
            groups.setdefault(category, []).append(index)
        if len(groups) == 1:
            return self.model(batch.image, self.reference_tokens(categories[0]))
        scores = torch.empty(len(categories), device=self.device)
        maps = torch.empty(len(categories), *batch.image.shape[-2:], device=self.device)
        for category, indices in groups.items():
            index = torch.tensor(indices, device=self.device)
            pred = self.model(batch.image[index], self.reference_tokens(category))
            scores[index] = pred.pred_score
            maps[index] = pred.anomaly_map
        return InferenceBatch(pred_score=scores, anomaly_map=maps)
