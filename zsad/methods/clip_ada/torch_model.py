"""CLIP-ADA: a learnable prompt and anomaly-region refinement over a frozen CLIP (seed 004).

Notation of the paper (Cai et al., "Anomaly Detection by Adapting a pre-trained Vision Language Model", arXiv
2403.09493), symbols restored from the spec (``shared/specs/clip_ada.md``) where the text lost them:

* text side (Eqs. 1–2): the template "A photo of a [CLS] with defects for anomaly detection" with [CLS] removed and
  ``M = 4`` learnable word embeddings ``p_1..p_M`` inserted in its place; ``T = TextEncoder(prompt)`` ``[1, C]``;
* visual side: patch tokens ``F^k`` of one intermediate layer ``k`` of the frozen image encoder and a linear
  projection ``F = Linear(F^k)`` ``[hw, C]``;
* coarse map (Eq. 3): ``M_0 = sigmoid(sim(F, T))`` reshaped to ``h × w``; ``sim`` is the cosine over a temperature
  (the paper's form is lost, :func:`similarity_logits`);
* refinement (Eq. 5): ``Ĩ_r = I ⊙ up(M_{r-1})``, ``F_r = Linear_r(F^k(Ĩ_r))`` with an unshared projection per pass,
  ``M_r = sigmoid(sim(F_r, T))``, ``r = 1..R``;
* inference: ``up(M_R)`` to the input size, Gaussian smoothing, image score = mean of the top-``K`` map values.

Trainable parameters: ``M × text_width + (R + 1) × (width × C + C)`` — 395,776 / 789,504 / 1,183,232 on ViT-B/16 and
1,577,472 (``R = 1``) on ViT-L/14@336 (:func:`expected_trainable_parameters`).

Split for the feature cache and ``zsad benchmark``: :meth:`CLIPADAModel.encode` is the frozen first pass; the
refinement passes re-run the frozen encoder on an image that depends on the learned map, so they belong to
:meth:`CLIPADAModel.forward_features` and cannot be cached.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from zsad.backbone import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CLIPBackbone, PromptTemplate, TensorStateCache
from zsad.methods.anomaly_map import GaussianSmoothing, patches_to_grid, upsample

#: The paper's template; the learnable vectors take the place of ``{}`` (the removed ``[CLS]``). The final period
#: is the project's choice (CLIP prompts conventionally end with one) [unverified].
TEMPLATE = "A photo of a {} with defects for anomaly detection."
#: Class word of the fixed-prompt ablation (the unified setting has no class name) [unverified].
FIXED_CLASS_WORD = "object"
TEMPERATURE = 0.07
TOP_K = 500

PromptMode = Literal["learnable", "fixed"]
RefineSpace = Literal["rgb", "normalized"]
Interpolation = Literal["bilinear", "nearest", "bicubic"]


def expected_trainable_parameters(
    width: int,
    embed_dim: int,
    text_width: int,
    num_refinements: int,
    n_ctx: int = 4,
    prompt: PromptMode = "learnable",
    learn_scale_bias: bool = False,
) -> int:
    """Closed-form trainable-parameter count: prompt vectors + one ``Linear(width → C)`` with bias per pass."""
    prompt_params = n_ctx * text_width if prompt == "learnable" else 0
    return prompt_params + (num_refinements + 1) * (width * embed_dim + embed_dim) + (2 if learn_scale_bias else 0)


def similarity_logits(
    features: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor | float,
    bias: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """``scale · cos(F_i, T) + bias`` for every patch; the sigmoid of this is the map of Eqs. 3 and 5.

    Args:
        features: ``[B, N, C]`` projected patch features ``F``.
        text: ``[C]`` or ``[1, C]`` text feature ``T``.
        scale: Inverse temperature ``1/τ``.
        bias: Additive logit bias (0 unless learnable).

    Returns:
        ``[B, N]`` logits.
    """
    cos = F.normalize(features, dim=-1) @ F.normalize(text.reshape(-1), dim=0)
    return scale * cos + bias


def top_k_mean(maps: torch.Tensor, k: int) -> torch.Tensor:
    """Image score: mean of the ``k`` largest values of each ``[B, H, W]`` map (``k`` capped at ``H·W``)."""
    flat = maps.flatten(1)
    return flat.topk(min(k, flat.shape[1]), dim=1).values.mean(dim=1)


class CLIPADAModel(nn.Module):
    """The CLIP-ADA network: frozen CLIP, one prompt, ``R + 1`` unshared patch projections.

    Args:
        backbone: Frozen CLIP backbone with its text tower.
        layer: 1-based image-encoder layer whose patch tokens are used (the paper's index is lost) [unverified].
        num_refinements: Refinement passes ``R`` (paper default 1; 0 and 2 in its ablation).
        n_ctx: Number of learnable prompt vectors ``M`` (4 in the paper).
        template: Prompt template with one ``{}`` where the vectors (or the fixed class word) go.
        prompt: ``"learnable"`` (the method) or ``"fixed"`` (the paper's fixed-prompt ablation, class word
            :data:`FIXED_CLASS_WORD`).
        temperature: ``τ`` of the similarity ``cos/τ`` [unverified].
        learn_scale_bias: Learn the logit scale (initialised at ``1/τ``) and a logit bias (two extra parameters;
            off by default so the counts match the paper's Table 6).
        ln_post: Apply the frozen ``post_layernorm`` to the layer tokens before the projection (default raw tokens,
            APRIL-GAN style) [unverified].
        detach_coarse: Stop the gradient at the map that multiplies the image (cheaper); default ``False``: the
            gradient flows through the second frozen-encoder pass into the coarse map ("trained end-to-end").
        refine_space: ``"rgb"`` multiplies the un-normalised ``[0, 1]`` image and re-normalises (default);
            ``"normalized"`` multiplies the normalised tensor.
        refine_interpolation: Resize of the ``h × w`` map to the image for the product (bilinear default).
        upsample_mode: Resize of the final map to the input size at inference (bilinear, ``align_corners=False``).
        sigma: Gaussian smoothing of the test map in pixels (0 disables) [unverified: σ lost].
        top_k: ``K`` of the image score (500 in the paper).
        top_k_fraction: If set, ``K = round(fraction · H · W)`` instead of ``top_k`` (resolution-independent option).
        init_std: Standard deviation of the prompt vectors' normal initialisation [unverified].
    """

    def __init__(
        self,
        backbone: CLIPBackbone,
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
        upsample_mode: Interpolation = "bilinear",
        sigma: float = 4.0,
        top_k: int = TOP_K,
        top_k_fraction: float | None = None,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if not backbone.has_text:
            msg = "CLIP-ADA encodes its prompt with the frozen text tower: build the backbone with load_text=True."
            raise ValueError(msg)
        if not 1 <= layer <= backbone.num_layers:
            msg = f"layer must be in 1..{backbone.num_layers} (1-based), got {layer}."
            raise ValueError(msg)
        if num_refinements < 0:
            msg = f"num_refinements must be >= 0, got {num_refinements}."
            raise ValueError(msg)
        if prompt not in ("learnable", "fixed"):
            msg = f"prompt must be 'learnable' or 'fixed', got {prompt!r}."
            raise ValueError(msg)
        if refine_space not in ("rgb", "normalized"):
            msg = f"refine_space must be 'rgb' or 'normalized', got {refine_space!r}."
            raise ValueError(msg)
        self.backbone = backbone
        self.layer = int(layer)
        self.num_refinements = int(num_refinements)
        self.prompt_mode = prompt
        self.ln_post = ln_post
        self.detach_coarse = detach_coarse
        self.refine_space = refine_space
        self.refine_interpolation = refine_interpolation
        self.upsample_mode = upsample_mode
        self.top_k = int(top_k)
        self.top_k_fraction = top_k_fraction

        # Text side: the template with M learnable word embeddings where [CLS] was (Eqs. 1-2).
        if prompt == "learnable":
            self.template = PromptTemplate(template, n_ctx, backbone.tokenizer)
            self.prompt_vectors = nn.Parameter(torch.randn(n_ctx, backbone.text_width) * init_std)
        else:
            self.fixed_prompt = template.format(FIXED_CLASS_WORD)
            self.register_parameter("prompt_vectors", None)
        self._text_cache = TensorStateCache()

        # Visual side: one unshared Linear(width -> C) per pass (coarse + R refinements).
        self.projections = nn.ModuleList(
            nn.Linear(backbone.width, backbone.embed_dim) for _ in range(self.num_refinements + 1)
        )
        if learn_scale_bias:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
            self.logit_bias = nn.Parameter(torch.zeros(()))
        else:
            self.register_buffer("logit_scale", torch.tensor(math.log(1.0 / temperature)), persistent=False)
            self.register_buffer("logit_bias", torch.zeros(()), persistent=False)

        self.register_buffer("mean", torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.smoothing = GaussianSmoothing(sigma)

    # -- text -------------------------------------------------------------------------------------------------------

    def _encode_prompt(self) -> torch.Tensor:
        if self.prompt_vectors is None:
            return self.backbone.encode_text([self.fixed_prompt])[0]
        token_embedding = self.backbone.text.embeddings.token_embedding
        embeds = self.template.embed(token_embedding, self.prompt_vectors)
        return self.backbone.encode_prompt_embeddings(embeds, self.template.eot(1))[0]

    def text_feature(self) -> torch.Tensor:
        """The prompt's text feature ``T`` ``[C]``.

        Encoded on every call while gradients are on (one call per training step, shared by all passes); cached while
        they are off (evaluation), keyed by the prompt vectors' version counter, storage and device, so that an
        optimiser step or a ``load_state_dict`` invalidates it.
        """
        ctx = self.prompt_vectors
        if ctx is None or torch.is_grad_enabled():
            return self._encode_prompt()
        return self._text_cache.get([ctx, *self.backbone.text.parameters()], self._encode_prompt)

    # -- vision -----------------------------------------------------------------------------------------------------

    def layer_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen patch tokens ``F^k`` ``[B, N, width]`` of the chosen layer (autograd flows to ``images``)."""
        out = self.backbone.encode_image(images, layers=(self.layer,), project=False, stop_at_last_requested=True)
        tokens = out.patch_tokens[0]
        if self.ln_post:
            tokens = self.backbone.vision.post_layernorm(tokens)
        return tokens

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Frozen first pass: ``tokens`` ``[B, N, width]``, plus the ``images`` the refinement passes multiply."""
        return {"tokens": self.layer_tokens(images), "images": images}

    def enhance(self, images: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """``Ĩ = I ⊙ up(M)``: the map, resized to the image, multiplies the image; keeps where ``M`` is high.

        Args:
            images: ``[B, 3, S, S]`` CLIP-normalised images.
            coarse: ``[B, h, w]`` sigmoid map of the previous pass.

        Returns:
            ``[B, 3, S, S]`` normalised enhanced images (with ``refine_space="rgb"`` a zero map gives black).
        """
        attention = upsample(coarse, tuple(images.shape[-2:]), mode=self.refine_interpolation, align_corners=False)
        attention = attention.unsqueeze(1).to(images.dtype)
        if self.refine_space == "normalized":
            return images * attention
        rgb = images * self.std + self.mean
        return (rgb * attention - self.mean) / self.std

    # -- head -------------------------------------------------------------------------------------------------------

    def _logits(self, tokens: torch.Tensor, projection: nn.Module, text: torch.Tensor) -> torch.Tensor:
        return similarity_logits(
            projection(tokens.to(projection.weight.dtype)), text, self.logit_scale.exp(), self.logit_bias
        )

    def forward_features(self, features: dict[str, torch.Tensor], image_size: tuple[int, int]) -> dict:
        """Coarse pass on the frozen tokens, then ``R`` refinement passes.

        Returns:
            ``logits`` ``[B, R+1, h, w]`` (pre-sigmoid similarities, pass 0 = coarse), ``maps`` (their sigmoid) and
            ``anomaly_map`` ``[B, H, W]`` (the last map upsampled, unsmoothed).
        """
        images = features["images"]
        patch = self.backbone.patch_size
        grid = (images.shape[-2] // patch, images.shape[-1] // patch)
        text = self.text_feature()
        logits = [self._logits(features["tokens"], self.projections[0], text)]
        for projection in self.projections[1:]:
            coarse = patches_to_grid(logits[-1].sigmoid(), grid)
            if self.detach_coarse:
                coarse = coarse.detach()
            enhanced = self.enhance(images, coarse)
            if self.detach_coarse or not torch.is_grad_enabled():
                with torch.no_grad():
                    tokens = self.layer_tokens(enhanced)
            else:
                tokens = self.layer_tokens(enhanced)
            logits.append(self._logits(tokens, projection, text))
        logits_grid = torch.stack([patches_to_grid(x, grid) for x in logits], dim=1).float()
        maps = logits_grid.sigmoid()
        anomaly_map = upsample(maps[:, -1], image_size, mode=self.upsample_mode, align_corners=False)
        return {"logits": logits_grid, "maps": maps, "anomaly_map": anomaly_map}

    def image_score(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Mean of the top-``K`` values of each (smoothed) map."""
        k = self.top_k
        if self.top_k_fraction is not None:
            k = max(1, round(self.top_k_fraction * anomaly_map.shape[-1] * anomaly_map.shape[-2]))
        return top_k_mean(anomaly_map, k)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor] | InferenceBatch:
        """Training: the dict of :meth:`forward_features`; evaluation: ``InferenceBatch(pred_score, anomaly_map)``."""
        out = self.forward_features(self.encode(images), tuple(images.shape[-2:]))
        if self.training:
            return out
        anomaly_map = self.smoothing(out["anomaly_map"])
        return InferenceBatch(pred_score=self.image_score(anomaly_map), anomaly_map=anomaly_map)
