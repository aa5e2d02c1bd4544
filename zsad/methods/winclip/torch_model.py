"""WinCLIP and WinCLIP+ (Jeong et al., CVPR 2023) on the shared frozen CLIP, as anomalib 2.7 implements them.

Zero-shot (WinCLIP): the image score is the softmax probability of the abnormal class embedding,

    s(x) = softmax([cos(f(x), t_n), cos(f(x), t_a)] / τ)[abnormal],

with ``t_n``/``t_a`` the mean (un-normalised) text features of the compositional prompt ensemble. Windows of
``k × k`` patches (stride 1) are re-encoded by the image encoder (:mod:`zsad.backbone.windows`) and scored the same
way; each patch takes the **harmonic mean** of the scores of the windows covering it, and the scales are fused with
the image score by a harmonic mean too:

    M_0 = (n_scales + 1) / (1 / s(x) + Σ_k 1 / M_k).

Few-shot (WinCLIP+): a memory of the reference images' window embeddings (per scale) and ``post_layernorm``-ed
(unprojected) patch tokens; every query window / patch scores ``min_r (1 − cos(q, r)) / 2`` over the memory of its
scale, windows are harmonically aggregated to patches, and the scales (patch scale included) are averaged into
``M_fs``. Final map ``(M_0 + M_fs) / 2``, image score ``(s(x) + max M_fs) / 2``. Maps are upsampled bilinearly to
the input size; no smoothing (as anomalib).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from zsad.backbone import CLIPBackbone
from zsad.backbone.ensembles import WINCLIP, PromptEnsemble
from zsad.backbone.windows import encode_windows, run_vision_encoder, window_indices
from zsad.methods.anomaly_map import patches_to_grid, upsample

#: Softmax temperature of the class scores (CLIP's 0.07, anomalib's ``TEMPERATURE``).
TEMPERATURE = 0.07


def class_scores(embeddings: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """Probability of the abnormal class: ``softmax(cos(e, [t_n, t_a]) / τ)[..., 1]`` for ``[..., E]`` embeddings."""
    logits = F.normalize(embeddings, dim=-1) @ F.normalize(text, dim=-1).t() / temperature
    return logits.softmax(dim=-1)[..., 1]


def harmonic_aggregation(window_scores: torch.Tensor, indices: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per patch, the harmonic mean of the scores of the windows covering it.

    Args:
        window_scores: ``[B, M]`` one score per window.
        indices: ``[M, K]`` patch indices of each window.
        grid: ``(h, w)`` patch grid.

    Returns:
        ``[B, h, w]``; a zero window score makes its patches 0 (``1/0 = inf`` in the denominator), as anomalib.
    """
    batch, n_patches = window_scores.shape[0], grid[0] * grid[1]
    inverse = (1.0 / window_scores).unsqueeze(-1).expand(-1, -1, indices.shape[1]).reshape(batch, -1)
    flat = indices.reshape(-1).to(window_scores.device)
    # Scatter-add of 1/s over the covered patches (no multiplication, so inf stays inf and never meets a zero).
    # scatter_add_ rather than index_add_: ONNX export writes index_add_ as a scatter that drops repeated indices.
    denominator = window_scores.new_zeros(batch, n_patches).scatter_add_(1, flat.expand(batch, -1), inverse)
    counts = torch.bincount(flat, minlength=n_patches).to(window_scores.dtype)
    return (counts / denominator).nan_to_num(posinf=0.0).reshape(batch, *grid)


