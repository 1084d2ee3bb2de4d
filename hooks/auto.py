"""Automatic adapters for models with no table: what the input keys and config names mean.

:func:`auto_adapter` derives an :class:`Adapter` (named ``auto:<Class>``) from a model's config
(``image_token_id`` / ``image_token_index`` / ``audio_token_id``, ``vision_config`` /
``audio_config``) and its module tree (vision / audio tower, projector, language model and its block
layout, found by :mod:`mmlens.core.auto_adapter`). :func:`mmlens.core.adapter.find_adapter` falls
back to it when no table matches (an explicit table always wins), and the wrap-time self-check
(:mod:`mmlens.core.selfcheck`) then validates it on a probe input built here. A fact that cannot be
found raises :class:`mmlens.core.adapter.AutoAdapterError` naming it and the keyword that supplies it.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from mmlens.core.adapter import BATCH_POS, ITEMS, Adapter, AutoAdapterError, Point, Site, Stack
from mmlens.core.auto_adapter import PACKED, encoder_rows, find_child, lm_rows, module_path, require
from mmlens.core.spans import spans_from_token_ids
from mmlens.hooks.language_models import neutral_text
from mmlens.metrics.perturb import image_perturbations, token_perturbations

FUSED_EMBEDS_KWARG = "inputs_embeds"
TEXT_INPUTS = ("input_ids", "attention_mask")
PROBE_IMAGES = 2


@dataclass(frozen=True)
class ModalityKeys:
    """Where one modality shows in a model: config names, module names and input keys.

    Attributes:
        token_attrs: config attributes holding the placeholder token id, in order of preference.
        config_attr: the sub-config whose presence says the model has this modality.
        towers / projectors: module names of the encoder and of the projector into the LM.
        main_input: the input key of the raw signal; extra_inputs: keys that go with it.
        prefix: namespace of the encoder's hook points.
    """

    token_attrs: tuple[str, ...]
    config_attr: str
    towers: tuple[str, ...]
    projectors: tuple[str, ...]
    main_input: str
    extra_inputs: tuple[str, ...]
    prefix: str


MODALITIES: dict[str, ModalityKeys] = {
    "image": ModalityKeys(
        token_attrs=("image_token_id", "image_token_index"),
        config_attr="vision_config",
        towers=("vision_tower", "vision_model", "vision_encoder", "visual", "vision"),
        projectors=("multi_modal_projector", "connector", "mm_projector", "merger", "vision_projector", "projector"),
        main_input="pixel_values",
        extra_inputs=("pixel_attention_mask", "image_sizes"),
        prefix="vision",
    ),
    "audio": ModalityKeys(
        token_attrs=("audio_token_id", "audio_token_index"),
        config_attr="audio_config",
        towers=("audio_tower", "audio_encoder", "audio_model"),
        projectors=("audio_projector", "multi_modal_projector", "projector"),
        main_input="input_features",
        extra_inputs=("feature_attention_mask", "input_features_mask"),
        prefix="audio",
    ),
}

_AUTO: dict[tuple[type, tuple[str, ...]], Adapter] = {}
"""Derived adapters by (model class, names of its top-level modules): one adapter object per
structure, so the self-check runs once for it."""


def is_auto(adapter: Adapter) -> bool:
    """Whether ``adapter`` was derived by :func:`auto_adapter` (not a hand-written table)."""
    return adapter.name.startswith("auto:")


def auto_adapter(model: nn.Module, **facts: Any) -> Adapter:
    """An adapter derived from ``model``'s config and module tree (cached per class and top-level
    structure when no fact is given).

    Args:
        facts: what cannot be found, or should not be guessed: ``image_token_id`` / ``audio_token_id``
            (int), ``vision_tower`` / ``audio_tower`` / ``projector`` / ``audio_projector`` /
            ``language_model`` (dotted module paths), ``lm_layout`` / ``vision_layout`` /
            ``audio_layout`` (:class:`mmlens.BlockLayout`), ``causal`` (bool).
    Raises:
        AutoAdapterError: naming the fact that cannot be found and the keyword that supplies it.
    """
    key = (type(model), tuple(name for name, _ in model.named_children()))
    if not facts and key in _AUTO:
        return _AUTO[key]
    unknown = set(facts) - _FACTS
    if unknown:
        raise TypeError(f"auto_adapter got unknown facts {sorted(unknown)}; it takes {sorted(_FACTS)}")
    config = require(getattr(model, "config", None), "model.config", "the automatic adapter reads the model's config")
    found = {m: _modality(model, config, m, keys, facts) for m, keys in MODALITIES.items()}
    found = {m: f for m, f in found.items() if f is not None}
    lm = require(
        facts.get("language_model") or _language_model(model),
        "the language model",
        "pass mmlens.hooks.auto.auto_adapter(model, language_model='dotted.path')",
    )
    lm_stack, lm_points = lm_rows(model, lm, FUSED_EMBEDS_KWARG if found else None, facts.get("lm_layout"))
    stacks, points = [], []
    for modality, (tower, projector, _) in found.items():
        keys = MODALITIES[modality]
        packed = packs_images(model, tower)
        stack, embed = encoder_rows(
            model,
            tower,
            keys.prefix,
            modality,
            _heads(keys),
            facts.get(f"{keys.prefix}_layout"),
            axes=PACKED if packed else BATCH_POS,
        )
        stacks.append(stack)
        name = "fusion.projector_out" if not points else f"fusion.{modality}_projector_out"
        points += [*embed, Point(name, "fusion", modality, Site(projector), axes=ITEMS if packed else BATCH_POS)]
    adapter = _table(model, found, [*stacks, lm_stack], [*points, *lm_points], facts.get("causal", True))
    if not facts:
        _AUTO[key] = adapter
    return adapter


_FACTS = {
    "image_token_id",
    "audio_token_id",
    "vision_tower",
    "audio_tower",
    "projector",
    "audio_projector",
    "language_model",
    "lm_layout",
    "vision_layout",
    "audio_layout",
    "causal",
}


def packs_images(model: nn.Module, tower: str) -> bool:
    """Whether the encoder at ``tower`` takes ``image_sizes`` (images of any size, their patches packed
    into one sequence ``[1, patches, d]``, as Pixtral does) rather than a batch of fixed-size images."""
    return "image_sizes" in inspect.signature(model.get_submodule(tower).forward).parameters


def _heads(keys: ModalityKeys) -> tuple[str, ...]:
    return (f"config.{keys.config_attr}.num_attention_heads", f"config.{keys.config_attr}.num_heads")


def _token_id(config: Any, keys: ModalityKeys) -> int | None:
    for attr in keys.token_attrs:
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _modality(
    model: nn.Module, config: Any, modality: str, keys: ModalityKeys, facts: dict
) -> tuple[str, str, int] | None:
    """(tower path, projector path, placeholder token id) of ``modality``, or None when the model
    has no such modality (no sub-config, no token id, no tower given)."""
    fact = {"image": "image_token_id", "audio": "audio_token_id"}[modality]
    projector_fact = "projector" if modality == "image" else "audio_projector"
    token = facts.get(fact, _token_id(config, keys))
    tower = facts.get(f"{keys.prefix}_tower")
    if token is None and tower is None and getattr(config, keys.config_attr, None) is None:
        return None
    where = f"the {modality} placeholder token id (config.{' / config.'.join(keys.token_attrs)})"
    token = require(token, where, f"pass mmlens.hooks.auto.auto_adapter(model, {fact}=...)")
    tower = require(
        tower or find_child(model, keys.towers),
        f"the {modality} encoder (a module named one of {list(keys.towers)})",
        f"pass mmlens.hooks.auto.auto_adapter(model, {keys.prefix}_tower='dotted.path')",
    )
    projector = require(
        facts.get(projector_fact) or find_child(model, keys.projectors),
        f"the {modality} projector into the language model (a module named one of {list(keys.projectors)})",
        f"pass mmlens.hooks.auto.auto_adapter(model, {projector_fact}='dotted.path')",
    )
    return tower, projector, int(token)


def _language_model(model: nn.Module) -> str | None:
    """The decoder the model's ``get_decoder()`` returns, else a module named like a language model."""
    get_decoder = getattr(model, "get_decoder", None)
    path = module_path(model, get_decoder()) if callable(get_decoder) else None
    return path or find_child(model, ("language_model", "text_model", "llm", "decoder", "model"))


