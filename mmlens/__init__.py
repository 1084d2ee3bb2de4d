"""mmlens: mechanistic interpretability for multimodal transformers.

The flow: inputs -> :class:`HookedModel` (an adapter table attaches named hook points; modality
spans come from the inputs) -> a run that records (:class:`ActivationCache`) or edits
(:func:`replace`, :func:`add`, :func:`apply`) activations -> results (:func:`logit_lens`,
:func:`evolution`), metrics and plots (:mod:`mmlens.plots`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmlens import hooks  # noqa: F401 - importing it registers the built-in adapter tables
from mmlens.core.adapter import (
    CLIP_BLOCK,
    GPT2_BLOCK,
    LLAMA_BLOCK,
    WHISPER_BLOCK,
    Adapter,
    BlockLayout,
    HookPoint,
    Point,
    Site,
    Stack,
    language_model,
    register_adapter,
)
from mmlens.core.cache import ActivationCache, Named
from mmlens.core.edits import Edit, HookContext, Where, ablate, add, apply, replace
from mmlens.core.spans import ModalitySpans, spans_from_blocks, spans_from_token_ids
from mmlens.core.units import InputUnits
from mmlens.core.wrapper import HookedModel, Recording, RunResult
from mmlens.methods.circuits import Circuit, Node
from mmlens.methods.evolution import Evolution, evolution
from mmlens.methods.explainers import Explanation, explain, register_explainer
from mmlens.methods.lens import (
    LensResult,
    TunedLens,
    compare_lenses,
    decode_encoder_layers,
    decode_soft_tokens,
    logit_lens,
    logit_lens_variants,
    nearest_tokens,
)
from mmlens.methods.patching import (
    Component,
    Corruption,
    EdgeScores,
    SweepResult,
    attribution_patch,
    corrupt,
    edge_attribution_patch,
    path_patch,
    sweep,
)

if TYPE_CHECKING:
    from mmlens.data.loading import LoadedModel

__version__ = "0.1.0"


def load_model(name: str, **kwargs) -> LoadedModel:
    """A registry model (``mmlens models``), else a hub id or local folder: :func:`mmlens.data.loading.load_model`,
    imported on first use (it pulls in the transformers auto classes)."""
    from mmlens.data.loading import load_model as load

    return load(name, **kwargs)


def wrap(model, **kwargs) -> HookedModel:
    """Wrap a model (a torch module, or a TransformerLens ``TransformerBridge``) as a :class:`HookedModel`."""
    return HookedModel(model, **kwargs)


__all__ = [
    "CLIP_BLOCK",
    "WHISPER_BLOCK",
    "GPT2_BLOCK",
    "LLAMA_BLOCK",
    "ActivationCache",
    "Adapter",
    "InputUnits",
    "BlockLayout",
    "Circuit",
    "Component",
    "Corruption",
    "EdgeScores",
    "Edit",
    "Evolution",
    "Explanation",
    "HookContext",
    "HookPoint",
    "HookedModel",
    "LensResult",
    "ModalitySpans",
    "Named",
    "Node",
    "Point",
    "Recording",
    "RunResult",
    "Site",
    "Stack",
    "SweepResult",
    "TunedLens",
    "Where",
    "ablate",
    "add",
    "apply",
    "attribution_patch",
    "compare_lenses",
    "corrupt",
    "decode_encoder_layers",
    "decode_soft_tokens",
    "edge_attribution_patch",
    "evolution",
    "explain",
    "language_model",
    "load_model",
    "logit_lens",
    "logit_lens_variants",
    "nearest_tokens",
    "path_patch",
    "register_adapter",
    "register_explainer",
    "replace",
    "spans_from_blocks",
    "spans_from_token_ids",
    "sweep",
    "wrap",
]
