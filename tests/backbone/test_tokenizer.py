"""The offline CLIP tokenizer gives open_clip's ids."""

from __future__ import annotations

import open_clip
import pytest
import torch

from zsad.backbone import get_tokenizer

ANOMALYCLIP_PROMPTS = [
    "X X X X X X X X X X X X object.",
    "X X X X X X X X X X X X damaged object.",
]
APRIL_GAN_STATES = (
    ["{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect", "{} without damage"]
    + ["damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"]
)
APRIL_GAN_TEMPLATES = [
    "a bad photo of a {}.", "a low resolution photo of the {}.", "a cropped photo of a {}.",
    "a jpeg corrupted photo of the {}.", "there is a {} in the scene.", "this is one {} in the scene.",
    "a black and white photo of the {}.", "a photo of my {}.",
]
APRIL_GAN_PROMPTS = [t.format(s.format(c)) for t in APRIL_GAN_TEMPLATES for s in APRIL_GAN_STATES
                     for c in ("metal_nut", "pipe_fryum", "bottle")]


@pytest.mark.parametrize("prompts", [ANOMALYCLIP_PROMPTS, APRIL_GAN_PROMPTS, ["Crème brûlée, naïve café!  ok?"]])
def test_ids_equal_open_clip(prompts: list[str]) -> None:
    ours = get_tokenizer()(prompts)
    theirs = open_clip.tokenize(prompts)
    assert ours.dtype == torch.long and ours.shape == (len(prompts), 77)
    assert torch.equal(ours, theirs)


def test_too_long_prompt_is_an_error() -> None:
    with pytest.raises(ValueError, match="longer than CLIP's context"):
        get_tokenizer()(["word " * 100])