def _table(model: nn.Module, found: dict, stacks: list[Stack], points: list[Point], causal: bool) -> Adapter:
    """The Adapter of the stacks and points found, with spans, neutral references, perturbations and probe."""
    tokens = {m: token for m, (_, _, token) in found.items()}
    accepted = set(inspect.signature(model.forward).parameters)
    modality_inputs = {
        m: tuple(k for k in (MODALITIES[m].main_input, *MODALITIES[m].extra_inputs) if k in accepted) for m in found
    }
    neutral = {"text": neutral_text}
    for m in found:
        neutral[m] = partial(_neutral, key=MODALITIES[m].main_input, mean=m == "image")
    perturbations = {"text": token_perturbations("input_ids")}
    if "image" in found:
        perturbations["image"] = image_perturbations(MODALITIES["image"].main_input)
    return Adapter(
        name=f"auto:{type(model).__name__}",
        architectures=(type(model).__name__,),
        stacks=tuple(stacks),
        points=tuple(points),
        spans=partial(_token_spans, tokens=tokens),
        neutral=neutral,
        modality_inputs={"text": TEXT_INPUTS, **modality_inputs},
        perturbations=perturbations,
        causal=causal,
        probe=partial(image_probe, token=tokens["image"], tower=found["image"][0], projector=found["image"][1])
        if "image" in found
        else None,
    )


