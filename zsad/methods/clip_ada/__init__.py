"""CLIP-ADA (seed 004): learnable prompt, synthetic anomalies, anomaly-region refinement (unified multi-class)."""

from zsad.methods.clip_ada.lightning_model import CLIPADA
from zsad.methods.clip_ada.loss import CLIPADALoss, mask_to_grid
from zsad.methods.clip_ada.torch_model import (
    CLIPADAModel,
    expected_trainable_parameters,
    similarity_logits,
    top_k_mean,
)

__all__ = [
    "CLIPADA",
    "CLIPADALoss",
    "CLIPADAModel",
    "expected_trainable_parameters",
    "mask_to_grid",
    "similarity_logits",
    "top_k_mean",
]
