"""Learnable prompts through the frozen CLIP text tower.

transformers' ``CLIPTextModel.forward`` takes token ids only, so learnable context vectors (CoOp / AnomalyCLIP /
CLIP-ADA) and deep prompts (AnomalyCLIP: hidden positions replaced before chosen layers) need a manual loop over the
frozen encoder layers. :func:`run_text_tower` is that loop; it passes an explicit causal mask so the result is
right with every attention back-end (sdpa ignores ``is_causal`` when handed ``None``, eager ignores ``is_causal``;
``hf_clip.md`` §6). :class:`PromptTemplate` turns ``"{} damaged object."`` into token embeddings with the learnable
vectors in place of the placeholder.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from zsad.backbone.tokenizer import CLIPBPETokenizer


def causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive ``[1, 1, T, T]`` mask: 0 on and below the diagonal, the dtype's minimum above it."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device)
    return mask.triu(1)[None, None]


def run_text_tower(
    text: nn.Module,
    text_projection: nn.Module,
    token_embeddings: torch.Tensor,
    eot_index: torch.Tensor,
    deep_prompts: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Encode prompt token embeddings with the frozen HF text transformer.

    Args:
        text: transformers ``CLIPTextModel`` (``embeddings``, ``encoder.layers``, ``final_layer_norm``).
        text_projection: ``Linear(width → E)``.
        token_embeddings: ``[P, T, W]`` token embeddings, learnable vectors already in place.
        eot_index: ``[P]`` end-of-text positions (OpenAI pooling: argmax of the ids).
        deep_prompts: ``{layer_index (0-based): [n, W] or [P, n, W]}``; before that layer hidden positions ``1..n``
            are replaced (the sequence length and the EOT position do not change). A ``[n, W]`` prompt is shared by
            the ``P`` prompts; a caller that must transform each copy (AnomalyCLIP's per-prompt fp16 cast) passes
            ``[P, n, W]``.

    Returns:
        ``[P, E]`` projected EOT features.
    """
    length = token_embeddings.shape[1]
    positions = text.embeddings.position_embedding.weight[:length]
    h = token_embeddings + positions.to(token_embeddings.dtype)
    return run_text_layers(text, text_projection, h, eot_index, start=0, deep_prompts=deep_prompts)


def run_text_layers(
    text: nn.Module,
    text_projection: nn.Module,
    hidden: torch.Tensor,
    eot_index: torch.Tensor,
    start: int = 0,
    deep_prompts: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run text layers ``start..`` on hidden states (position embeddings included), then pool and project.

    Starting after layer 0 lets a method reuse the output of layers that no learnable tensor reaches (AdaCLIP
    prompts only from layer 1 on, so layer 0 of its fixed sentences is computed once per class).

    Args:
        text: transformers ``CLIPTextModel``.
        text_projection: ``Linear(width → E)``.
        hidden: ``[P, T, W]`` input of layer ``start``.
        eot_index: ``[P]`` end-of-text positions.
        start: 0-based index of the first layer to run.
        deep_prompts: ``{layer_index (0-based): [n, W] or [P, n, W]}``; before that layer hidden positions ``1..n``
            are replaced (a 2-D tensor is shared by every prompt, a 3-D one holds one tensor per prompt).

    Returns:
        ``[P, E]`` projected EOT features.
    """
    h = hidden
    mask = causal_mask(h.shape[1], h.dtype, h.device)
    for index, layer in enumerate(text.encoder.layers):
        if index < start:
            continue
        if deep_prompts is not None and index in deep_prompts:
            prompt = deep_prompts[index].to(h.dtype)
            if prompt.dim() == 2:
                prompt = prompt.unsqueeze(0).expand(h.shape[0], -1, -1)
            n = prompt.shape[1]
            h = torch.cat([h[:, :1], prompt, h[:, 1 + n :]], dim=1)
        h = layer(h, mask)
    h = text.final_layer_norm(h)
    pooled = h[torch.arange(h.shape[0], device=h.device), eot_index.to(h.device)]
    return text_projection(pooled)


class PromptTemplate:
    """Token embeddings of a template whose ``{}`` placeholder holds ``n_ctx`` learnable vectors.

    ``PromptTemplate("{} damaged object.", 12, tokenizer)`` lays out ``[SOT] ctx_1..ctx_12 damaged object . [EOT]``
    exactly as AnomalyCLIP's ``"X X … X damaged object."`` trick does, without relying on the id of ``X``.

    Args:
        template: Text with exactly one ``{}`` where the context vectors go (``"{}"`` alone for no template).
        n_ctx: Number of learnable vectors at the placeholder.
        tokenizer: The CLIP tokenizer.
    """

    def __init__(self, template: str, n_ctx: int, tokenizer: CLIPBPETokenizer) -> None:
        if template.count("{}") != 1:
            msg = f"A prompt template needs exactly one '{{}}' placeholder, got {template!r}."
            raise ValueError(msg)
        prefix, suffix = (part.strip() for part in template.split("{}"))
        before = tokenizer.encode(prefix) if prefix else []
        after = tokenizer.encode(suffix) if suffix else []
        ids = [tokenizer.sot_token_id, *before, *([0] * n_ctx), *after, tokenizer.eot_token_id]
        if len(ids) > tokenizer.context_length:
            msg = f"Template {template!r} with {n_ctx} context vectors exceeds {tokenizer.context_length} tokens."
            raise ValueError(msg)
        self.template = template
        self.n_ctx = n_ctx
        self.ctx_start = 1 + len(before)
        self.ids = torch.zeros(tokenizer.context_length, dtype=torch.long)
        self.ids[: len(ids)] = torch.tensor(ids)
        self.eot_index = len(ids) - 1

    def embed(self, token_embedding: nn.Embedding, ctx: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[P, T, W]`` with ``ctx`` (``[n_ctx, W]`` or ``[P, n_ctx, W]``) at the placeholder."""
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0)
        fixed = token_embedding(self.ids.to(token_embedding.weight.device)).to(ctx.dtype)
        fixed = fixed.unsqueeze(0).expand(ctx.shape[0], -1, -1)
        start, stop = self.ctx_start, self.ctx_start + self.n_ctx
        return torch.cat([fixed[:, :start], ctx, fixed[:, stop:]], dim=1)

    def eot(self, n_prompts: int = 1) -> torch.Tensor:
        """End-of-text positions ``[n_prompts]``."""
        return torch.full((n_prompts,), self.eot_index, dtype=torch.long)


class TensorStateCache:
    """One value computed from some tensors, reused until any of them changes.

    Text features of learnable prompts are constant between optimiser steps, so evaluation encodes them once. The key
    is each tensor's storage, version counter, device and dtype: an optimiser step, ``load_state_dict``, ``copy_``
    (version bump) or ``.to()`` (new storage) invalidates the value. The value is computed without autograd and
    outside inference mode, so it can be reused in any later context.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: torch.Tensor | None = None

    @staticmethod
    def key(tensors: list[torch.Tensor]) -> tuple:
        """What identifies the tensors' current contents."""
        return tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in tensors)  # noqa: SLF001

    def get(self, tensors: list[torch.Tensor], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached value, recomputed with ``compute()`` when a tensor has changed since the last call."""
        key = self.key(tensors)
        if self._value is None or self._key != key:
            with torch.inference_mode(False), torch.no_grad():
                self._value = compute()
            self._key = key
        return self._value

    def clear(self) -> None:
        """Forget the value."""
        self._key = self._value = None
