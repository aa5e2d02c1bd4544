"""APRIL-GAN (Chen et al., VAND 2023): linear heads on frozen CLIP tokens and a fixed, class-aware text ensemble."""

from zsad.methods.april_gan.lightning_model import APRILGAN, GOGAN_CLASS_WORDS
from zsad.methods.april_gan.torch_model import DEFAULT_CLASS_WORD, APRILGANModel
from zsad.methods.checkpoint_io import OfficialCheckpointError

__all__ = ["APRILGAN", "DEFAULT_CLASS_WORD", "GOGAN_CLASS_WORDS", "APRILGANModel", "OfficialCheckpointError"]
