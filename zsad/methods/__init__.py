"""zsad's ZSAD methods; each is an anomalib ``AnomalibModule`` usable from anomalib's Engine and CLI."""

from zsad.methods.adaclip import AdaCLIP
from zsad.methods.adaptclip import AdaptCLIP
from zsad.methods.anomalyclip import AnomalyCLIP
from zsad.methods.april_gan import APRILGAN
from zsad.methods.base import ZSADModule, count_parameters
from zsad.methods.clip_ada import CLIPADA
from zsad.methods.learnable_vectors import LearnableVectors
from zsad.methods.msflow import MSFlow
from zsad.methods.winclip import WinCLIP

__all__ = [
    "APRILGAN",
    "AdaCLIP",
    "AdaptCLIP",
    "AnomalyCLIP",
    "CLIPADA",
    "LearnableVectors",
    "MSFlow",
    "WinCLIP",
    "ZSADModule",
    "count_parameters",
]
