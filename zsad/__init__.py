"""zsad: CLIP-based zero-shot anomaly detection on PyTorch Lightning, usable from anomalib.

Importing ``zsad`` imports its methods and datamodules, so anomalib resolves them by class path
(``zsad.methods.LearnableVectors``) and, once imported, ``anomalib.models.get_model("learnable_vectors")`` finds them.
"""

__version__ = "0.1.0"

import warnings

# anomalib's own imports emit deprecation chatter (timm.models.layers, dinov2) that zsad users cannot act on.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(timm|anomalib)\.")

from zsad import data, methods  # noqa: E402,F401
from zsad.methods import *  # noqa: E402,F401,F403
