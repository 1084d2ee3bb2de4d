"""Adapters: one short table per architecture family (installed as ``mmlens.hooks``).

``find_adapter(model)`` picks the adapter whose ``architectures`` names the model's class (or one
of its bases); ``register_adapter`` adds a new one (see the README, "Adding an architecture").
"""

from __future__ import annotations

from torch import nn

from mmlens.core.adapter import Adapter

from mmlens.hooks.fusion_transformer import FUSION_TRANSFORMER
from mmlens.hooks.graph_text import GRAPH_TEXT
from mmlens.hooks.idefics3 import IDEFICS3
from mmlens.hooks.language_models import GPT2, LLAMA_FAMILY
from mmlens.hooks.llava import LLAVA
from mmlens.hooks.tea_glm import TEA_GLM

ADAPTERS: list[Adapter] = [LLAMA_FAMILY, GPT2, LLAVA, IDEFICS3, TEA_GLM, FUSION_TRANSFORMER, GRAPH_TEXT]


def register_adapter(adapter: Adapter) -> Adapter:
    """Make ``adapter`` available to :func:`find_adapter` (later registrations win)."""
    if not isinstance(adapter, Adapter):
        raise TypeError(f"register_adapter takes an mmlens.Adapter, got {type(adapter).__name__}")
    ADAPTERS.insert(0, adapter)
    return adapter


def find_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``'s class; raises with how to write one when there is none."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    known = sorted({a for ad in ADAPTERS for a in ad.architectures})
    raise LookupError(
        f"no mmlens adapter for {type(model).__name__}. Supported classes: {known}. To add one, write a table "
        "mmlens.Adapter(name=..., architectures=('YourClass',), stacks=(...), points=(...), spans=...) and call "
        "mmlens.register_adapter(...) (README: 'Adding an architecture'); list module paths with "
        "[n for n, _ in model.named_modules()]"
    )
