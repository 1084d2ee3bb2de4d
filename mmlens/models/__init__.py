"""Models that mmlens owns: a TEA-GLM-style graph-language model and a small fusion transformer."""

from mmlens.models.fusion import (
    Attention,
    Block,
    FusionConfig,
    FusionOutput,
    FusionTransformer,
    ImageEncoder,
    TextEncoder,
)
from mmlens.models.tea_glm import GraphSAGEEncoder, TeaGLM

__all__ = [
    "Attention",
    "Block",
    "FusionConfig",
    "FusionOutput",
    "FusionTransformer",
    "GraphSAGEEncoder",
    "ImageEncoder",
    "TeaGLM",
    "TextEncoder",
]
