"""The learnable-vector method (seed 000)."""

from zsad.methods.learnable_vectors.lightning_model import LearnableVectors
from zsad.methods.learnable_vectors.torch_model import LearnableVectorsModel, pair_logits, pair_probability

__all__ = ["LearnableVectors", "LearnableVectorsModel", "pair_logits", "pair_probability"]
