"""Lightning glue for WinCLIP / WinCLIP+ (training-free; zero-shot and k-shot).

Paper: Jeong et al., "WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation", CVPR 2023; reference
implementation anomalib 2.7 ``WinClip`` (spec ``shared/specs/baselines.md`` §3). Scores and maps equal anomalib's on
identical weights (tests/methods/winclip/test_anomalib_equivalence.py).

Nothing is trained: ``zsad test`` runs directly. The class word of the prompts comes from each sample's category
(``batch.category``), with per-category overrides (Gogan's categories are "concrete block"); with ``k_shot > 0`` the
``k`` normal references of each category are drawn from the datamodule's train split
(``datamodule.few_shot_references(category, k, seed)``) and encoded once per category and run.

Example:
    >>> from zsad.methods.winclip import WinCLIP
    >>> model = WinCLIP(backbone="tiny", weights="random", image_size=98)
    >>> model.model.scales
    (2, 3)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import InferenceBatch
from anomalib.metrics import Evaluator
from anomalib.models import AnomalibModule
from anomalib.visualization import Visualizer
from torch import nn

from zsad.backbone import BackboneWeightsNotFoundError, create_backbone
from zsad.backbone.ensembles import class_word
from zsad.data import GOGAN_CATEGORIES, batch_categories
from zsad.methods.base import ZSADModule
from zsad.methods.winclip.torch_model import TEMPERATURE, WinCLIPModel

logger = logging.getLogger(__name__)

#: Where ``zsad convert-weights`` puts WinCLIP's open_clip ViT-B-16-plus-240 / laion400m_e31 weights by default.
DEFAULT_WINCLIP_BACKBONE = "weights/vit_b_16_plus_240-laion400m_e31"
#: The shipped architecture of that backbone (for ``weights="random"``).
WINCLIP_ARCHITECTURE = "vit_b_16_plus_240"
#: Class words that differ from the folder name: Gogan's categories are kinds of masonry of concrete blocks.
DEFAULT_CLASS_WORDS: dict[str, str] = dict.fromkeys(GOGAN_CATEGORIES, "concrete block")

_CONVERT_HELP = (
    "WinCLIP's backbone is open_clip's ViT-B-16-plus-240 (laion400m_e31), converted once to a Hugging Face directory:\n"
    '  1. on a machine with network access: python -c "import open_clip; '
    "open_clip.create_model('ViT-B-16-plus-240', pretrained='laion400m_e31')\"\n"
    "     (downloads ~/.cache/clip/vit_b_16_plus_240-laion400m_e31-8fb26589.pt)\n"
    "  2. zsad convert-weights --format open_clip --arch ViT-B-16-plus-240 "
    "--input ~/.cache/clip/vit_b_16_plus_240-laion400m_e31-8fb26589.pt --output {dir}\n"
    "  or pass another directory with --model.init_args.backbone=<dir>; --model.init_args.weights=random runs the "
    "architecture with random weights (results then mean nothing)."
)


def _resolve_backbone(backbone: str, weights: str) -> str:
    """The default directory, or its architecture for random weights; a clear error when it was never converted."""
    if backbone != DEFAULT_WINCLIP_BACKBONE:
        return backbone
    if weights == "random":
        return WINCLIP_ARCHITECTURE
    if not Path(backbone).expanduser().is_dir():
        msg = f"WinCLIP backbone directory {backbone!r} not found.\n" + _CONVERT_HELP.format(dir=backbone)
        raise BackboneWeightsNotFoundError(msg)
    return backbone


class WinCLIP(ZSADModule, AnomalibModule):
    """WinCLIP (zero-shot) and WinCLIP+ (``k_shot > 0``) on the shared frozen CLIP.

    Args:
        backbone: Hugging Face CLIP directory (default: the converted ViT-B-16-plus-240, see
            ``zsad convert-weights``), hub id, or shipped architecture (``tiny`` for tests).
        weights: ``"pretrained"`` or ``"random"``.
        image_size: Input side (240, the backbone's native size; anomalib fixes it).
        scales: Window sides in patches (anomalib: 2 and 3).
        temperature: Softmax temperature of the class scores (0.07).
        class_name: One class word for every sample (anomalib's ``class_name``); ``None`` = from each category.
        class_names: Per-category class words, on top of :data:`DEFAULT_CLASS_WORDS`; other categories use their
            folder name as anomalib does (``metal_nut``).
        k_shot: Normal references per category (WinCLIP+); 0 = zero-shot.
        reference_seed: Seed of the reference draw.
        window_chunk: At most this many window sequences per encoder call (memory bound only).
        pre_processor: anomalib pre-processor or flag (Resize 240 bicubic antialias + OpenAI normalisation).
        post_processor: anomalib post-processor or flag (none by default: raw scores).
        evaluator: Evaluator or flag (zsad's exact per-category evaluator by default).
        visualizer: anomalib visualizer or flag (off by default).
    """

    def __init__(
        self,
        backbone: str = DEFAULT_WINCLIP_BACKBONE,
        weights: str = "pretrained",
        image_size: int = 240,
        scales: tuple[int, ...] = (2, 3),
        temperature: float = TEMPERATURE,
        class_name: str | None = None,
        class_names: dict[str, str] | None = None,
        k_shot: int = 0,
        reference_seed: int = 0,
        window_chunk: int = 2048,
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
        self.k_shot = int(k_shot)
        self.reference_seed = int(reference_seed)
        self.class_name = class_name
        self.class_names = {**DEFAULT_CLASS_WORDS, **(class_names or {})}
        clip = create_backbone(_resolve_backbone(backbone, weights), weights=weights, image_size=image_size)
        self.model = WinCLIPModel(clip, scales=tuple(scales), temperature=temperature, window_chunk=window_chunk)
        # Few-shot memory: {category: {"patch": [k·N, W], "window_<s>": [k·M_s, E]}} (built once per category and run).
        self._reference_memory: dict[str, dict[str, torch.Tensor]] = {}
        self._reference_datamodule: int | None = None

    @property
    def learning_type(self) -> LearningType:
        """``FEW_SHOT`` with references, else ``ZERO_SHOT`` (nothing is ever trained)."""
        return LearningType.FEW_SHOT if self.k_shot else LearningType.ZERO_SHOT

    def configure_optimizers(self) -> None:
        """Training-free: no optimiser."""
        return

    def word(self, category: str) -> str:
        """The class word of the prompts for ``category``."""
        return self.class_name or class_word(category, self.class_names)

    # -- few-shot references ----------------------------------------------------------------------------------------

    def _clear_references(self) -> None:
        self._reference_memory = {}
        self._reference_datamodule = None

    def on_test_start(self) -> None:
        """References are drawn afresh for every run (the datamodule or ``k_shot`` may have changed)."""
        self._clear_references()

    def on_validation_start(self) -> None:
        """As :meth:`on_test_start`."""
        self._clear_references()

    def on_predict_start(self) -> None:
        """As :meth:`on_test_start`."""
        self._clear_references()

    def reference_memory(self, category: str) -> dict[str, torch.Tensor]:
        """WinCLIP+ memory of the category's ``k`` normal train images, fetched and encoded once per category and run.

        Raises:
            RuntimeError: No datamodule with ``few_shot_references`` is attached (a zsad datamodule is needed).
        """
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "few_shot_references"):
            msg = (
                f"WinCLIP with k_shot={self.k_shot} draws references with `datamodule.few_shot_references(category, "
                f"k, seed)`; {type(datamodule).__name__} has none. Use a zsad datamodule (zsad.data.MVTecAD, Gogan, "
                "CrossDataset, ...) or k_shot=0."
            )
            raise RuntimeError(msg)
        if self._reference_datamodule != id(datamodule):
            self._reference_memory = {}
            self._reference_datamodule = id(datamodule)
        if category not in self._reference_memory:
            references = datamodule.few_shot_references(category, self.k_shot, self.reference_seed)
            images = self.pre_processor.transform(references.image.to(self.device))
            self._reference_memory[category] = self.model.encode_references(images)
        return self._reference_memory[category]

    # -- inference --------------------------------------------------------------------------------------------------

    def predict_batch(self, batch: Any) -> InferenceBatch:  # noqa: ANN401
        """Score each sample with its category's prompts (and references), one model call per category present."""
        categories = batch_categories(batch)
        groups: dict[str, list[int]] = {}
        for index, category in enumerate(categories):
            groups.setdefault(category, []).append(index)

        def run(images: torch.Tensor, category: str) -> InferenceBatch:
            memory = self.reference_memory(category) if self.k_shot else None
            return self.model(images, self.word(category), memory)

        if len(groups) == 1:
            return run(batch.image, categories[0])
        scores = torch.empty(len(categories), device=batch.image.device)
        maps = torch.empty(len(categories), *batch.image.shape[-2:], device=batch.image.device)
        for category, indices in groups.items():
            index = torch.tensor(indices, device=batch.image.device)
            pred = run(batch.image[index], category)
            scores[index] = pred.pred_score
            maps[index] = pred.anomaly_map
        return InferenceBatch(pred_score=scores, anomaly_map=maps)
