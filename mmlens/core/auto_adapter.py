"""Automatic adapters, the generic part: find stages, block stacks and block layouts in a module tree.

:mod:`mmlens.hooks.auto` knows the input keys and config names of multimodal models and builds an
:class:`Adapter` from what these functions find; nothing here names an input key. Every finder
returns a dotted module path (``""`` is the root) or None, and :func:`require` turns a None into an
:class:`AutoAdapterError` that names the missing fact and how to supply it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from mmlens.core.adapter import (
    BATCH_POS,
    CLIP_BLOCK,
    GPT2_BLOCK,
    LLAMA_BLOCK,
    AutoAdapterError,
    BlockLayout,
    Point,
    Site,
    Stack,
    get_attr,
)

PIXTRAL_BLOCK = BlockLayout(attn="attention", attn_out_proj="attention.o_proj", mlp="feed_forward", norm_mid="ffn_norm")
KNOWN_LAYOUTS: dict[str, BlockLayout] = {
    "llama": LLAMA_BLOCK,
    "clip": CLIP_BLOCK,
    "pixtral": PIXTRAL_BLOCK,
    "gpt2": GPT2_BLOCK,
}
"""Block layouts recognised from a block's module names, tried in this order."""

PACKED: tuple[str, ...] = ("pack", "item")
"""Axes of an encoder value ``[1, items, d]`` that packs the patches of every image of the batch into
one sequence (Pixtral): no batch axis, positions on axis 1."""

POST_NORM_MARKERS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")
"""Module names of blocks that normalise each branch's output before adding it (Gemma 2/3): such a
block is not of the pre-norm form the layouts above describe, whatever its other names."""


def require(value: Any, fact: str, how: str) -> Any:
    """``value``, or an :class:`AutoAdapterError` naming ``fact`` and ``how`` to supply it."""
    if value is None:
        raise AutoAdapterError(f"cannot find {fact}; {how}", fact)
    return value


def module_path(model: nn.Module, module: nn.Module | None) -> str | None:
    """The dotted path of ``module`` inside ``model`` (``""``: the model itself), or None."""
    if module is None:
        return None
    return next((name for name, m in model.named_modules() if m is module), None)


def find_child(model: nn.Module, names: Sequence[str], under: str = "") -> str | None:
    """The shallowest module below ``under`` whose own name is one of ``names`` (at equal depth,
    earlier names win), as a dotted path from the root; None when there is none."""
    root = model.get_submodule(under) if under else model
    found = []
    for path, _ in root.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if path and leaf in names:
            found.append((path.count("."), names.index(leaf), path))
    if not found:
        return None
    path = min(found)[2]
    return f"{under}.{path}" if under else path


def block_list(model: nn.Module, under: str) -> str | None:
    """The longest ``nn.ModuleList`` below ``under`` whose modules are all of one class (ties: the
    shallowest): the stack of blocks of a transformer."""
    root = model.get_submodule(under) if under else model
    found = []
    for path, m in root.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1:
            found.append((-len(m), path.count("."), path))
    if not found:
        return None
    path = min(found)[2]
    return f"{under}.{path}" if under else path


def detect_layout(block: nn.Module) -> BlockLayout | None:
    """The known layout whose four module names all exist in ``block``; None when none fits or the
    block normalises its branch outputs (:data:`POST_NORM_MARKERS`)."""
    children = {name for name, _ in block.named_modules()}
    if any(marker in children for marker in POST_NORM_MARKERS):
        return None
    for layout in KNOWN_LAYOUTS.values():
        if {layout.attn, layout.attn_out_proj, layout.mlp, layout.norm_mid} <= children:
            return layout
    return None


def attribute_path(model: nn.Module, candidates: Sequence[str]) -> str | None:
    """The first dotted attribute path of ``candidates`` that resolves to an int on ``model``."""
    for path in candidates:
        try:
            value = get_attr(model, path)
        except AttributeError:
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            return path
    return None


