"""Edits: what a run writes at a hook point.

Three kinds, all applied by the one hook layer in :mod:`mmlens.core.wrapper`:

- :func:`replace` sets the selected part of the activation to a value,
- :func:`add` adds a value to the selected part,
- :func:`apply` calls ``fn(activation, ctx) -> activation`` for arbitrary edits.

``at`` takes any position selector of :class:`mmlens.ModalitySpans` (``"image"``, ``"last_text"``,
ints, slices, masks) on points that index the fused sequence, and ints/lists/slices on encoder
points, along the point's position axis (``HookPoint.axes``: ``pos`` of ``[batch, pos, d]``, or
``item`` of ``[items, d]``, e.g. a GNN's nodes); a point without one refuses ``at``. ``heads`` selects heads of per-head points (``z``). A value may have the activation's full
shape (then the selected entries are copied from it bit for bit, the clean-patching case), or any
shape that broadcasts to the selected entries ``[n_selected, ...]`` / ``[batch, n_per_row, ...]``.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from mmlens.core.spans import Selector


@dataclass(frozen=True)
class HookContext:
    """What an edit function sees besides the activation."""

    hook: Any  # the HookPoint
    spans: Any  # the ModalitySpans of the run (None when unknown)


@dataclass(frozen=True)
class Where:
    """Where an intervention acts: a hook point, positions ``at`` (any span selector; None: all) and
    heads ``heads`` (an int or a sequence of them, per-head points only; None: all). Edits, path
    patching's components and circuit nodes are all places of this kind; :func:`selection_mask`
    turns one into a mask over an activation."""

    hook: str
    at: Selector = None
    heads: int | list[int] | tuple[int, ...] | None = None


@dataclass(frozen=True)
class Edit:
    hook: str
    op: Literal["replace", "add", "apply"]
    value: Any
    at: Selector = None
    heads: int | list[int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.hook, str):
            raise TypeError(f"an edit's hook must be a hook point name (str), got {type(self.hook).__name__}")
        if self.op == "apply":
            _check_edit_function(self.hook, self.value)
        else:
            _check_edit_value(self.hook, self.op, self.value)

    @property
    def where(self) -> Where:
        """The place this edit writes."""
        return Where(self.hook, self.at, self.heads)


def _check_edit_value(hook: str, op: str, value: Any) -> None:
    """A replace/add value is a tensor or a real number, with finite entries."""
    if isinstance(value, bool) or not isinstance(value, (Tensor, numbers.Real)):
        raise TypeError(
            f"mmlens.{op}({hook!r}, ...) takes a tensor or a number as its value, got {type(value).__name__} "
            f"{value!r:.40}; to zero the point use mmlens.ablate({hook!r}), for other edits mmlens.apply"
        )
    if isinstance(value, Tensor):
        finite = bool(torch.isfinite(value).all()) if value.is_floating_point() else True
    else:
        finite = math.isfinite(float(value))
    if not finite:
        raise ValueError(f"mmlens.{op}({hook!r}, ...) got a value with NaN or Inf entries; edits must be finite")


def _check_edit_function(hook: str, fn: Any) -> None:
    """An apply function takes ``(activation, ctx)``."""
    if not callable(fn):
        raise TypeError(f"mmlens.apply({hook!r}, fn) needs a function fn(activation, ctx), got {type(fn).__name__}")
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        raise TypeError(
            f"mmlens.apply({hook!r}, fn): fn must accept two arguments (activation, ctx) - the tensor at the point "
            "and a HookContext with .hook and .spans - and return the new tensor; write e.g. lambda act, ctx: act * 2"
        ) from None
    except ValueError:
        return  # a builtin without a signature: trust it


def replace(hook: str, value: Tensor | float, at: Selector = None, heads: int | list[int] | None = None) -> Edit:
    """Set the activation at ``hook`` (restricted to positions ``at`` and heads ``heads``) to ``value``."""
    return Edit(hook, "replace", value, at, heads)


def add(hook: str, delta: Tensor | float, at: Selector = None, heads: int | list[int] | None = None) -> Edit:
    """Add ``delta`` to the activation at ``hook`` (restricted to ``at`` / ``heads``)."""
    return Edit(hook, "add", delta, at, heads)


def apply(hook: str, fn: Callable[[Tensor, HookContext], Tensor]) -> Edit:
    """Replace the activation at ``hook`` by ``fn(activation, ctx)``; ``fn`` must return a tensor of the same shape."""
    return Edit(hook, "apply", fn)


def ablate(hook: str, at: Selector = None, heads: int | list[int] | None = None) -> Edit:
    """Zero-ablate the activation at ``hook`` (restricted to ``at`` / ``heads``)."""
    return Edit(hook, "replace", 0.0, at, heads)


def apply_edit(edit: Edit, act: Tensor, ctx: HookContext, position_mask: Callable[[Selector], Tensor]) -> Tensor:
    """Return the edited activation (a new tensor; ``act`` is not modified in place)."""
    if edit.op == "apply":
        out = edit.value(act, ctx)
        if not isinstance(out, Tensor) or out.shape != act.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"edit function at {edit.hook!r} returned {got}; it must return a tensor of shape {tuple(act.shape)}"
            )
        return out
    value = torch.as_tensor(edit.value, dtype=act.dtype, device=act.device)
    mask = selection_mask(edit.where, act, ctx.hook, position_mask)
    if mask is None:
        try:
            if edit.op == "replace":
                return value.expand_as(act) if value.shape != act.shape else value
            return act + value
        except RuntimeError as err:
            raise ValueError(
                f"edit at {edit.hook!r}: value of shape {tuple(value.shape)} does not broadcast to the "
                f"activation's shape {tuple(act.shape)}"
            ) from err
    if value.shape == act.shape:
        if edit.op == "replace":
            return where_selected(mask, value, act)
        value = value[mask]
    out = act.clone()
    selected = out[mask]
    try:
        value = _fit(value, selected.shape, mask)
    except RuntimeError as err:
        raise ValueError(
            f"edit at {edit.hook!r}: value of shape {tuple(value.shape)} does not fit the {tuple(selected.shape)} "
            f"selected entries (pass the full activation shape {tuple(act.shape)}, or one that broadcasts)"
        ) from err
    out[mask] = value if edit.op == "replace" else selected + value
    return out


def _fit(value: Tensor, selected_shape: torch.Size, mask: Tensor) -> Tensor:
    if value.dim() >= 2 and value.shape[0] == mask.shape[0] and value.dim() == len(selected_shape) + 1:
        value = value.reshape(-1, *value.shape[2:])
    return value.expand(selected_shape)


def selection_mask(where: Where, act: Tensor, hook: Any, position_mask: Callable[[Selector], Tensor]) -> Tensor | None:
    """The one (positions x heads) mask builder: Bool over the leading axes of ``act`` that
    ``where`` selects (the point's ``axes``: [batch, pos] or [items]; with ``where.heads``, the
    head axis after them), or None for all.

    Args:
        hook: the HookPoint of ``act`` (its ``axes`` name the leading axes; ``heads`` says whether
            it has a head axis).
        position_mask: selector -> Bool over those leading axes (span selectors need the run's spans).
    """
    if where.heads is not None and hook.heads is None:
        raise ValueError(f"heads= was given for {where.hook!r}, which is not a per-head point; use its '.z' point")
    if where.at is None and where.heads is None:
        return None
    axes = tuple(getattr(hook, "axes", ("batch", "pos")))
    lead = act.shape[: len(axes)]
    if where.at is not None:
        check_positions(where.hook, axes, act)
    pos = position_mask(where.at) if where.at is not None else torch.ones(lead, dtype=torch.bool, device=act.device)
    if pos.shape != lead:
        raise ValueError(
            f"position mask {tuple(pos.shape)} does not match {where.hook!r} of shape {tuple(act.shape)} "
            f"(leading axes {axes})"
        )
    if where.heads is None:
        return pos
    heads = [where.heads] if isinstance(where.heads, int) else list(where.heads)
    head_mask = torch.zeros(act.shape[len(axes)], dtype=torch.bool, device=act.device)
    try:
        head_mask[heads] = True
    except IndexError as err:
        raise IndexError(f"heads {heads} out of range for {act.shape[len(axes)]} heads at {where.hook!r}") from err
    return pos[..., None] & head_mask


def check_positions(hook: str, axes: tuple[str, ...], act: Tensor) -> None:
    """Raise when position selectors make no sense for a value with leading ``axes``: it has no
    position axis, or it lacks a feature axis after them (a 2-D value declared [batch, pos])."""
    layout = f"[{', '.join(axes)}, ...]"
    if "pos" not in axes and "item" not in axes:
        raise ValueError(
            f"{hook!r} is laid out {layout} with no position axis (shape {tuple(act.shape)}), so at= selects "
            "nothing meaningful; drop at= (or edit it with mmlens.apply)"
        )
    if act.dim() <= len(axes):
        raise ValueError(
            f"{hook!r} has shape {tuple(act.shape)}, which leaves no feature axis after its declared axes {layout}; "
            "at= would select feature channels. Declare the point's axes in its adapter (Stack/Point axes=ITEMS "
            "for [items, d], BATCH for [batch, features])"
        )


def where_selected(mask: Tensor | None, new: Tensor, old: Tensor) -> Tensor:
    """``new`` where ``mask`` (from :func:`selection_mask`; None: everywhere) is set, ``old`` elsewhere."""
    if mask is None:
        return new
    return torch.where(mask.view(*mask.shape, *([1] * (old.dim() - mask.dim()))), new, old)
