"""Import the checkpoints released with the official AdaCLIP code (caoyunkang/AdaCLIP, ``weights/*.pth``).

``AdaCLIP_Trainer.save`` writes the trainer's ``state_dict`` filtered to the learnable modules, so every key starts
with ``clip_model.``. Layout (``n`` = prompt length, ``J`` = prompt depth, ``W_v``/``W_t`` = vision/text width, ``E`` =
embedding dimension; 768/1024/768 for ViT-L/14@336):

======================================================  =================  ================================
official key (after ``clip_model.``)                    shape              zsad (:class:`AdaCLIPModel`)
======================================================  =================  ================================
``visual_prompter.static_prompts.{j}``                  ``[n, W_v]``       ``visual_static.{j}``
``text_prompter.static_prompts.{j}``                    ``[n, W_t]``       ``text_static.{j}``
``dynamic_visual_prompt_generator.head.{i}.weight/bias``  ``[W_v, E]``/``[W_v]``  ``visual_dynamic.{i}.*``
``dynamic_text_prompt_generator.head.{i}.weight/bias``  ``[W_t, E]``/``[W_t]``  ``text_dynamic.{i}.*``
``patch_token_layer.head.{l}.weight/bias``              ``[E, W_v]``/``[E]``  ``patch_heads.{l}.*``
``cls_token_layer.head.0.weight/bias``                  ``[E, E]``/``[E]``  ``global_head.*``
======================================================  =================  ================================
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from zsad.methods.checkpoint_io import OfficialCheckpointError, check_finite, read_checkpoint_file

WHAT = "AdaCLIP checkpoint (official weights/*.pth)"

_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^visual_prompter\.static_prompts\.(\d+)$"), "visual_static.{0}"),
    (re.compile(r"^text_prompter\.static_prompts\.(\d+)$"), "text_static.{0}"),
    (re.compile(r"^dynamic_visual_prompt_generator\.head\.(\d+)\.(weight|bias)$"), "visual_dynamic.{0}.{1}"),
    (re.compile(r"^dynamic_text_prompt_generator\.head\.(\d+)\.(weight|bias)$"), "text_dynamic.{0}.{1}"),
    (re.compile(r"^patch_token_layer\.head\.(\d+)\.(weight|bias)$"), "patch_heads.{0}.{1}"),
    (re.compile(r"^cls_token_layer\.head\.0\.(weight|bias)$"), "global_head.{0}"),
)


def official_to_zsad_key(key: str) -> str | None:
    """The zsad parameter name of an official key (``clip_model.`` prefix optional), ``None`` if unknown."""
    key = key.removeprefix("clip_model.")
    for pattern, target in _RULES:
        match = pattern.match(key)
        if match:
            return target.format(*match.groups())
    return None


def convert_official_state_dict(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size],
) -> dict[str, torch.Tensor]:
    """Read and strictly check an official AdaCLIP checkpoint against a model's parameter shapes.

    Args:
        source: The ``.pth`` file, or an already loaded state dict.
        expected: zsad parameter name → shape of the model it goes into.

    Returns:
        zsad name → float32 tensor, exactly the keys of ``expected``.

    Raises:
        FileNotFoundError: The file does not exist.
        OfficialCheckpointError: Unreadable file, not a dict, non-tensor values, unknown / missing keys, shapes that
            do not fit, or NaN/inf values; the message names the file.
    """
    name = str(source) if isinstance(source, str | os.PathLike) else "the given state dict"
    raw = source if isinstance(source, Mapping) else read_checkpoint_file(source, WHAT)
    not_tensors = sorted(str(k) for k, v in raw.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        msg = f"{name!r} is not a {WHAT}: entries {not_tensors[:8]} are not tensors."
        raise OfficialCheckpointError(msg)
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in raw.items():
        target = official_to_zsad_key(str(key))
        if target is None:
            unknown.append(str(key))
        else:
            converted[target] = value
    missing = sorted(set(expected) - set(converted))
    extra = sorted(set(converted) - set(expected))
    if unknown or missing or extra:
        msg = (
            f"{name!r} does not fit this AdaCLIP model: unknown keys {sorted(unknown)[:8]}, missing "
            f"{missing[:8]}, keys beyond the model {extra[:8]} (check prompt_length / prompt_depth / layers against "
            "the checkpoint; the official ones are 5 / 4 / [6, 12, 18, 24])."
        )
        raise OfficialCheckpointError(msg)
    wrong = [f"{k}: {tuple(v.shape)} != {tuple(expected[k])}" for k, v in converted.items() if v.shape != expected[k]]
    if wrong:
        msg = f"{name!r}: shapes do not fit this backbone (the official one is ViT-L/14@336): {wrong[:6]}."
        raise OfficialCheckpointError(msg)
    check_finite(converted, name)
    return {k: v.float() for k, v in converted.items()}
