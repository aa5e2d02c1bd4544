"""AdaCLIP (ECCV 2024): hybrid static + dynamic prompts in both CLIP towers and hybrid semantic fusion."""

from zsad.methods.adaclip.checkpoint import convert_official_state_dict, official_to_zsad_key
from zsad.methods.adaclip.kmeans import kmeans, sklearn_kmeans
from zsad.methods.adaclip.lightning_model import AdaCLIP
from zsad.methods.adaclip.torch_model import DEFAULT_CLASS_WORDS, AdaCLIPModel, adaclip_class_word

__all__ = [
    "DEFAULT_CLASS_WORDS",
    "AdaCLIP",
    "AdaCLIPModel",
    "adaclip_class_word",
    "convert_official_state_dict",
    "kmeans",
    "official_to_zsad_key",
    "sklearn_kmeans",
]