def layout_error(model: nn.Module, blocks: str, option: str) -> AutoAdapterError:
    """The error for a stack whose block layout is not recognised, listing the block's modules."""
    children = sorted(name for name, _ in model.get_submodule(f"{blocks}.0").named_children())
    return AutoAdapterError(
        f"cannot find the block layout of {blocks!r}: its blocks have modules {children}, which match none of the "
        f"known layouts {sorted(KNOWN_LAYOUTS)} (blocks with post-norms on their branches are not of the pre-norm "
        f"form). Supply it: mmlens.hooks.auto.auto_adapter(model, {option}=mmlens.BlockLayout(attn=..., "
        "attn_out_proj=..., mlp=..., norm_mid=...)) and pass the result as HookedModel(model, adapter=...)",
        f"{option} ({blocks}.0)",
    )


def encoder_rows(
    model: nn.Module,
    tower: str,
    prefix: str,
    modality: str,
    n_heads: Sequence[str],
    layout: BlockLayout | None = None,
    axes: tuple[str, ...] = BATCH_POS,
) -> tuple[Stack, tuple[Point, ...]]:
    """The block stack (layout detected, else plain ``.out`` layers) and ``{prefix}.embed`` point of an
    encoder whose module lives at ``tower``; ``axes`` are the leading axes of their values."""
    blocks = require(
        block_list(model, tower),
        f"the blocks of the {modality} encoder {tower!r}",
        "it has no ModuleList of blocks; write a table (docs/adding-an-architecture.md)",
    )
    layout = layout or detect_layout(model.get_submodule(blocks)[0])
    heads = attribute_path(model, n_heads) if layout is not None else None
    stack = Stack(
        prefix=prefix, stage="encoder", modality=modality, blocks=blocks, layout=layout, n_heads=heads, axes=axes
    )
    embed = find_child(model, ("embeddings", "ln_pre", "patch_embed", "embed"), under=tower)
    points = (Point(f"{prefix}.embed", "encoder", modality, Site(embed), axes=axes),) if embed else ()
    return stack, points


def lm_rows(
    model: nn.Module, lm: str, embed_kwarg: str | None, layout: BlockLayout | None = None
) -> tuple[Stack, tuple[Point, ...]]:
    """The block stack and the ``lm.embed``, ``lm.final_norm`` and ``lm.logits`` points of the
    language model at ``lm``, and ``fusion.embeds`` when the fused input embeddings arrive as keyword
    ``embed_kwarg`` (None: a text-only model)."""
    how = "pass it as mmlens.hooks.auto.auto_adapter(model, {}=...)"
    blocks = require(block_list(model, lm), f"the decoder blocks of {lm!r}", how.format("language_model"))
    layout = layout or detect_layout(model.get_submodule(blocks)[0])
    if layout is None:
        raise layout_error(model, blocks, "lm_layout")
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    embed = module_path(model, get_in() if callable(get_in) else None) or find_child(
        model, ("embed_tokens", "wte", "tok_embeddings"), under=lm
    )
    logits = module_path(model, get_out() if callable(get_out) else None) or find_child(model, ("lm_head", "output"))
    final_norm = find_child(model, ("norm", "final_layernorm", "ln_f", "final_norm"), under=lm)
    heads = attribute_path(model, ("config.text_config.num_attention_heads", "config.num_attention_heads"))
    stack = Stack(prefix="lm", stage="lm", modality=None, blocks=blocks, layout=layout, n_heads=heads)
    fused = (Point("fusion.embeds", "fusion", None, Site(lm, "input", 0, embed_kwarg), True),) if embed_kwarg else ()
    points = (
        *fused,
        Point("lm.embed", "lm", None, Site(require(embed, "the token embedding", how.format("embed"))), True),
        Point("lm.final_norm", "lm", None, Site(require(final_norm, "the final norm", how.format("final_norm"))), True),
        Point("lm.logits", "lm", None, Site(require(logits, "the unembedding (lm_head)", how.format("logits"))), True),
    )
    return stack, points
