"""Import of the official AdaptCLIP checkpoints (gaobb/AdaptCLIP, ``epoch_15.pth`` on the hub ``csgaobb/AdaptCLIP``).

An official checkpoint is ``{"textual_learner": …, "visual_learner": …, "pq_learner": …}`` (``train.py``), each the
state dict of one adapter module:

================================================  ==============================================================
official key                                      zsad key (``AdaptCLIPModel``)
================================================  ==============================================================
``textual_learner.ctx_pos`` ``[1, 1, r, W]``       ``textual.ctx_normal`` ``[r, W]``
``textual_learner.ctx_neg``                        ``textual.ctx_abnormal``
``textual_learner.token_prefix_*/suffix_*``,       frozen token embeddings / ids of the ``"X … X."`` skeleton: checked
``tokenized_prompts_*``                            against the backbone (a mismatch is logged), not stored
``visual_learner.local_adater.fc.*`` (sic)         ``visual.local_adapter.fc.*``
``visual_learner.global_adapter.fc.*``             ``visual.global_adapter.fc.*``
``pq_learner.sharebn.{l}.*``                       ``prompt_query.layer_norms.{l}.*``
``pq_learner.local_adapter.{l}.*`` (×4, shared)    ``prompt_query.seg_head.*`` (the 4 copies must be equal)
``pq_learner.global_adapter.{l}.*`` (×4, shared)   ``prompt_query.image_head.*``
================================================  ==============================================================

Every official key must be consumed and every adapter key filled (strict), shapes must match.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
from torch import nn

from zsad.methods.checkpoint_io import OfficialCheckpointError, check_finite, read_checkpoint_file

logger = logging.getLogger(__name__)

OFFICIAL_GROUPS = ("textual_learner", "visual_learner", "pq_learner")
_TEXT_BUFFERS = tuple(
    f"{name}_{polarity}"
    for name in ("token_prefix", "token_suffix", "tokenized_prompts")
    for polarity in ("pos", "neg")
)


#: ``OfficialCheckpointError`` is zsad's one exception for official-checkpoint imports (``zsad.methods.checkpoint_io``),
#: re-exported here for ``from zsad.methods.adaptclip import OfficialCheckpointError``.
__all__ = ["OFFICIAL_GROUPS", "OfficialCheckpointError", "convert_official_state_dict", "load_official_checkpoint"]

_WHAT = "official AdaptCLIP checkpoint (epoch_15.pth of csgaobb/AdaptCLIP)"


def _shared_copies(group: Mapping[str, torch.Tensor], prefix: str, target: str) -> dict[str, torch.Tensor]:
    """Map ``prefix.{l}.rest`` (the same module listed once per layer) to ``target.rest``, checking the copies agree."""
    out: dict[str, torch.Tensor] = {}
    for key, value in group.items():
        if not key.startswith(prefix + "."):
            continue
        if "." not in key[len(prefix) + 1 :]:
            msg = (
                f"Unknown key pq_learner.{key} in the official AdaptCLIP checkpoint (expected {prefix}.<layer>.<name>)."
            )
            raise OfficialCheckpointError(msg)
        _, rest = key[len(prefix) + 1 :].split(".", 1)
        name = f"{target}.{rest}"
        if name in out and not torch.equal(out[name], value):
            msg = f"Official {prefix}.*.{rest} differs between layers; zsad shares one head across layers."
            raise OfficialCheckpointError(msg)
        out[name] = value
    return out


def convert_official_state_dict(official: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Official AdaptCLIP checkpoint → the adapter part of an ``AdaptCLIPModel`` state dict.

    Args:
        official: ``{"textual_learner": sd, "visual_learner": sd, "pq_learner": sd}``.

    Returns:
        ``{zsad key: tensor}`` for ``textual.*``, ``visual.*`` and ``prompt_query.*``.

    Raises:
        OfficialCheckpointError: A group or key is missing or unknown.
    """
    missing = [g for g in OFFICIAL_GROUPS if g not in official]
    if missing:
        msg = f"Not an official AdaptCLIP checkpoint: missing {missing} (top-level keys {sorted(map(str, official))})."
        raise OfficialCheckpointError(msg)
    for group in OFFICIAL_GROUPS:
        # Each group is a module's state dict; anything else (a tensor, a list) would fail deep inside torch.
        value = official[group]
        if not isinstance(value, Mapping) or not all(isinstance(v, torch.Tensor) for v in value.values()):
            msg = f"Not an official AdaptCLIP checkpoint: {group!r} is a {type(value).__name__}, not a state dict."
            raise OfficialCheckpointError(msg)
        check_finite(value, f"official AdaptCLIP checkpoint group {group!r}")
    text, visual, pq = (official[g] for g in OFFICIAL_GROUPS)
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []

    for key in text:
        if key not in ("ctx_pos", "ctx_neg", *_TEXT_BUFFERS):
            unknown.append(f"textual_learner.{key}")
    for key in ("ctx_pos", "ctx_neg"):
        if key not in text:
            msg = f"Official checkpoint lacks textual_learner.{key}."
            raise OfficialCheckpointError(msg)
    out["textual.ctx_normal"] = text["ctx_pos"].reshape(-1, text["ctx_pos"].shape[-1])
    out["textual.ctx_abnormal"] = text["ctx_neg"].reshape(-1, text["ctx_neg"].shape[-1])

    for key, value in visual.items():
        if key.startswith("local_adater.") or key.startswith("local_adapter."):
            out["visual.local_adapter." + key.split(".", 1)[1]] = value
        elif key.startswith("global_adapter."):
            out["visual." + key] = value
        else:
            unknown.append(f"visual_learner.{key}")

    for key, value in pq.items():
        if key.startswith("sharebn."):
            out["prompt_query.layer_norms." + key[len("sharebn.") :]] = value
        elif not key.startswith(("local_adapter.", "global_adapter.")):
            unknown.append(f"pq_learner.{key}")
    out.update(_shared_copies(pq, "local_adapter", "prompt_query.seg_head"))
    out.update(_shared_copies(pq, "global_adapter", "prompt_query.image_head"))

    if unknown:
        msg = f"Unknown keys in the official AdaptCLIP checkpoint: {unknown}."
        raise OfficialCheckpointError(msg)
    return out


