"""HookedModel: the one hook layer every analysis uses.

``HookedModel`` wraps any supported torch model (found by its adapter table) and runs it with
named hook points that can be read (cached) and written (edited) in the same forward. Hooks are
plain PyTorch module hooks, installed for one run only and always removed, also when the forward
raises; a run with no edit returns the plain model's output bit for bit.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch
from torch import Tensor, nn

from mmlens.core.adapter import Adapter, HookPoint, Site, get_module
from mmlens.core.cache import ActivationCache, nearest_names, unknown_hook_error
from mmlens.core.edits import Edit, HookContext, apply_edit
from mmlens.core.spans import ModalitySpans, Selector, _as_positions

CacheFilter = Union[None, bool, str, list, tuple, Callable[[str], bool]]


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


@dataclass
class Recording:
    """Filled while a :meth:`HookedModel.hooked` block runs; ``cache`` is complete after it exits."""

    spans: ModalitySpans | None
    cache: ActivationCache | None = None
    fired: set[str] = field(default_factory=set)


class HookedModel:
    """A model with named hook points across encoders, fusion and language model.

    Args:
        model: a torch module with an adapter (see :func:`mmlens.hooks.find_adapter`).
        adapter: the adapter table; found from the model's class when omitted.
        tokenizer / processor: optional, used by :meth:`to_inputs`.
    """

    def __init__(self, model: nn.Module, adapter: Adapter | None = None, *, tokenizer: Any = None, processor: Any = None,
                 name: str | None = None):
        from mmlens.hooks import find_adapter
        from mmlens.core.backends import unwrap_bridge

        model, tokenizer, processor = unwrap_bridge(model, tokenizer, processor)
        if not isinstance(model, nn.Module):
            raise TypeError(f"HookedModel wraps a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.adapter = adapter or find_adapter(model)
        self.tokenizer = tokenizer
        self.processor = processor
        self.name = name or type(model).__name__
        self.hook_points: dict[str, HookPoint] = self.adapter.hook_points(model)

    def __repr__(self) -> str:
        stages = defaultdict(int)
        for hp in self.hook_points.values():
            stages[hp.stage] += 1
        return f"HookedModel({self.name}, adapter={self.adapter.name!r}, hook points={dict(stages)})"

    @property
    def device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    # -- names ---------------------------------------------------------------------------------
    def names(self, pattern: str = "*", *, stage: str | None = None, modality: str | None = None) -> list[str]:
        """Hook point names matching a glob, optionally filtered by stage and modality."""
        return [
            n for n, hp in self.hook_points.items()
            if fnmatch.fnmatchcase(n, pattern) and (stage is None or hp.stage == stage)
            and (modality is None or hp.modality == modality)
        ]

    def resolve(self, name: str) -> HookPoint:
        """The hook point called ``name``; unknown names raise with the nearest valid names."""
        if name in self.hook_points:
            return self.hook_points[name]
        from mmlens.core.backends import from_transformer_lens_name

        alias = from_transformer_lens_name(name)
        if alias in self.hook_points:
            return self.hook_points[alias]
        raise unknown_hook_error(name, list(self.hook_points))

    def _select(self, spec: CacheFilter) -> tuple[list[str], set[str]]:
        """Names selected by a cache filter, and the subset named explicitly (must fire)."""
        if spec is None or spec is False:
            return [], set()
        if spec is True or spec == "all":
            return list(self.hook_points), set()
        if callable(spec) and not isinstance(spec, str):
            return [n for n in self.hook_points if spec(n)], set()
        items = [spec] if isinstance(spec, str) else list(spec)
        chosen: dict[str, None] = {}
        explicit: set[str] = set()
        for item in items:
            if not isinstance(item, str):
                raise TypeError(f"cache filter entries must be hook names or globs, got {type(item).__name__}")
            if any(c in item for c in "*?["):
                matched = [n for n in self.hook_points if fnmatch.fnmatchcase(n, item)]
                if not matched:
                    raise KeyError(f"pattern {item!r} matches no hook point; nearest: {nearest_names(item, list(self.hook_points))}")
                chosen.update(dict.fromkeys(matched))
            else:
                name = self.resolve(item).name
                chosen[name] = None
                explicit.add(name)
        return list(chosen), explicit

    def _request(self, cache: CacheFilter, edits: Edit | list[Edit]) -> tuple[list[str], dict[str, list[Edit]], set[str]]:
        """Validate a run's request: (names to cache, edits grouped by hook name, names that must fire)."""
        edits = [edits] if isinstance(edits, Edit) else list(edits)
        for e in edits:
            if not isinstance(e, Edit):
                raise TypeError(f"edits must be made with mmlens.replace/add/apply/ablate, got {type(e).__name__}")
        cache_names, must_fire = self._select(cache)
        edits_by_point: dict[str, list[Edit]] = defaultdict(list)
        for e in edits:
            hp = self.resolve(e.hook)
            edits_by_point[hp.name].append(e)
            must_fire.add(hp.name)
        return cache_names, dict(edits_by_point), must_fire

    # -- inputs ----------------------------------------------------------------------------------
    def check_inputs(self, inputs: Any) -> dict:
        """``inputs`` as a dict on the model's device; raises when it is not a mapping or lacks a key
        the adapter requires."""
        if isinstance(inputs, (str, list)) or not isinstance(inputs, Mapping):
            raise TypeError(
                f"inputs must be a dict of tensors (what a tokenizer/processor returns), got {type(inputs).__name__}; "
                "for text, use hm.to_inputs('your prompt')"
            )
        missing = [k for k in self.adapter.required_inputs if k not in inputs]
        if missing:
            raise KeyError(f"inputs lack {missing} required by adapter {self.adapter.name!r}; got keys {sorted(inputs)}")
        device = self.device
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}

    def to_inputs(self, text: str | list[str], **kwargs: Any) -> dict:
        """Tokenize text (or run the processor with ``images=`` etc.) into model inputs."""
        if self.processor is not None:
            return dict(self.processor(text=text, return_tensors="pt", **kwargs))
        if self.tokenizer is None:
            raise ValueError(f"{self.name} has no tokenizer or processor; pass inputs as a dict of tensors")
        return dict(self.tokenizer(text, return_tensors="pt", padding=isinstance(text, list), **kwargs))

    def rows(self, inputs: Mapping[str, Any], rows: int | slice | Tensor | list[int]) -> dict[str, Any]:
        """The inputs of some rows of a batch (an int ``i`` gives a batch of one); see
        :meth:`Adapter.select_rows`."""
        return self.adapter.select_rows(inputs, rows)

    def repeat(self, inputs: Mapping[str, Any], n: int) -> dict[str, Any]:
        """Inputs of batch 1 repeated to batch ``n``; see :meth:`Adapter.repeat_rows`."""
        return self.adapter.repeat_rows(inputs, n)

    def readout_logits(self, logits: Tensor, inputs: Mapping[str, Any]) -> Tensor:
        """``Float[b, seq, vocab] -> Float[b, vocab]``: the logits at the position the output is read
        from; see :meth:`Adapter.readout_logits`."""
        return self.adapter.readout_logits(logits, inputs)

    def spans(self, inputs: Mapping[str, Any]) -> ModalitySpans:
        """Modality spans of ``inputs`` as the adapter finds them."""
        return self.adapter.spans(self.model, self.check_inputs(inputs))

    def neutral(self, inputs: Mapping[str, Any], modality: str) -> dict:
        """``inputs`` with ``modality`` replaced by the adapter's neutral reference."""
        if modality not in self.adapter.neutral:
            raise KeyError(f"adapter {self.adapter.name!r} has no neutral reference for {modality!r}; "
                           f"it has: {sorted(self.adapter.neutral)}")
        inputs = self.check_inputs(inputs)
        return self.adapter.neutral[modality](self.model, dict(inputs), self.adapter.spans(self.model, inputs))

    # -- running -----------------------------------------------------------------------------------
    @contextmanager
    def hooked(self, inputs: Mapping[str, Any] | None = None, *, cache: CacheFilter = None, edits: Edit | list[Edit] = (),
               keep_grad: bool = False) -> Iterator[Recording]:
        """Install hooks for the forward passes run inside the block, then remove them.

        ``inputs`` (optional) gives the modality spans that position selectors refer to.
        """
        cache_names, edits_by_point, must_fire = self._request(cache, edits)
        spans = self.adapter.spans(self.model, self.check_inputs(inputs)) if inputs is not None else None
        recording = Recording(spans=spans)
        store: dict[str, Tensor] = {}
        plan = _Plan(self, spans, set(cache_names), edits_by_point, store, recording.fired, keep_grad)
        handles = plan.install()
        try:
            yield recording
        finally:
            for h in handles:
                h.remove()
        never = sorted(must_fire - recording.fired)
        if never:
            raise RuntimeError(
                f"hook points {never} were never reached in this forward (their modules did not run: "
                "is that modality's input missing?)"
            )
        recording.cache = ActivationCache(store, self.hook_points, spans)

    def run(self, inputs: Mapping[str, Any], *, cache: CacheFilter = None, edits: Edit | list[Edit] = (),
            grad: bool = False, keep_grad: bool = False, backend: str = "torch", **forward_kwargs: Any) -> RunResult:
        """One forward pass with hook points cached and/or edited.

        Args:
            inputs: model inputs (dict of tensors).
            cache: which hook points to record: a name, a glob (``"lm.blocks.*.resid_post"``),
                a list of them, ``True`` for all, or a predicate on names.
            edits: edits made with :func:`mmlens.replace`, :func:`mmlens.add`, :func:`mmlens.apply`.
            grad: run with autograd enabled (default: ``torch.no_grad``).
            keep_grad: record activations attached to the graph (implies ``grad``).
            backend: ``"torch"`` (PyTorch module hooks, the default) or ``"nnsight"`` (the same hook
                points and edits inside an ``nnsight`` trace; see the README on when to use which).
        """
        inputs = self.check_inputs(inputs)
        if backend == "nnsight":
            from mmlens.core.backends import run_with_nnsight

            return run_with_nnsight(self, inputs, cache=cache, edits=edits, grad=grad or keep_grad, keep_grad=keep_grad,
                                    **forward_kwargs)
        if backend != "torch":
            raise ValueError(f"unknown backend {backend!r}; use 'torch' or 'nnsight'")
        with torch.set_grad_enabled(grad or keep_grad):
            with self.hooked(inputs, cache=cache, edits=edits, keep_grad=keep_grad) as rec:
                output = self.model(**inputs, **forward_kwargs)
        logits = output if isinstance(output, Tensor) else output.logits
        return RunResult(output=output, logits=logits, cache=rec.cache, spans=rec.spans)

    def __call__(self, inputs: Mapping[str, Any], **kwargs: Any) -> RunResult:
        return self.run(inputs, **kwargs)


