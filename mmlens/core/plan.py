"""The plan of one run: which hook points a forward records and edits, as module hooks.

:class:`Plan` turns a run's request (names to cache, edits by hook point) into one handler per
(module, input/output) event; :class:`RunResult` is what a run returns. Both backends (PyTorch
module hooks in :mod:`mmlens.core.wrapper`, nnsight in :mod:`mmlens.core.backends`) use them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from mmlens.core.adapter import Adapter, HookPoint, Site, get_module
from mmlens.core.cache import ActivationCache
from mmlens.core.edits import Edit, HookContext, apply_edit
from mmlens.core.spans import ModalitySpans, Selector, as_positions

CacheFilter = None | bool | str | list | tuple | Callable[[str], bool]


@dataclass
class RunResult:
    """What :meth:`HookedModel.run` returns.

    Attributes:
        output: the model's own output object.
        logits: ``output.logits`` (or the output itself when it is a tensor).
        cache: recorded activations.
        spans: modality spans of the inputs.
    """

    output: Any
    logits: Tensor
    cache: ActivationCache
    spans: ModalitySpans | None


class Hookable(Protocol):
    """What a plan reads from the wrapped model (a :class:`mmlens.HookedModel`)."""

    model: nn.Module
    adapter: Adapter
    hook_points: Mapping[str, HookPoint]


class Plan:
    """The hooks of one run: one handler per (module, input/output), applying its points in order."""

    def __init__(
        self,
        hm: Hookable,
        spans: ModalitySpans | None,
        cache_names: set[str],
        edits: dict[str, list[Edit]],
        store: dict[str, Tensor],
        fired: set[str],
        keep_grad: bool,
    ):
        self.hm, self.spans, self.store, self.fired, self.keep_grad = hm, spans, store, fired, keep_grad
        self.edits = edits
        self.cache_names = cache_names
        self.mid: dict[str, Tensor] = {}
        self.mlp_out: dict[str, Tensor] = {}

    def events(self) -> dict[tuple[str, str], list]:
        """The actions of each (module path, "input"/"output") event, in the order they apply."""
        actions: dict[tuple[str, str], list] = defaultdict(list)
        for name in dict.fromkeys([*self.cache_names, *self.edits]):
            hp = self.hm.hook_points[name]
            actions[(hp.site.module, hp.site.io)].append(("point", hp))
        for name in self.edits:
            hp = self.hm.hook_points[name]
            if hp.kind == "resid_mid":
                actions[(hp.mlp, "output")].append(("stash_mlp", hp.block))
                actions[(hp.block, "output")].insert(0, ("fix_block", hp.block))
        return actions

    def install(self) -> list:
        """Register one hook per event. Hooks are prepended so that they run before transformers'
        own output-capturing hooks (which e.g. record LLaVA's vision hidden states for the projector)."""
        handles = []
        try:
            for (module_path, io), acts in self.events().items():
                module = get_module(self.hm.model, module_path, self.hm.adapter.name)
                if io == "output":
                    handles.append(module.register_forward_hook(self._output_hook(acts), prepend=True))
                else:
                    handles.append(
                        module.register_forward_pre_hook(self._input_hook(acts), with_kwargs=True, prepend=True)
                    )
        except BaseException:
            for h in handles:
                h.remove()
            raise
        return handles

    def _process(self, hp: HookPoint, value: Tensor) -> Tensor:
        self.fired.add(hp.name)
        act = value.unflatten(-1, (hp.heads, -1)) if hp.heads else value
        edits = self.edits.get(hp.name, ())
        if edits:
            ctx = HookContext(hook=hp, spans=self.spans)
            for e in edits:
                act = apply_edit(e, act, ctx, lambda sel, hp=hp, act=act: self._position_mask(hp, sel, act))
        leaf = False
        if hp.name in self.cache_names:
            if self.keep_grad and not act.requires_grad and act.is_floating_point() and torch.is_grad_enabled():
                act, leaf = act.detach().requires_grad_(True), True  # a frozen model: gradients start here
            self.store[hp.name] = act if self.keep_grad else act.detach()
        if hp.kind == "resid_mid" and hp.block and edits:
            self.mid[hp.block] = act
        if not edits and not leaf:
            return value
        return act.flatten(-2) if hp.heads else act

    def _position_mask(self, hp: HookPoint, selector: Selector, act: Tensor) -> Tensor:
        if hp.fused_positions:
            if self.spans is None:
                raise ValueError(f"position selector {selector!r} at {hp.name!r} needs the run's inputs to find spans")
            mask = self.spans.mask(selector)
            if mask.shape != act.shape[:2]:
                raise ValueError(
                    f"spans cover [batch, seq] = {tuple(mask.shape)} but {hp.name!r} has shape "
                    f"{tuple(act.shape)} (generation with a KV cache? patch by explicit positions)"
                )
            return mask.to(act.device)
        if isinstance(selector, str):
            raise ValueError(  # noqa: TRY004 - a valid selector type, but not for this point
                f"{hp.name!r} is inside the {hp.modality or hp.stage} encoder, whose positions are its own "
                f"tokens, so span {selector!r} does not apply; select positions by index"
            )
        lead = act.shape[: len(hp.axes)]  # position axis last: [batch, pos] or [items]
        if isinstance(selector, Tensor) and selector.dtype == torch.bool:
            return selector.to(act.device).expand(lead)
        mask = torch.zeros(lead, dtype=torch.bool, device=act.device)
        mask[..., as_positions(selector, lead[-1]).to(act.device)] = True
        return mask

    def _output_hook(self, actions: list):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            is_tuple = isinstance(output, tuple)
            index = next((hp.site.index for kind, hp in actions if kind == "point"), 0) if is_tuple else 0
            value = output[index] if is_tuple else output
            original = value
            for kind, arg in actions:
                if kind == "point":
                    value = self._process(arg, value)
                elif kind == "stash_mlp":
                    self.mlp_out[arg] = value
                elif kind == "fix_block":
                    value = self.mid.pop(arg) + self.mlp_out.pop(arg)
            if value is original:
                return None
            return (*output[:index], value, *output[index + 1 :]) if is_tuple else value

        return hook

    def _input_hook(self, actions: list):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            changed = False
            for _, hp in actions:
                site: Site = hp.site
                by_kw = site.kwarg is not None and site.kwarg in kwargs
                if not by_kw and len(args) <= site.index:
                    raise RuntimeError(
                        f"{hp.name!r}: module {site.module!r} was called without input "
                        f"{site.kwarg or site.index!r}; fix the adapter's Site"
                    )
                value = kwargs[site.kwarg] if by_kw else args[site.index]
                new = self._process(hp, value)
                if new is not value:
                    changed = True
                    if by_kw:
                        kwargs = {**kwargs, site.kwarg: new}
                    else:
                        args = (*args[: site.index], new, *args[site.index + 1 :])
            return (args, kwargs) if changed else None

        return hook
