"""Input checks: every bad input to a wrapped model raises naming the key, the value and the fix.

:func:`check_model_inputs` is what :meth:`mmlens.core.wrapper.HookedModel.check_inputs` runs before
any forward: a mapping of tensors; the keys the adapter requires present; no key the model's
``forward`` does not take (a typo like ``pixel_value`` would otherwise run the model without that
input); finite floating values (NaN/Inf raise unless the wrapper was made with
``allow_nonfinite=True``); token ids that are integers inside the embedding table; values inside
the ranges the adapter declares (normalised pixels, not raw 0-255); attention masks with at least
one real position per row. :func:`check_forward_kwargs` does the same for extra keyword arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mmlens.core.adapter import Adapter
from mmlens.core.names import nearest_names

MASK_KEY = "attention_mask"


def forward_parameters(model: nn.Module) -> set[str] | None:
    """The named parameters of ``model.forward`` (None when it takes only ``*args``/``**kwargs``)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named or None


def check_model_inputs(model: nn.Module, adapter: Adapter, inputs: Any, *, allow_nonfinite: bool = False) -> None:
    """Raise for any bad input (see the module docstring); returns nothing when all is well."""
    if isinstance(inputs, (str, list)) or not isinstance(inputs, Mapping):
        raise TypeError(
            f"inputs must be a dict of tensors (what a tokenizer/processor returns), got {type(inputs).__name__}; "
            "for text, use hm.to_inputs('your prompt')"
        )
    known = _known_keys(model, adapter)
    missing = [k for k in adapter.required_inputs if k not in inputs]
    if missing:
        hints = {k: nearest_names(k, list(inputs)) for k in missing}
        raise KeyError(
            f"inputs lack {missing} required by adapter {adapter.name!r}; got keys {sorted(inputs)}"
            + "".join(f"; for {k!r} did you mean {v}?" for k, v in hints.items() if v)
        )
    for key, value in inputs.items():
        if known is not None and key not in known:
            raise KeyError(
                f"input {key!r} is not an input of {type(model).__name__} (the model would run without it); "
                f"nearest valid names: {nearest_names(key, sorted(known))}. Rename the key"
            )
        if isinstance(value, Tensor):
            _check_tensor(model, adapter, inputs, key, value, allow_nonfinite)


def check_forward_kwargs(model: nn.Module, adapter: Adapter, kwargs: Mapping[str, Any]) -> None:
    """Extra keyword arguments of a run must be named parameters of the model's forward."""
    known = _known_keys(model, adapter)
    for key in kwargs:
        if known is not None and key not in known:
            raise TypeError(
                f"run() got an unknown keyword argument {key!r}: it is neither an option of HookedModel.run (cache, "
                f"edits, grad, keep_grad, backend) nor a parameter of {type(model).__name__}.forward; nearest: "
                f"{nearest_names(key, sorted(known) + ['cache', 'edits', 'grad', 'keep_grad', 'backend'])}"
            )


def _known_keys(model: nn.Module, adapter: Adapter) -> set[str] | None:
    named = forward_parameters(model)
    if named is None:
        return None
    declared = {*adapter.required_inputs, *adapter.shared_inputs, *adapter.index_inputs, *adapter.input_ranges}
    declared |= {k for keys in adapter.modality_inputs.values() for k in keys}
    return named | declared


def _check_tensor(
    model: nn.Module, adapter: Adapter, inputs: Mapping[str, Any], key: str, value: Tensor, allow_nonfinite: bool
) -> None:
    if value.is_floating_point() and not allow_nonfinite:
        bad = ~torch.isfinite(value)
        if bad.any():
            raise ValueError(
                f"input {key!r} has {int(bad.sum())} non-finite value(s) (NaN or Inf) of {value.numel()}; the outputs "
                "would be NaN. Fix the input, or wrap with mmlens.wrap(model, allow_nonfinite=True) to allow them"
            )
    if key in adapter.index_inputs:
        _check_indices(key, value, adapter.index_inputs[key](model, inputs), type(model).__name__)
    if key in adapter.input_ranges:
        _check_range(key, value, adapter.input_ranges[key])
    if key == MASK_KEY and value.dim() == 2 and value.numel() and not value.bool().any(1).all():
        rows = (~value.bool().any(1)).nonzero().flatten().tolist()
        raise ValueError(
            f"{MASK_KEY} rows {rows} are all zeros: those rows have no real position, so 'last' and every span are "
            "empty there. Drop the rows or fix the mask"
        )


def _check_indices(key: str, ids: Tensor, size: int | None, owner: str) -> None:
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"input {key!r} holds indices and must be an integer tensor, got {ids.dtype}; use .long()")
    if ids.numel() == 0 or size is None:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= size:
        raise ValueError(
            f"input {key!r} has values in [{low}, {high}] but must index a table of {size} entries of {owner} "
            f"(0..{size - 1}); negative indices are not allowed (they would silently pick rows from the end). Token ids "
            "come from this model's own tokenizer; node ids index the given node features"
        )


def _check_range(key: str, value: Tensor, bounds: tuple[float, float]) -> None:
    if not value.is_floating_point():
        raise TypeError(
            f"input {key!r} must be floating point (normalised by the model's processor), got {value.dtype}; "
            "pass the processor's output, not raw integer pixels"
        )
    finite = value[torch.isfinite(value)]
    if finite.numel() and (finite.min() < bounds[0] or finite.max() > bounds[1]):
        raise ValueError(
            f"input {key!r} ranges over [{float(finite.min()):.3g}, {float(finite.max()):.3g}], outside "
            f"[{bounds[0]}, {bounds[1]}] where the processor's normalised values lie (raw 0-255 pixels?); pass the "
            "processor's output"
        )


def check_count(name: str, value: Any, low: int = 1, high: int | None = None, hint: str = "") -> int:
    """An integer argument in ``[low, high]``; raises naming the argument, the value and the range.

    >>> check_count("batch_size", 8)
    8
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}" + (f"; {hint}" if hint else ""))
    return value