class _Plan:
    """The hooks of one run: one handler per (module, input/output), applying its points in order."""

    def __init__(self, hm: HookedModel, spans: ModalitySpans | None, cache_names: set[str],
                 edits: dict[str, list[Edit]], store: dict[str, Tensor], fired: set[str], keep_grad: bool):
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
                    handles.append(module.register_forward_pre_hook(self._input_hook(acts), with_kwargs=True, prepend=True))
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
        if hp.name in self.cache_names:
            self.store[hp.name] = act if self.keep_grad else act.detach()
        if hp.kind == "resid_mid" and hp.block and edits:
            self.mid[hp.block] = act
        if not edits:
            return value
        return act.flatten(-2) if hp.heads else act

    def _position_mask(self, hp: HookPoint, selector: Selector, act: Tensor) -> Tensor:
        if hp.fused_positions:
            if self.spans is None:
                raise ValueError(f"position selector {selector!r} at {hp.name!r} needs the run's inputs to find spans")
            mask = self.spans.mask(selector)
            if mask.shape != act.shape[:2]:
                raise ValueError(f"spans cover [batch, seq] = {tuple(mask.shape)} but {hp.name!r} has shape "
                                 f"{tuple(act.shape)} (generation with a KV cache? patch by explicit positions)")
            return mask.to(act.device)
        if isinstance(selector, str):
            raise ValueError(f"{hp.name!r} is inside the {hp.modality or hp.stage} encoder, whose positions are its own "
                             f"tokens, so span {selector!r} does not apply; select positions by index")
        if isinstance(selector, Tensor) and selector.dtype == torch.bool:
            return selector.to(act.device).expand(act.shape[:2])
        mask = torch.zeros(act.shape[:2], dtype=torch.bool, device=act.device)
        mask[:, _as_positions(selector, act.shape[1]).to(act.device)] = True
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
            return (*output[:index], value, *output[index + 1:]) if is_tuple else value

        return hook

    def _input_hook(self, actions: list):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            changed = False
            for _, hp in actions:
                site: Site = hp.site
                by_kw = site.kwarg is not None and site.kwarg in kwargs
                if not by_kw and len(args) <= site.index:
                    raise RuntimeError(f"{hp.name!r}: module {site.module!r} was called without input "
                                       f"{site.kwarg or site.index!r}; fix the adapter's Site")
                value = kwargs[site.kwarg] if by_kw else args[site.index]
                new = self._process(hp, value)
                if new is not value:
                    changed = True
                    if by_kw:
                        kwargs = {**kwargs, site.kwarg: new}
                    else:
                        args = (*args[: site.index], new, *args[site.index + 1:])
            return (args, kwargs) if changed else None

        return hook
