"""Adapters: one short table per architecture family (installed as ``mmlens.hooks``).

Importing this package registers the built-in tables with :func:`mmlens.core.adapter.register_adapter`
(``import mmlens`` does it); :func:`mmlens.core.adapter.find_adapter` then picks the adapter whose
``architectures`` names a model's class (or one of its bases). See docs/adding-an-architecture.md.
"""

from __future__ import annotations

from mmlens.core.adapter import ADAPTERS, AUTO_BUILDERS, Adapter, find_adapter, register_adapter
from mmlens.hooks.auto import auto_adapter
from mmlens.hooks.fusion_transformer import FUSION_TRANSFORMER
from mmlens.hooks.gemma3 import GEMMA3
from mmlens.hooks.graph_text import GRAPH_TEXT
from mmlens.hooks.idefics3 import IDEFICS3
from mmlens.hooks.internvl import INTERNVL
from mmlens.hooks.language_models import GPT2, LLAMA_FAMILY
from mmlens.hooks.llava import LLAVA
from mmlens.hooks.llava_next import LLAVA_NEXT, LLAVA_ONEVISION
from mmlens.hooks.paligemma import PALIGEMMA
from mmlens.hooks.qwen2_audio import QWEN2_AUDIO
from mmlens.hooks.qwen2_vl import QWEN2_5_VL, QWEN2_VL
from mmlens.hooks.qwen_omni import QWEN_OMNI
from mmlens.hooks.tea_glm import TEA_GLM
from mmlens.hooks.voxtral import VOXTRAL

__all__ = [
    "ADAPTERS",
    "BUILT_IN",
    "FUSION_TRANSFORMER",
    "GEMMA3",
    "GPT2",
    "GRAPH_TEXT",
    "IDEFICS3",
    "INTERNVL",
    "LLAMA_FAMILY",
    "LLAVA",
    "QWEN2_AUDIO",
    "QWEN_OMNI",
    "QWEN2_5_VL",
    "QWEN2_VL",
    "LLAVA_NEXT",
    "LLAVA_ONEVISION",
    "PALIGEMMA",
    "TEA_GLM",
    "VOXTRAL",
    "find_adapter",
    "register_adapter",
]

BUILT_IN: tuple[Adapter, ...] = (
    LLAMA_FAMILY,
    GPT2,
    LLAVA,
    IDEFICS3,
    QWEN2_AUDIO,
    VOXTRAL,
    QWEN_OMNI,
    QWEN2_VL,
    QWEN2_5_VL,
    GEMMA3,
    LLAVA_NEXT,
    LLAVA_ONEVISION,
    IDEFICS3,
    PALIGEMMA,
    INTERNVL,
    TEA_GLM,
    FUSION_TRANSFORMER,
    GRAPH_TEXT,
)
"""The shipped tables, in lookup order (the first whose ``architectures`` matches wins)."""

for _adapter in reversed(BUILT_IN):
    register_adapter(_adapter)
if auto_adapter not in AUTO_BUILDERS:
    AUTO_BUILDERS.append(auto_adapter)
