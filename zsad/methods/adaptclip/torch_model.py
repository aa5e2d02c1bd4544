"""AdaptCLIP: three small adapters around a frozen CLIP for zero- and few-shot anomaly detection.

Paper: Gao et al., "AdaptCLIP: Adapting CLIP for Universal Visual Anomaly Detection", arXiv 2505.09926 (seed
``002_e30b57dc78fdff05.txt``); behaviour of the official repository gaobb/AdaptCLIP (spec ``adaptclip.md``).

Notation (slides): query image ``x_q`` with global token ``f^q`` and patch tokens ``F^q_i``; normal prompt image
``x_p`` with patch tokens ``F^p_j``; fixed text ``(w_n, w_a)``; ``τ = 0.07``.

* **Visual adapter** (VA): ``f' = f + MLP_g(f)``, ``F'_i = F_i + MLP_l(F_i)`` scored against the *fixed* prompt
  ensemble ``T_static``.
* **Textual adapter** (TA): ``w'_n = T(θ_n)``, ``w'_a = T(θ_a)`` — learnable token sequences without template through
  the frozen text encoder — scored against the *un-adapted* visual features. The two branches never meet
  ("alternating" in the paper = decoupled; all adapters are optimised together).
* **Prompt-query adapter** (PQA), per layer ``l``: ``F^{p'}_i = F^p_{j*}``, ``j* = argmin_j ‖F^q_i − F^p_j‖``;
  joint feature ``F̄_i = F^q_i + |F^q_i − F^{p'}_i|``; ``Ŷ_p = G(BN_l(F̄))`` and
  ``ŷ_p = MLP((mean(F̄) + mean(top10(F̄)))/2)`` with ``G`` and the MLP shared across layers.

Features (frozen): DPAM value-value tokens of layers 6/12/18/24 through ``ln_post`` + projection; the global feature is
``proj(h24[CLS])`` without ``ln_post`` (the adapters were trained on it). VA and TA use the last layer only.

Inference: zero-shot ``M = mean(M_VA, M_TA)``, ``s = mean(p_VA, p_TA, max M)``; k-shot
``M = H(mean(M_VA, M_TA, M_PQ), A)``, ``s = H(mean(p_VA, p_TA, p_PQ), max M)`` with ``H`` the harmonic mean and ``A``
the harmonic mean over layers of the alignment distances; ``M`` smoothed with a Gaussian (σ = 4) before the max.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from zsad.backbone import CLIPBackbone, PromptTemplate, TensorStateCache
from zsad.backbone.ensembles import WINCLIP
from zsad.methods.anomaly_map import GaussianSmoothing, patches_to_grid, upsample

TEMPERATURE = 0.07


def static_prompts(class_name: str = "object") -> tuple[list[str], list[str]]:
    """The fixed ensemble: 7 × 21 = 147 normal and 4 × 21 = 84 abnormal prompts (state-major, as the official code).

    AdaptCLIP's visual adapter compares against WinCLIP's prompt ensemble (``zsad.backbone.ensembles.WINCLIP``).
    """
    return WINCLIP.sentences(class_name)


# --------------------------------------------------------------------------------------------------------------------
# Small functions shared by the branches
# --------------------------------------------------------------------------------------------------------------------


def harmonic_mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``n / Σ 1/x`` element-wise (the official fusion; zeros give 0, mixed-sign zeros NaN — cleaned at the end)."""
    stacked = torch.stack(tensors)
    return stacked.shape[0] / (1.0 / stacked).sum(dim=0)


