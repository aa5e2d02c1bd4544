"""MuSc (Li et al., ICLR 2024): training-free, transductive zero-shot anomaly detection by mutual scoring."""

from zsad.methods.musc.lightning_model import MuSc
from zsad.methods.musc.torch_model import K_LIST_BY_DATASET, MuScModel, lnamd, mutual_k, mutual_scores, rscin

__all__ = ["K_LIST_BY_DATASET", "MuSc", "MuScModel", "lnamd", "mutual_k", "mutual_scores", "rscin"]
