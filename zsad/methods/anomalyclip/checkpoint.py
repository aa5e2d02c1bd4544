"""Import the prompt learners released with the official AnomalyCLIP code (zqhang/AnomalyCLIP).

The official ``train.py`` saves ``{"epoch": …, "prompt_learner": AnomalyCLIP_PromptLearner.state_dict()}``
(``checkpoints/9_12_4_multiscale/epoch_15.pth`` is trained on VisA and used for MVTec AD,
``checkpoints/9_12_4_multiscale_visa/epoch_15.pth`` is trained on MVTec AD and used for VisA). Key layout
(``shared/specs/anomalyclip.md`` §8), ``W`` = text width (768 for ViT-L/14@336):

=================================  ===================  ==========================================================
official key                       shape                zsad
=================================  ===================  ==========================================================
``ctx_pos`` / ``ctx_neg``          ``[1, 1, n_ctx, W]``  ``ctx_normal`` / ``ctx_abnormal`` ``[n_ctx, W]``
``compound_prompts_text.{i}``      ``[4, W]``            ``deep_prompts.{i}``
``token_prefix_{pos,neg}``         ``[1, 1, 1, W]``      frozen token embeddings, checked against the backbone
``token_suffix_{pos,neg}``         ``[1, 1, 64, W]``      frozen token embeddings, checked against the backbone
``tokenized_prompts_{pos,neg}``    ``[1, 1, 77]``        checked against zsad's templates
``compound_prompt_projections.*``  ``[896, W]``, ``[896]``  never used by the official forward: not created, ignored
=================================  ===================  ==========================================================
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from zsad.methods.checkpoint_io import OfficialCheckpointError, check_finite, read_checkpoint_file

logger = logging.getLogger(__name__)

#: Relative difference above which the checkpoint's frozen token embeddings are taken to come from another CLIP.
EMBEDDING_TOLERANCE = 1e-3

_DEEP = re.compile(r"^compound_prompts_text\.(\d+)$")
_PROJECTION = re.compile(r"^compound_prompt_projections\.\d+\.(weight|bias)$")
_FROZEN = {
    f"{kind}_{side}" for kind in ("token_prefix", "token_suffix", "tokenized_prompts") for side in ("pos", "neg")
}


#: Re-exported: one exception class for every official-checkpoint import (``zsad.methods.checkpoint_io``).
__all__ = ["OfficialCheckpointError", "check_frozen_parts", "convert_official_state_dict", "read_official_checkpoint"]

_WHAT = "official AnomalyCLIP checkpoint (e.g. 9_12_4_multiscale/epoch_15.pth)"


def read_official_checkpoint(path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict:
    """The official prompt-learner state dict, from a file (``torch.load(weights_only=True)``) or a mapping.

    Accepts the training script's ``{"prompt_learner": state_dict, ...}`` or the bare state dict (with or without a
    ``prompt_learner.`` prefix).

    Raises:
        FileNotFoundError: The file does not exist.
        OfficialCheckpointError: The file is unreadable (truncated, garbage), holds something other than a dict (a
            saved tensor or list), holds no tensors at all, or its tensors hold NaN/inf; the message names the file.
    """
    if isinstance(path_or_state_dict, Mapping):
        raw, source = dict(path_or_state_dict), "the given AnomalyCLIP state dict"
    else:
        path = Path(path_or_state_dict).expanduser()
        raw, source = dict(read_checkpoint_file(path, _WHAT)), repr(str(path))
    if isinstance(raw.get("prompt_learner"), Mapping):
        raw = dict(raw["prompt_learner"])
    state = {str(k).removeprefix("prompt_learner."): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not state:
        msg = f"{source} holds no tensors (top-level keys {sorted(map(str, raw))[:8]}): it is not an {_WHAT}."
        raise OfficialCheckpointError(msg)
    check_finite(state, source)
    return state


def convert_official_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    n_ctx: int,
    width: int,
    n_deep: int,
    deep_prompt_length: int,
) -> dict[str, torch.Tensor]:
    """Map the official prompt-learner keys to :class:`AnomalyCLIPModel`'s parameters.

    Args:
        state_dict: Official keys (see the module docstring).
        n_ctx: The model's context length per prompt.
        width: The model's text width.
        n_deep: The model's number of deep prompts (``prompt_depth − 1``).
        deep_prompt_length: Positions per deep prompt.

    Returns:
        ``{"ctx_normal", "ctx_abnormal", "deep_prompts.{i}"}`` in float32.

    Raises:
        OfficialCheckpointError: Missing or unknown keys, or shapes that do not fit the model.
    """
    unknown = [
        k
        for k in state_dict
        if k not in ("ctx_pos", "ctx_neg") and k not in _FROZEN and not _DEEP.match(k) and not _PROJECTION.match(k)
    ]
    if unknown:
        msg = f"Not an AnomalyCLIP prompt learner: unknown keys {sorted(unknown)[:8]}."
        raise OfficialCheckpointError(msg)
    deep_keys = sorted(int(m.group(1)) for k in state_dict if (m := _DEEP.match(k)))
    missing = [k for k in ("ctx_pos", "ctx_neg") if k not in state_dict]
    if missing or deep_keys != list(range(n_deep)):
        msg = (
            f"The checkpoint does not fit this model: missing {missing}, deep prompts {deep_keys} "
            f"(the model has {n_deep}: prompt_depth={n_deep + 1})."
        )
        raise OfficialCheckpointError(msg)
    out = {}
    for official, ours in (("ctx_pos", "ctx_normal"), ("ctx_neg", "ctx_abnormal")):
        ctx = state_dict[official]
        if ctx.shape[-2:] != (n_ctx, width) or ctx[..., 0, 0].numel() != 1:
            msg = f"{official} has shape {tuple(ctx.shape)}; the model expects [1, 1, n_ctx={n_ctx}, width={width}]."
            raise OfficialCheckpointError(msg)
        out[ours] = ctx.reshape(n_ctx, width).float()
    for i in deep_keys:
        prompt = state_dict[f"compound_prompts_text.{i}"]
        if tuple(prompt.shape) != (deep_prompt_length, width):
            msg = (
                f"compound_prompts_text.{i} has shape {tuple(prompt.shape)}; expected ({deep_prompt_length}, {width})."
            )
            raise OfficialCheckpointError(msg)
        out[f"deep_prompts.{i}"] = prompt.float()
    if any(_PROJECTION.match(k) for k in state_dict):
        logger.info("Ignoring compound_prompt_projections: the official forward never uses them.")
    return out


def check_frozen_parts(
    state_dict: Mapping[str, torch.Tensor],
    templates: tuple,
    token_embedding: nn.Embedding,
) -> None:
    """Compare the checkpoint's frozen prompt parts with what this model builds.

    ``tokenized_prompts_*`` must hold the same words (a checkpoint learnt with other templates is another model:
    error); ``token_prefix/suffix_*`` are the backbone's token embeddings of those words (a mismatch means another
    CLIP backbone: warning, since the learnt prompts are then meaningless with this one).
    """
    for side, template in zip(("pos", "neg"), templates, strict=True):
        ctx = slice(template.ctx_start, template.ctx_start + template.n_ctx)
        tokens = state_dict.get(f"tokenized_prompts_{side}")
        if tokens is not None:
            theirs = tokens.reshape(-1).long().clone()
            ours = template.ids.clone()
            if theirs.numel() != ours.numel():
                msg = f"tokenized_prompts_{side} has {theirs.numel()} tokens, expected {ours.numel()}."
                raise OfficialCheckpointError(msg)
            theirs[ctx] = 0
            ours[ctx] = 0
            if not torch.equal(theirs[: template.eot_index + 1], ours[: template.eot_index + 1]):
                msg = (
                    f"tokenized_prompts_{side} are not the object-agnostic prompt {template.template!r} "
                    f"(ids {theirs[: template.eot_index + 1].tolist()}): not an AnomalyCLIP checkpoint for this method."
                )
                raise OfficialCheckpointError(msg)
        with torch.no_grad():
            reference = token_embedding(template.ids.to(token_embedding.weight.device)).float().cpu()
        parts = (
            (f"token_prefix_{side}", reference[: template.ctx_start]),
            (f"token_suffix_{side}", reference[ctx.stop :]),
        )
        for key, expected in parts:
            value = state_dict.get(key)
            if value is None:
                continue
            value = value.reshape(-1, value.shape[-1]).float()
            if value.shape != expected.shape:
                logger.warning(
                    "%s has shape %s, expected %s: another tokenizer or width?",
                    key,
                    tuple(value.shape),
                    tuple(expected.shape),
                )
                continue
            error = (value - expected).abs().max() / expected.abs().max().clamp_min(1e-12)
            if error > EMBEDDING_TOLERANCE:
                logger.warning(
                    "%s differs from this backbone's token embeddings (relative %.2g): the checkpoint was trained with "
                    "another CLIP (the official one is OpenAI ViT-L/14@336); its prompts will not mean the same.",
                    key,
                    float(error),
                )
