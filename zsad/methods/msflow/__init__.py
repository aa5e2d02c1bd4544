"""MSFlow (Zhou et al., TNNLS 2024): multi-scale normalising flows, an unsupervised baseline of the Gogan benchmark."""

from zsad.methods.msflow.lightning_model import MSFlow
from zsad.methods.msflow.torch_model import MSFlowModel

__all__ = ["MSFlow", "MSFlowModel"]
