"""AdaptCLIP: visual, textual and prompt-query adapters; zero- and few-shot (spec ``shared/specs/adaptclip.md``)."""

from zsad.methods.adaptclip.lightning_model import AdaptCLIP
from zsad.methods.adaptclip.official import (
    OfficialCheckpointError,
    convert_official_state_dict,
    load_official_checkpoint,
)
from zsad.methods.adaptclip.torch_model import (
    AdaptCLIPModel,
    PromptQueryAdapter,
    ResidualMLP,
    TextualAdapter,
    VisualAdapter,
    align_to_references,
    harmonic_mean,
    static_prompts,
)

__all__ = [
    "AdaptCLIP",
    "AdaptCLIPModel",
    "OfficialCheckpointError",
    "PromptQueryAdapter",
    "ResidualMLP",
    "TextualAdapter",
    "VisualAdapter",
    "align_to_references",
    "convert_official_state_dict",
    "harmonic_mean",
    "load_official_checkpoint",
    "static_prompts",
]