def _token_spans(model: nn.Module, inputs: dict, tokens: dict[str, int]) -> Any:
    """Each modality's positions are where ``input_ids`` holds its placeholder token."""
    return spans_from_token_ids(inputs["input_ids"], inputs.get("attention_mask"), tokens)


def _neutral(model: nn.Module, inputs: dict, spans: Any, key: str, mean: bool) -> dict:
    """The modality's input replaced: images by a flat image of their own per-channel mean colour (an
    all-zero image is padding to some models), other signals by zeros."""
    value = inputs[key]
    if mean:
        return {**inputs, key: value.mean(dim=(-1, -2), keepdim=True).expand_as(value).clone()}
    return {**inputs, key: torch.zeros_like(value)}


class _Captured(Exception):
    """Stops a forward once the projector has run (its output shape is all the probe needs)."""


def _probe_pixels(model: nn.Module, tower: str) -> dict:
    """``PROBE_IMAGES`` random images of the vision config's size, or, for a vision tower that takes
    ``image_sizes`` (any size: Pixtral), of a small size, with their ``image_sizes``."""
    vision = model.config.vision_config
    param = next(model.parameters())
    sized = packs_images(model, tower)
    if sized:
        side = vision.patch_size * getattr(model.config, "spatial_merge_size", 1) * 2
        height = width = side
    else:
        size = vision.image_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
    channels = getattr(vision, "num_channels", 3)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(PROBE_IMAGES, channels, height, width, generator=generator)
    out = {"pixel_values": pixels.to(param.device, param.dtype)}
    if sized:
        out["image_sizes"] = torch.tensor([[height, width]] * PROBE_IMAGES, device=param.device)
    return out


def image_tokens_per_image(model: nn.Module, pixels: dict, projector: str) -> int:
    """How many placeholder tokens one image of ``pixels`` takes: the projector's output, measured by
    running the model until the projector has run."""
    shape: list[int] = []

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        value = output[0] if isinstance(output, tuple) else output
        shape.extend(value.shape)
        raise _Captured

    ids = torch.ones(PROBE_IMAGES, 1, dtype=torch.long, device=pixels["pixel_values"].device)
    handle = model.get_submodule(projector).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=ids, **pixels)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not shape:
        raise AutoAdapterError(
            f"the projector {projector!r} did not run on a probe image; pass HookedModel(model, check=inputs)", "probe"
        )
    if len(shape) == 3 and shape[0] == PROBE_IMAGES:
        return shape[1]  # [images, tokens, d]
    return math.prod(shape[:-1]) // PROBE_IMAGES  # all images' tokens in one sequence


def text_ids(config: Any, n: int) -> list[int]:
    """``n`` token ids that are no special token of ``config`` (nor of its text config)."""
    special = set()
    for cfg in (config, getattr(config, "text_config", None)):
        for attr, value in vars(cfg or object()).items():
            if attr.endswith(("_token_id", "_token_index")) and isinstance(value, int):
                special.add(value)
    return [i for i in range(3, 3 + n + len(special)) if i not in special][:n]


def image_probe(model: nn.Module, token: int, tower: str, projector: str) -> dict:
    """A tiny valid image + text batch for the self-check: ``PROBE_IMAGES`` rows, each 3 text tokens,
    one image's placeholders (as many as the projector yields per image), 2 text tokens."""
    pixels = _probe_pixels(model, tower)
    n = image_tokens_per_image(model, pixels, projector)
    text = text_ids(model.config, 6)
    rows = [[*text[r : r + 3], *[token] * n, *text[r + 3 : r + 5]] for r in range(PROBE_IMAGES)]
    ids = torch.tensor(rows, device=pixels["pixel_values"].device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **pixels}


def auto_probe(model: nn.Module) -> dict | None:
    """The probe input the automatic adapter of ``model``'s structure builds (images with as many
    placeholders as the projector yields, for LLaVA-style models), for a hand table's ``probe``:
    ``Adapter(..., probe=auto_probe)``. None when the model has no image modality."""
    return auto_adapter(model).probe_inputs(model) if _has_image(model) else None


def _has_image(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and getattr(config, MODALITIES["image"].config_attr, None) is not None