def text_similarity(
    global_feature: torch.Tensor,
    tokens: torch.Tensor,
    text: torch.Tensor,
    image_size: tuple[int, int],
    temperature: float = TEMPERATURE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image logits and upsampled per-pixel class probabilities of visual features against a text pair.

    Args:
        global_feature: ``[B, E]`` global feature.
        tokens: ``[B, N, E]`` patch tokens (class token removed), ``N`` a square grid.
        text: ``[2, E]`` (normal, abnormal) text features, not necessarily normalised.
        image_size: Output map size.
        temperature: ``τ``.

    Returns:
        ``logits`` ``[B, 2]`` (``cos/τ``) and ``probs`` ``[B, 2, H, W]`` (softmax per patch, then bilinear upsampling
        with ``align_corners=False``).
    """
    text = F.normalize(text, dim=-1)
    logits = F.normalize(global_feature, dim=-1) @ text.T / temperature
    patch_probs = (F.normalize(tokens, dim=-1) @ text.T / temperature).softmax(dim=-1)
    side = round(int(tokens.shape[1]) ** 0.5)  # int(): shapes are tensors under ONNX tracing
    probs = upsample(patches_to_grid(patch_probs, (side, side)), image_size, mode="bilinear", align_corners=False)
    return logits, probs


def align_to_references(
    query: torch.Tensor, references: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest normal-reference patch of every query patch, by cosine distance.

    Args:
        query: ``[B, N, E]`` L2-normalised query patch tokens.
        references: ``[B, M, E]`` or ``[M, E]`` (shared by the batch) L2-normalised reference patch tokens.

    Returns:
        ``distance`` ``[B, N]`` = ``min_j (1 − q_i·p_j)``, ``index`` ``[B, N]`` = ``argmin_j`` and ``aligned``
        ``[B, N, E]`` = ``p_{j*(i)}``. For unit vectors the order equals the L2 order of the slides.
    """
    distance, index = (1.0 - query @ references.transpose(-1, -2)).min(dim=-1)
    if references.dim() == 2:
        aligned = references[index]
    else:
        aligned = torch.gather(references, 1, index.unsqueeze(-1).expand(-1, -1, references.shape[-1]))
    return distance, index, aligned


# --------------------------------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------------------------------


class ResidualMLP(nn.Module):
    """``x + W2·ReLU(BN(W1·x))`` with bias-free linears; token tensors ``[B, T, D]`` are normalised token-wise.

    Args:
        dim: Feature dimension ``D``.
        reduction: Hidden size ``D / reduction``.
    """

    def __init__(self, dim: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = dim // reduction
        self.fc = nn.Sequential(
            nn.Linear(dim, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, dim, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Adapt ``[B, D]`` or ``[B, T, D]`` features."""
        flat = x.reshape(-1, x.shape[-1])
        return x + self.fc(flat).reshape(x.shape)


class VisualAdapter(nn.Module):
    """Residual MLPs for the global token (``θ_v^g``) and the local tokens (``θ_v^l``)."""

    def __init__(self, dim: int, reduction: int = 4) -> None:
        super().__init__()
        self.global_adapter = ResidualMLP(dim, reduction)
        self.local_adapter = ResidualMLP(dim, reduction)

    def forward(self, global_feature: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f', F')`` for ``global_feature`` ``[B, E]`` and ``tokens`` ``[B, T, E]``."""
        return self.global_adapter(global_feature), self.local_adapter(tokens)


class TextualAdapter(nn.Module):
    """Learnable normal / abnormal token sequences ``θ_n, θ_a`` fed without template into the frozen text encoder.

    The prompt is ``[SOT] θ_1 … θ_r . [EOT]`` (the official ``"X X … X."`` skeleton). In eval mode the two encoded
    features are cached until the parameters change (in-place updates, ``load_state_dict``, moves between devices).

    Args:
        text_width: Token-embedding width of the text tower.
        n_ctx: Number of learnable tokens per class (``r``).
        tokenizer: The CLIP tokenizer (lays out the skeleton).
        init_std: Standard deviation of the normal initialisation.
    """

    def __init__(self, text_width: int, n_ctx: int, tokenizer, init_std: float = 0.02) -> None:  # noqa: ANN001
        super().__init__()
        self.ctx_normal = nn.Parameter(torch.randn(n_ctx, text_width) * init_std)
        self.ctx_abnormal = nn.Parameter(torch.randn(n_ctx, text_width) * init_std)
        self.template = PromptTemplate("{}.", n_ctx, tokenizer)
        self._cache = TensorStateCache()

    def forward(self, backbone: CLIPBackbone) -> torch.Tensor:
        """``[2, E]`` learned text features ``(w'_n, w'_a)`` (projected EOT features, not normalised)."""
        def encode() -> torch.Tensor:
            ctx = torch.stack([self.ctx_normal, self.ctx_abnormal])
            embeddings = self.template.embed(backbone.text.embeddings.token_embedding, ctx)
            return backbone.encode_prompt_embeddings(embeddings, self.template.eot(2))

        needs_grad = torch.is_grad_enabled() and self.ctx_normal.requires_grad
        if self.training or needs_grad:
            self._cache.clear()
            return encode()
        return self._cache.get([self.ctx_normal, self.ctx_abnormal, *backbone.text.parameters()], encode)


class PromptQueryAdapter(nn.Module):
    """Few-shot comparison of query tokens with normal-reference tokens ("context + aligned residual").

    One BatchNorm2d per layer; the segmentation head ``G`` and the image head are **shared** across layers (the
    official list holds the same instance four times; the published parameter count relies on it).

    Args:
        dim: Token dimension ``E``.
        num_layers: Number of tapped layers.
        mid_dim: Width of the heads (128).
        context: ``F̄ = q + |q − p|`` (True, the released setting) or ``|q − p|`` (ablation "w/o context").
        topk: Positions averaged by the image head's top-k pooling (10).
    """

    def __init__(self, dim: int, num_layers: int = 4, mid_dim: int = 128, context: bool = True, topk: int = 10) -> None:
        super().__init__()
        self.context = context
        self.topk = topk
        self.layer_norms = nn.ModuleList(nn.BatchNorm2d(dim) for _ in range(num_layers))
        half = mid_dim // 2
        self.seg_head = nn.Sequential(
            nn.Conv2d(dim, mid_dim, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(mid_dim),
            nn.ReLU(),
            nn.ConvTranspose2d(mid_dim, mid_dim, kernel_size=2, stride=2),
            nn.Conv2d(mid_dim, half, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(),
            nn.ConvTranspose2d(half, half, kernel_size=2, stride=2),
            nn.Conv2d(half, 2, kernel_size=1),
        )
        self.image_head = nn.Sequential(
            nn.Linear(dim, mid_dim, bias=False),
            nn.BatchNorm1d(mid_dim),
            nn.ReLU(),
            nn.Linear(mid_dim, half, bias=False),
            nn.BatchNorm1d(half),
            nn.ReLU(),
            nn.Linear(half, 2, bias=False),
        )

    def joint_feature(self, query: torch.Tensor, aligned: torch.Tensor) -> torch.Tensor:
        """``q + |q − p_nn|`` (or ``|q − p_nn|`` without context)."""
        residual = (query - aligned).abs()
        return query + residual if self.context else residual

    def forward(
        self,
        query_tokens: torch.Tensor,
        reference_tokens: torch.Tensor,
        image_size: tuple[int, int],
    ) -> dict[str, torch.Tensor]:
        """Score query patches against normal references, layer by layer.

        Args:
            query_tokens: ``[B, L, N, E]`` query patch tokens (class token removed).
            reference_tokens: ``[B, L, M, E]`` (per sample) or ``[L, M, E]`` (shared) reference patch tokens, ``M`` =
                ``k·N`` for ``k`` references.
            image_size: Output map size.

        Returns:
            ``pq_logits`` ``[B, L, 2]``, ``pq_maps`` ``[B, L, 2, H, W]`` (softmax, upsampled) and ``align``
            ``[B, L, H, W]`` (nearest-neighbour distance, upsampled; training-free).
        """
        batch, num_layers, n, dim = query_tokens.shape
        side = round(int(n) ** 0.5)  # int(): shapes are tensors under ONNX tracing
        logits, maps, aligns = [], [], []
        for layer in range(num_layers):
            query = F.normalize(query_tokens[:, layer], dim=-1)
            refs = reference_tokens[layer] if reference_tokens.dim() == 3 else reference_tokens[:, layer]
            distance, _, aligned = align_to_references(query, F.normalize(refs, dim=-1))
            aligns.append(upsample(distance.reshape(batch, side, side), image_size, "bilinear", align_corners=False))
            joint = patches_to_grid(self.joint_feature(query, aligned), (side, side))  # [B, E, h, w]
            joint = self.layer_norms[layer](joint)
            seg = self.seg_head(joint).softmax(dim=1)
            maps.append(upsample(seg, image_size, "bilinear", align_corners=False))
            flat = joint.flatten(2)
            pooled = (flat.mean(dim=-1) + flat.topk(min(self.topk, flat.shape[-1]), dim=-1).values.mean(dim=-1)) / 2
            logits.append(self.image_head(pooled))
        return {"pq_logits": torch.stack(logits, 1), "pq_maps": torch.stack(maps, 1), "align": torch.stack(aligns, 1)}


# --------------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------------


class AdaptCLIPModel(nn.Module):
    """Frozen CLIP + textual, visual and prompt-query adapters.

    Args:
        backbone: Frozen CLIP with the text tower, built with bilinear position interpolation.
        layers: 1-based DPAM layers tapped (PQA uses all, VA/TA the last).
        dpam_start: First block of the value-value stream (6 = the last 19 blocks of ViT-L, official ``DPAM_layer=20``).
        n_ctx: Learnable tokens per class of the textual adapter.
        reduction: Hidden-size reduction of the visual adapter's MLPs.
        pq_mid_dim: Width of the prompt-query heads.
        pq_context: Joint feature with context (``q + |q − p|``) or residual only.
        pq_topk: Top-k of the prompt-query image pooling.
        temperature: ``τ``.
        sigma: Gaussian sigma of the test map (0 disables).
        init_std: Initial standard deviation of the text contexts.
    """

    def __init__(
        self,
        backbone: CLIPBackbone,
        layers: tuple[int, ...] = (6, 12, 18, 24),
        dpam_start: int | None = 6,
        n_ctx: int = 12,
        reduction: int = 4,
        pq_mid_dim: int = 128,
        pq_context: bool = True,
        pq_topk: int = 10,
        temperature: float = TEMPERATURE,
        sigma: float = 4.0,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.layers = tuple(layers)
        self.dpam_start = dpam_start
        self.temperature = temperature
        dim = backbone.embed_dim
        self.textual = TextualAdapter(backbone.text_width, n_ctx, backbone.tokenizer, init_std)
        self.visual = VisualAdapter(dim, reduction)
        self.prompt_query = PromptQueryAdapter(dim, len(self.layers), pq_mid_dim, pq_context, pq_topk)
        self.smoothing = GaussianSmoothing(sigma)

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per adapter (shared heads counted once) and the zero-shot / full totals."""
        counts = {
            name: sum(p.numel() for p in getattr(self, name).parameters() if p.requires_grad)
            for name in ("textual", "visual", "prompt_query")
        }
        counts["zero_shot"] = counts["textual"] + counts["visual"]
        counts["total"] = counts["zero_shot"] + counts["prompt_query"]
        return counts

    # -- frozen part ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Frozen features of a batch (no gradient).

        Returns:
            ``global`` ``[B, E]`` (``proj(h24[CLS])``), ``class_tokens`` ``[B, L, E]`` and ``patch_tokens``
            ``[B, L, N, E]`` (DPAM stream, ``ln_post`` + projection, not normalised).
        """
        out = self.backbone.encode_image(
            images, layers=self.layers, project=True, global_ln_post=False, dpam_start=self.dpam_start
        )
        return {
            "global": out.global_embedding,
            "class_tokens": torch.stack(out.class_tokens, dim=1),
            "patch_tokens": torch.stack(out.patch_tokens, dim=1),
        }

    @torch.no_grad()
    def encode_references(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens of ``k`` normal reference images as one ``[L, k·N, E]`` memory.

        This is what few-shot inference keeps per category.
        """
        tokens = self.encode(images)["patch_tokens"]  # [k, L, N, E]
        return tokens.transpose(0, 1).flatten(1, 2)

    @torch.no_grad()
    def static_text_features(self) -> torch.Tensor:
        """``T_static`` ``[2, E]``: mean projected feature of the 147 normal and the 84 abnormal fixed prompts.

        The prompts are encoded once (the backbone's text cache).
        """
        normal, abnormal = static_prompts()
        return torch.stack([self.backbone.encode_text(normal).mean(0), self.backbone.encode_text(abnormal).mean(0)])

    # -- learnable part ---------------------------------------------------------------------------------------------

    def forward_features(
        self,
        features: dict[str, torch.Tensor],
        image_size: tuple[int, int],
        reference_tokens: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the adapters on frozen features.

        Args:
            features: Output of :meth:`encode`.
            image_size: Map size.
            reference_tokens: Normal-reference patch tokens, ``[B, L, M, E]`` or ``[L, M, E]``; ``None`` = zero-shot.

        Returns:
            ``va_logits``/``ta_logits`` ``[B, 2]``, ``va_maps``/``ta_maps`` ``[B, 2, H, W]`` probabilities, and with
            references ``pq_logits`` ``[B, L, 2]``, ``pq_maps`` ``[B, L, 2, H, W]``, ``align`` ``[B, L, H, W]``.
        """
        global_feature = features["global"].float()
        last_cls = features["class_tokens"][:, -1:].float()
        last_patches = features["patch_tokens"][:, -1].float()
        # Visual adapter against the fixed text; the local MLP sees the class token too (its BatchNorm statistics
        # are taken over all 1 + N tokens, as in the official code), which is then dropped.
        adapted_global, adapted_tokens = self.visual(global_feature, torch.cat([last_cls, last_patches], dim=1))
        va_logits, va_maps = text_similarity(
            adapted_global, adapted_tokens[:, 1:], self.static_text_features(), image_size, self.temperature
        )
        # Textual adapter against the un-adapted visual features.
        ta_logits, ta_maps = text_similarity(
            global_feature, last_patches, self.textual(self.backbone), image_size, self.temperature
        )
        out = {"va_logits": va_logits, "va_maps": va_maps, "ta_logits": ta_logits, "ta_maps": ta_maps}
        if reference_tokens is not None:
            out.update(self.prompt_query(features["patch_tokens"].float(), reference_tokens.float(), image_size))
        return out

    def fuse(self, out: dict[str, torch.Tensor]) -> InferenceBatch:
        """Test-time fusion of the branches (smoothing before the map maximum enters the score; NaN → 0 last)."""
        p_va = out["va_logits"].softmax(-1)[:, 1]
        p_ta = out["ta_logits"].softmax(-1)[:, 1]
        m_va, m_ta = out["va_maps"][:, 1], out["ta_maps"][:, 1]
        if "pq_maps" in out:
            m_pq = out["pq_maps"][:, :, 1].mean(dim=1)
            p_pq = out["pq_logits"].softmax(-1)[..., 1].mean(dim=1)
            align = harmonic_mean(list(out["align"].unbind(1)))
            anomaly_map = self.smoothing(harmonic_mean([torch.stack([m_va, m_ta, m_pq]).mean(0), align]))
            score = harmonic_mean([torch.stack([p_va, p_ta, p_pq]).mean(0), anomaly_map.flatten(1).amax(dim=1)])
        else:
            anomaly_map = self.smoothing(torch.stack([m_va, m_ta]).mean(0))
            score = torch.stack([p_va, p_ta, anomaly_map.flatten(1).amax(dim=1)]).mean(0)
        return InferenceBatch(
            pred_score=torch.nan_to_num(score, nan=0.0, posinf=0.0, neginf=0.0),
            anomaly_map=torch.nan_to_num(anomaly_map, nan=0.0, posinf=0.0, neginf=0.0).float(),
        )

    def forward(
        self, images: torch.Tensor, reference_tokens: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor] | InferenceBatch:
        """Training: the branch outputs of :meth:`forward_features`; evaluation: the fused ``InferenceBatch``.

        Args:
            images: ``[B, 3, S, S]`` normalised query images.
            reference_tokens: Normal-reference tokens (:meth:`encode_references`, ``[L, M, E]``, or per sample
                ``[B, L, M, E]``); ``None`` gives the zero-shot prediction.
        """
        out = self.forward_features(self.encode(images), tuple(images.shape[-2:]), reference_tokens)
        if self.training:
            return out
        return self.fuse(out)
