"""HookedModel: the one hook layer every analysis uses.

``HookedModel`` wraps any supported torch model (found by its adapter table) and runs it with
named hook points that can be read (cached) and written (edited) in the same forward. Hooks are
plain PyTorch module hooks, installed for one run only and always removed, also when the forward
raises; a run with no edit returns the plain model's output bit for bit.
"""

from __future__ import annotations

import fnmatch
from collections import OrderedDict, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mmlens.core.adapter import Adapter, HookPoint, find_adapter
from mmlens.core.backends import run_with_nnsight, unwrap_bridge
from mmlens.core.cache import ActivationCache
from mmlens.core.edits import Edit
from mmlens.core.inputs import check_forward_kwargs, check_model_inputs
from mmlens.core.names import from_transformer_lens_name, nearest_names, unknown_hook_error
from mmlens.core.plan import CacheFilter, Plan, RunResult
from mmlens.core.selfcheck import CheckReport, check_adapter
from mmlens.core.spans import ModalitySpans


@dataclass
class Recording:
    """Filled while a :meth:`HookedModel.hooked` block runs; ``cache`` is complete after it exits."""

    spans: ModalitySpans | None
    cache: ActivationCache | None = None
    fired: set[str] = field(default_factory=set)


class HookedModel:
    """A model with named hook points across encoders, fusion and language model.

    Args:
        model: a torch module with an adapter (see :func:`mmlens.core.adapter.find_adapter`).
        adapter: the adapter table; found from the model's class when omitted.
        tokenizer / processor: optional, used by :meth:`to_inputs`.
        allow_nonfinite: accept NaN/Inf in floating inputs (by default they raise, naming the input).
        check: the wrap-time self-check (:func:`mmlens.core.selfcheck.check_adapter`, once per model
            class and adapter): ``True`` checks on the adapter's probe input, a dict of inputs checks on
            those, ``False`` skips it. Its report is ``self.check_report`` (None when skipped).
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter | None = None,
        *,
        tokenizer: Any = None,
        processor: Any = None,
        name: str | None = None,
        allow_nonfinite: bool = False,
        check: bool | Mapping[str, Any] = True,
    ):
        model, tokenizer, processor = unwrap_bridge(model, tokenizer, processor)
        if not isinstance(model, nn.Module):
            raise TypeError(f"HookedModel wraps a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.adapter = adapter or find_adapter(model)
        self.tokenizer = tokenizer
        self.processor = processor
        self.name = name or type(model).__name__
        self.allow_nonfinite = allow_nonfinite
        self._checked: OrderedDict[tuple, tuple] = OrderedDict()  # inputs already checked, by identity
        self._hooking = False
        self.hook_points: dict[str, HookPoint] = self.adapter.hook_points(model)
        self.check_report: CheckReport | None = None
        if check is not False:
            self.check_report = check_adapter(self, None if check is True else check)

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
            n
            for n, hp in self.hook_points.items()
            if fnmatch.fnmatchcase(n, pattern)
            and (stage is None or hp.stage == stage)
            and (modality is None or hp.modality == modality)
        ]

    def resolve(self, name: str) -> HookPoint:
        """The hook point called ``name``; unknown names raise with the nearest valid names."""
        if name in self.hook_points:
            return self.hook_points[name]
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
                    raise KeyError(
                        f"pattern {item!r} matches no hook point; nearest: {nearest_names(item, list(self.hook_points))}"
                    )
                chosen.update(dict.fromkeys(matched))
            else:
                name = self.resolve(item).name
                chosen[name] = None
                explicit.add(name)
        return list(chosen), explicit

    def _request(
        self, cache: CacheFilter, edits: Edit | list[Edit]
    ) -> tuple[list[str], dict[str, list[Edit]], set[str]]:
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
        """``inputs`` as a dict on the model's device; raises for any bad input, naming the key, the
        value and the fix (:func:`mmlens.core.inputs.check_model_inputs`)."""
        key = _identity(inputs, self.allow_nonfinite) if isinstance(inputs, Mapping) else None
        if key is None or key not in self._checked:
            check_model_inputs(self.model, self.adapter, inputs, allow_nonfinite=self.allow_nonfinite)
        if key is not None:
            self._checked[key] = tuple(inputs.values())  # holds the objects, so their ids are not reused
            self._checked.move_to_end(key)
            while len(self._checked) > _CHECKED_SIZE:
                self._checked.popitem(last=False)
        device = self.device
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}

    def to_inputs(self, text: str | list[str], **kwargs: Any) -> dict:
        """Tokenize text (or run the processor with ``images=`` etc.) into model inputs."""
        if self.processor is not None:
            return dict(self.processor(text=text, return_tensors="pt", **kwargs))
        if self.tokenizer is None:
            raise ValueError(f"{self.name} has no tokenizer or processor; pass inputs as a dict of tensors")
        return dict(self.tokenizer(text, return_tensors="pt", padding=isinstance(text, list), **kwargs))

    @property
    def text_tokenizer(self) -> Any:
        """The tokenizer (given, or the processor's), or ``None``: the one place mmlens looks it up."""
        return self.tokenizer if self.tokenizer is not None else getattr(self.processor, "tokenizer", None)

    def require_tokenizer(self, purpose: str) -> Any:
        """:attr:`text_tokenizer`, raising with how to supply one when there is none."""
        if self.text_tokenizer is None:
            raise ValueError(
                f"{purpose} need(s) {self.name}'s tokenizer: wrap the model with "
                "mmlens.wrap(model, tokenizer=...) (or processor=...)"
            )
        return self.text_tokenizer

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each token id decoded on its own (the id as text when there is no tokenizer)."""
        tokenizer = self.text_tokenizer
        return [tokenizer.decode([i]) for i in ids] if tokenizer is not None else [str(i) for i in ids]

    def rows(self, inputs: Mapping[str, Any], rows: int | slice | Tensor | list[int]) -> dict[str, Any]:
        """The inputs of some rows of a batch (an int ``i`` gives a batch of one); see
        :meth:`Adapter.select_rows`."""
        return self.adapter.select_rows(inputs, rows)

    def repeat(self, inputs: Mapping[str, Any], n: int) -> dict[str, Any]:
        """Inputs of batch 1 repeated to batch ``n``; see :meth:`Adapter.repeat_rows`."""
        return self.adapter.repeat_rows(inputs, n)

    def join(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """One batch of several inputs, in order; see :meth:`Adapter.join_rows`."""
        return self.adapter.join_rows(rows)

    def readout_logits(
        self, logits: Tensor, inputs: Mapping[str, Any] | None = None, *, spans: ModalitySpans | None = None
    ) -> Tensor:
        """``Float[b, seq, vocab] -> Float[b, vocab]``: the logits at the position the output is read
        from, found from the spans of the fused sequence (``spans``, else those of ``inputs``); the one
        readout every method uses. See :meth:`Adapter.readout_logits`."""
        if spans is None:
            if inputs is None:
                raise ValueError("readout_logits needs the run's inputs or spans to find the readout position")
            spans = self.spans(inputs)
        return self.adapter.readout_logits(logits, spans)

    def position_labels(self, inputs: Mapping[str, Any], spans: ModalitySpans | None = None) -> list[list[str]]:
        """Per row, one label per position of the fused sequence: the decoded token at text and
        padding positions, ``"<image 3>"`` (the modality and its position's index within that
        modality's span of the row) at soft positions, ``"<pad>"`` at padding without a token id."""
        spans = self.spans(inputs) if spans is None else spans
        ids = self.adapter.position_token_ids(inputs, spans)
        labels = []
        for row, modalities in zip(ids.tolist(), spans.modality_of_positions()):
            known = [i for i in row if i >= 0]
            decoded = iter(self.token_strings(known) if known else [])
            seen: dict[str, int] = defaultdict(int)
            out = []
            for i, m in zip(row, modalities):
                if i >= 0:
                    out.append(next(decoded))
                    continue
                out.append("<pad>" if m == "pad" else f"<{m} {seen[m]}>")
                seen[m] += 1
            labels.append(out)
        return labels

    def readout_mask(self, spans: ModalitySpans) -> Tensor:
        """Bool[b, seq]: the positions the output is read from (the last real one, or every real one
        for pooling heads); see :meth:`Adapter.readout_mask`."""
        return self.adapter.readout_mask(spans)

    def spans(self, inputs: Mapping[str, Any]) -> ModalitySpans:
        """Modality spans of ``inputs`` as the adapter finds them."""
        return self.adapter.spans(self.model, self.check_inputs(inputs))

    def neutral(self, inputs: Mapping[str, Any], modality: str) -> dict:
        """``inputs`` with ``modality`` replaced by the adapter's neutral reference."""
        if modality not in self.adapter.neutral:
            raise KeyError(
                f"adapter {self.adapter.name!r} has no neutral reference for {modality!r}; "
                f"it has: {sorted(self.adapter.neutral)}"
            )
        inputs = self.check_inputs(inputs)
        return self.adapter.neutral[modality](self.model, dict(inputs), self.adapter.spans(self.model, inputs))

    # -- running -----------------------------------------------------------------------------------
    @contextmanager
    def hooked(
        self,
        inputs: Mapping[str, Any] | None = None,
        *,
        cache: CacheFilter = None,
        edits: Edit | list[Edit] = (),
        keep_grad: bool = False,
    ) -> Iterator[Recording]:
        """Install hooks for the forward passes run inside the block, then remove them.

        ``inputs`` (optional) gives the modality spans that position selectors refer to.
        """
        if self._hooking:
            raise RuntimeError(
                f"a run of {self.name} started while another one's hooks are installed (hm.run inside a "
                "hm.hooked(...) block, or an edit function that calls hm.run): the outer edits and recording "
                "would apply to this forward too. Run it outside the block, or compute what the edit needs beforehand"
            )
        cache_names, edits_by_point, must_fire = self._request(cache, edits)
        spans = self.adapter.spans(self.model, self.check_inputs(inputs)) if inputs is not None else None
        recording = Recording(spans=spans)
        store: dict[str, Tensor] = {}
        plan = Plan(self, spans, set(cache_names), edits_by_point, store, recording.fired, keep_grad)
        handles = plan.install()
        self._hooking = True
        try:
            yield recording
        finally:
            self._hooking = False
            for h in handles:
                h.remove()
        never = sorted(must_fire - recording.fired)
        if never:
            raise RuntimeError(
                f"hook points {never} were never reached in this forward (their modules did not run: "
                "is that modality's input missing?)"
            )
        recording.cache = ActivationCache(store, self.hook_points, spans)

    def run(
        self,
        inputs: Mapping[str, Any],
        *,
        cache: CacheFilter = None,
        edits: Edit | list[Edit] = (),
        grad: bool = False,
        keep_grad: bool = False,
        backend: str = "torch",
        remote: bool | str = False,
        **forward_kwargs: Any,
    ) -> RunResult:
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
            remote: with ``backend="nnsight"``, nnsight's ``remote=``: ``True`` runs the trace on NDIF
                (docs/scale-out.md), ``"local"`` nnsight's local simulation of that path.
        """
        inputs = self.check_inputs(inputs)
        check_forward_kwargs(self.model, self.adapter, forward_kwargs)
        if remote is not False and backend != "nnsight":
            raise ValueError(f"remote={remote!r} needs backend='nnsight' (remote execution runs nnsight traces)")
        if backend == "nnsight":
            grad = grad or keep_grad
            return run_with_nnsight(
                self, inputs, cache=cache, edits=edits, grad=grad, keep_grad=keep_grad, remote=remote, **forward_kwargs
            )
        if backend != "torch":
            raise ValueError(f"unknown backend {backend!r}; use 'torch' or 'nnsight'")
        with (
            torch.set_grad_enabled(grad or keep_grad),
            self.hooked(inputs, cache=cache, edits=edits, keep_grad=keep_grad) as rec,
        ):
            output = self.model(**inputs, **forward_kwargs)
        logits = output if isinstance(output, Tensor) else output.logits
        return RunResult(output=output, logits=logits, cache=rec.cache, spans=rec.spans)

    def __call__(self, inputs: Mapping[str, Any], **kwargs: Any) -> RunResult:
        return self.run(inputs, **kwargs)


_CHECKED_SIZE = 16
"""How many checked inputs :meth:`HookedModel.check_inputs` remembers (by identity) to skip re-checking."""


def _identity(inputs: Mapping[str, Any], allow_nonfinite: bool) -> tuple:
    """A key that is equal only for the same objects, unchanged: every value's id and, for tensors,
    the in-place version counter (an edited tensor gets a new key and is checked again)."""
    return (
        allow_nonfinite,
        tuple((k, id(v), v._version if isinstance(v, Tensor) else None) for k, v in inputs.items()),
    )
