"""AnomalyCLIP (Zhou et al., ICLR 2024): object-agnostic prompt learning, faithful to the official code."""

from zsad.methods.anomalyclip.checkpoint import (
    OfficialCheckpointError,
    convert_official_state_dict,
    read_official_checkpoint,
)
from zsad.methods.anomalyclip.lightning_model import AnomalyCLIP
from zsad.methods.anomalyclip.torch_model import ABNORMAL_TEMPLATE, NORMAL_TEMPLATE, AnomalyCLIPModel

__all__ = [
    "ABNORMAL_TEMPLATE",
    "NORMAL_TEMPLATE",
    "AnomalyCLIP",
    "AnomalyCLIPModel",
    "OfficialCheckpointError",
    "convert_official_state_dict",
    "read_official_checkpoint",
]
