"""WinCLIP / WinCLIP+: training-free zero- and few-shot anomaly detection (spec ``shared/specs/baselines.md`` §3)."""

from zsad.methods.winclip.lightning_model import DEFAULT_CLASS_WORDS, DEFAULT_WINCLIP_BACKBONE, WinCLIP
from zsad.methods.winclip.torch_model import (
    TEMPERATURE,
    WinCLIPModel,
    association_scores,
    class_scores,
    harmonic_aggregation,
)

__all__ = [
    "DEFAULT_CLASS_WORDS",
    "DEFAULT_WINCLIP_BACKBONE",
    "TEMPERATURE",
    "WinCLIP",
    "WinCLIPModel",
    "association_scores",
    "class_scores",
    "harmonic_aggregation",
]