def _check_text_skeleton(model: nn.Module, text: Mapping[str, torch.Tensor]) -> None:
    """Compare the checkpoint's frozen skeleton (token ids and embeddings) with this backbone's; log mismatches."""
    if not all(k in text for k in _TEXT_BUFFERS):
        logger.warning("Official checkpoint has no prompt skeleton buffers; skipping the backbone consistency check.")
        return
    adapter = model.textual
    template = adapter.template
    ids = template.ids
    start, stop = template.ctx_start, template.ctx_start + template.n_ctx
    token_embedding = model.backbone.text.embeddings.token_embedding
    with torch.no_grad():
        reference = token_embedding(ids.to(token_embedding.weight.device)).float().cpu()
    for polarity in ("pos", "neg"):
        official_ids = text[f"tokenized_prompts_{polarity}"].reshape(-1).long().cpu()
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[start:stop] = False  # the official skeleton holds "x" there, zsad holds a placeholder
        if official_ids.shape != ids.shape or not torch.equal(official_ids[keep], ids[keep]):
            msg = f"Official prompt skeleton ids ({polarity}) differ from zsad's '{template.template}' layout."
            raise OfficialCheckpointError(msg)
        prefix = text[f"token_prefix_{polarity}"].reshape(-1, reference.shape[-1]).float().cpu()
        suffix = text[f"token_suffix_{polarity}"].reshape(-1, reference.shape[-1]).float().cpu()
        diff = max((prefix - reference[:start]).abs().max().item(), (suffix - reference[stop:]).abs().max().item())
        if diff > 1e-3:
            logger.warning(
                "The official checkpoint's frozen token embeddings differ from this backbone's by %.3g: the adapters "
                "were trained on another CLIP (expected %s with pretrained weights).",
                diff,
                "openai/clip-vit-large-patch14-336",
            )


def load_official_checkpoint(
    model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Mapping[str, torch.Tensor]]
) -> None:
    """Load an official AdaptCLIP checkpoint into an ``AdaptCLIPModel`` in place (strict on the adapters).

    Args:
        model: The :class:`~zsad.methods.adaptclip.torch_model.AdaptCLIPModel`.
        checkpoint: Path of ``epoch_15.pth`` (read with ``weights_only=True``) or the loaded dict.

    Raises:
        FileNotFoundError: The file does not exist.
        OfficialCheckpointError: The file is unreadable or not a dict of state dicts, values are NaN/inf, or layout
            or shapes do not match; with a path, the message names the file.
    """
    source = None
    if not isinstance(checkpoint, Mapping):
        source = repr(str(checkpoint))
        checkpoint = read_checkpoint_file(checkpoint, _WHAT)
    try:
        _load_converted(model, checkpoint)
    except OfficialCheckpointError as e:
        if source is None:
            raise
        msg = f"{source}: {e}"  # name the file: the layout checks only see the dict
        raise OfficialCheckpointError(msg) from None


def _load_converted(model: nn.Module, checkpoint: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    converted = convert_official_state_dict(checkpoint)
    _check_text_skeleton(model, checkpoint["textual_learner"])
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    missing = sorted(set(own) - set(converted))
    extra = sorted(set(converted) - set(own))
    if missing or extra:
        msg = f"Official checkpoint does not fit the model: missing {missing}, unexpected {extra}."
        raise OfficialCheckpointError(msg)
    wrong = [
        f"{k}: {tuple(converted[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if converted[k].shape != v.shape
    ]
    if wrong:
        msg = f"Official checkpoint shapes do not fit the model (other backbone or sizes?): {wrong}."
        raise OfficialCheckpointError(msg)
    model.load_state_dict(converted, strict=False)