def association_scores(queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """WinCLIP+'s visual association score ``min_r (1 − cos(q, r)) / 2``: ``[B, Q, D]`` × ``[R, D]`` → ``[B, Q]``."""
    similarity = F.normalize(queries, dim=-1) @ F.normalize(memory, dim=-1).t()
    return (1.0 - similarity).amin(dim=-1) / 2.0


class WinCLIPModel(nn.Module):
    """WinCLIP / WinCLIP+ around a frozen :class:`~zsad.backbone.CLIPBackbone` (text tower required).

    Args:
        backbone: The frozen CLIP (WinCLIP's: open_clip ViT-B-16-plus-240 converted with ``zsad convert-weights``).
        scales: Window sides in patches (anomalib: ``(2, 3)``).
        temperature: Softmax temperature ``τ``.
        ensemble: Compositional prompt ensemble (states × templates), anomalib's by default.
        window_chunk: At most this many window sequences per encoder call (memory bound only).
    """

    def __init__(
        self,
        backbone: CLIPBackbone,
        scales: Sequence[int] = (2, 3),
        temperature: float = TEMPERATURE,
        ensemble: PromptEnsemble = WINCLIP,
        window_chunk: int = 2048,
    ) -> None:
        super().__init__()
        if not scales:
            msg = "WinCLIP needs at least one window scale, e.g. scales=(2, 3)."
            raise ValueError(msg)
        self.backbone = backbone
        self.scales = tuple(int(s) for s in scales)
        self.temperature = float(temperature)
        self.ensemble = ensemble
        self.window_chunk = int(window_chunk)
        self._indices: dict[tuple[int, int, int], torch.Tensor] = {}

    # -- text -------------------------------------------------------------------------------------------------------

    def text_embeddings(self, class_name: str) -> torch.Tensor:
        """``[2, E]`` (normal, abnormal) class embeddings: mean of the **un-normalised** prompt features.

        The prompt features are cached by the backbone (encoded once per class name and run).
        """
        normal, abnormal = self.ensemble.sentences(class_name)
        return torch.stack(
            [
                self.backbone.encode_text(normal).mean(dim=0),
                self.backbone.encode_text(abnormal).mean(dim=0),
            ]
        )

    # -- vision -----------------------------------------------------------------------------------------------------

    def indices(self, grid: tuple[int, int], scale: int) -> torch.Tensor:
        """``[M, scale²]`` patch indices of the windows of one scale (cached per grid)."""
        key = (*grid, scale)
        if key not in self._indices:
            self._indices[key] = window_indices(grid, scale)
        return self._indices[key]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Frozen features of a batch: one embedding of the full sequence, shared by the image and all windows.

        Returns:
            ``image`` ``[B, E]`` (projected ``post_layernorm``-ed class token), ``patch`` ``[B, N, W]``
            (``post_layernorm``-ed, unprojected patch tokens, WinCLIP+'s patch memory), ``window_<k>`` ``[B, M_k, E]``
            per scale, and ``grid`` ``[2]``.
        """
        tokens, grid = self.backbone.embed(images)
        hidden = run_vision_encoder(self.backbone, tokens)
        features = {
            "image": self.backbone.project(hidden[:, 0]),
            "patch": self.backbone.vision.post_layernorm(hidden[:, 1:]),
            "grid": torch.tensor(grid),
        }
        for scale in self.scales:
            features[f"window_{scale}"] = encode_windows(
                self.backbone, tokens, self.indices(grid, scale), chunk_size=self.window_chunk
            )
        return features

    @torch.no_grad()
    def encode_references(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """WinCLIP+ memory of ``k`` normal references: ``patch`` ``[k·N, W]`` and ``window_<s>`` ``[k·M_s, E]``."""
        features = self.encode(images)
        return {key: value.reshape(-1, value.shape[-1]) for key, value in features.items() if key != "grid"}

    # -- scores -----------------------------------------------------------------------------------------------------

    def zero_shot_map(
        self, image_score: torch.Tensor, features: dict[str, torch.Tensor], text: torch.Tensor
    ) -> torch.Tensor:
        """``M_0`` ``[B, h, w]``: harmonic mean over the image score and each scale's harmonically aggregated map."""
        grid = tuple(int(g) for g in features["grid"])
        maps = [image_score.view(-1, 1, 1).expand(-1, *grid)]
        for scale in self.scales:
            scores = class_scores(features[f"window_{scale}"], text, self.temperature)
            maps.append(harmonic_aggregation(scores, self.indices(grid, scale), grid))
        return len(maps) / (1.0 / torch.stack(maps)).sum(dim=0)

    def few_shot_map(self, features: dict[str, torch.Tensor], memory: dict[str, torch.Tensor]) -> torch.Tensor:
        """``M_fs`` ``[B, h, w]``: mean over the patch scale and each window scale of the association maps."""
        grid = tuple(int(g) for g in features["grid"])
        maps = [patches_to_grid(association_scores(features["patch"], memory["patch"]), grid)]
        for scale in self.scales:
            key = f"window_{scale}"
            scores = association_scores(features[key], memory[key])
            maps.append(harmonic_aggregation(scores, self.indices(grid, scale), grid))
        return torch.stack(maps).mean(dim=0)

    @torch.no_grad()
    def forward(
        self,
        images: torch.Tensor,
        class_name: str = "object",
        memory: dict[str, torch.Tensor] | None = None,
    ) -> InferenceBatch:
        """Score a batch of one class.

        Args:
            images: ``[B, 3, S, S]`` normalised images.
            class_name: The class word of the prompts.
            memory: WinCLIP+ reference memory (:meth:`encode_references`); ``None`` = zero-shot.

        Returns:
            ``pred_score`` ``[B]`` and ``anomaly_map`` ``[B, S, S]`` (bilinear upsampling, no smoothing).
        """
        features = self.encode(images)
        text = self.text_embeddings(class_name)
        image_score = class_scores(features["image"], text, self.temperature)
        score_map = self.zero_shot_map(image_score, features, text)
        if memory is not None:
            few_shot = self.few_shot_map(features, memory)
            score_map = (score_map + few_shot) / 2
            image_score = (image_score + few_shot.amax(dim=(-2, -1))) / 2
        anomaly_map = upsample(score_map, tuple(images.shape[-2:]), mode="bilinear")
        return InferenceBatch(pred_score=image_score, anomaly_map=anomaly_map.float())
