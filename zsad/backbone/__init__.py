"""The frozen CLIP backbone shared by every zsad method."""

from zsad.backbone.clip import (
    DEFAULT_BACKBONE,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    BackboneWeightsNotFoundError,
    CLIPBackbone,
    VisionOutput,
    architecture_config,
    create_backbone,
    list_architectures,
)
from zsad.backbone.dpam import vv_attention_block
from zsad.backbone.prompts import PromptTemplate, TensorStateCache, run_text_layers, run_text_tower
from zsad.backbone.tokenizer import CLIPBPETokenizer, get_tokenizer
from zsad.backbone.visual_prompts import encode_image_with_prompts

__all__ = [
    "DEFAULT_BACKBONE",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "BackboneWeightsNotFoundError",
    "CLIPBPETokenizer",
    "CLIPBackbone",
    "PromptTemplate",
    "TensorStateCache",
    "VisionOutput",
    "architecture_config",
    "create_backbone",
    "get_tokenizer",
    "list_architectures",
    "encode_image_with_prompts",
    "run_text_layers",
    "run_text_tower",
    "vv_attention_block",
]
