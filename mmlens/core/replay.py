"""Replay: recompute only what an intervention can change.

One engine for every job that reuses part of a forward pass:

- :class:`BlockReplay` re-runs the LM's blocks ``l..L-1`` from a recorded run's residual stream at
  block ``l``, with the call arguments each block received in that run: a patch at block ``l``
  cannot change earlier blocks, nor any encoder or projector before the LM. When the adapter says
  the LM's attention is causal on the recorded inputs (``Adapter.is_causal``) and the blocks take a
  key/value cache, it
  re-runs only positions ``p0..`` (a patch at ``p0`` cannot change earlier positions) and attends
  to the recorded keys and values of the earlier ones. Only the readout position is normalised and
  unembedded (:class:`mmlens.core.unembed.Unembed`). Patching sweeps, the explainers' masked
  variants and the desiderata replay through it.
- :func:`forest_logits`: the prefix trees (:mod:`mmlens.core.prefix_tree`) of one or several
  recordings in one call of the blocks, each node attending only to its own recording's keys and
  values and to its ancestors.
- :class:`FrozenEncoders`: encoder blocks return their recorded outputs, for batched runs whose
  edits all lie after the encoders (projector, fusion, LM).
- :class:`PrefixRunner`: a frozen causal LM's keys and values of a shared prompt prefix, computed
  once and reused for every batch of suffixes (TEA-GLM projector training and evaluation).

Every reuse equals the full forward up to float round-off (``tests/test_patching.py``,
``tests/test_explainers.py``, ``tests/test_tea_glm_reproduction.py``).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mmlens.core.adapter import HookPoint, SeqArg, get_module
from mmlens.core.edits import Edit, replace
from mmlens.core.prefix_tree import PrefixTree
from mmlens.core.unembed import Unembed
from mmlens.core.wrapper import HookedModel, RunResult

KINDS: frozenset[str] = frozenset({"resid_pre", "attn_out", "z", "resid_mid", "mlp_out", "resid_post"})
"""Kinds of block points a :class:`BlockReplay` can patch."""

NOT_CAUSAL: str = "no kv reuse: the adapter says the LM is not causal on these inputs"
"""Why a replay re-ran every position, as its ``method`` says."""

KV_KWARGS: tuple[str, ...] = ("cache", "past_key_values")
"""Names of a key/value-cache argument: ``past_key_values``, renamed ``cache`` in transformers 5.24."""


def cache_kwarg(fn: Callable) -> str | None:
    """The key/value-cache parameter of ``fn`` (one of :data:`KV_KWARGS`), or None when it takes none."""
    parameters = inspect.signature(fn).parameters
    return next((name for name in KV_KWARGS if name in parameters), None)


def expand_prefix(states: Tensor, start: int, n: int) -> Tensor:
    """Keys or values Float[1, heads, seq, d_head] of positions ``< start``, expanded to batch ``n`` (a view)."""
    return states[..., :start, :].expand(n, *states.shape[1:-2], start, states.shape[-1])


class _KVRecorder:
    """Passed as the key/value cache to each block during the recorded run: keeps every attention
    layer's keys and values Float[b, kv_heads, seq, d_head] and returns them unchanged (a prefill)."""

    def __init__(self) -> None:
        self.entries: list[tuple[Tensor, Tensor]] = []

    def update(self, keys: Tensor, values: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        self.entries.append((keys, values))
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class _PrefixKV:
    """The key/value cache of a replay of positions ``start..``: each attention layer's new keys and
    values are appended to the recorded ones of positions ``< start`` (batch ``n``)."""

    def __init__(self, entries: list[tuple[Tensor, Tensor]], first_block: int, start: int, n: int) -> None:
        self.entries, self.first_block, self.start, self.n = entries, first_block, start, n
        self.calls = 0

    def update(self, keys: Tensor, values: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        old_k, old_v = self.entries[self.first_block + self.calls]
        self.calls += 1
        prefix_k, prefix_v = expand_prefix(old_k, self.start, self.n), expand_prefix(old_v, self.start, self.n)
        return torch.cat([prefix_k.to(keys.dtype), keys], dim=-2), torch.cat(
            [prefix_v.to(values.dtype), values], dim=-2
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start


class BlockReplay:
    """Re-run the LM's blocks from a recorded run (see the module docstring).

    Use::

        engine = BlockReplay(hooked)                  # when BlockReplay.supports(hooked)
        with engine.capture():
            run = hooked.run(inputs, cache=engine.final_point)   # one row
        if engine.ready(run, inputs):
            h = engine.block_input(l)[:, start:]       # edit it, repeat it to n rows
            logits = engine.logits(h, l, start)        # Float[n, vocab] at the readout position

    Attributes:
        reuse_kv: whether keys/values of earlier positions are reused (``start > 0`` allowed).
        last: the readout position (set by :meth:`ready`).
    """

    def __init__(self, hooked: HookedModel):
        self.hooked = hooked
        blocks = sorted(
            (
                hp
                for hp in hooked.hook_points.values()
                if hp.prefix == "lm" and hp.kind == "resid_pre" and hp.layer is not None
            ),
            key=lambda hp: hp.layer,
        )
        self.modules = [get_module(hooked.model, hp.site.module) for hp in blocks]
        self.hidden = [hp.site.kwarg or "hidden_states" for hp in blocks]
        self.reader = Unembed(hooked)
        self.sequence_kwargs: dict[str, SeqArg] = {
            name: arg for name in hooked.adapter.sequence_kwargs if (arg := hooked.adapter.sequence_arg(name))
        }
        self.calls: list[dict[str, Any]] = []
        self.recorder = _KVRecorder()
        self.kv_kwarg: str | None = None
        self.usable = True
        self.reuse_kv = False
        self.not_causal = False
        self.last = -1
        self.final: Tensor | None = None
        self.tree_verdict: str | None = None  # None: tree_logits unchecked; "": checked; else why it failed

    @staticmethod
    def supports(hooked: HookedModel, points: Sequence[HookPoint] = ()) -> bool:
        """Whether ``hooked``'s LM can be replayed (its adapter names block 0's input, the final norm
        and the unembedding) at every one of ``points`` (LM block points of :data:`KINDS`)."""
        first = hooked.hook_points.get("lm.blocks.0.resid_pre")
        return (
            first is not None
            and first.kind in KINDS
            and Unembed.available(hooked)
            and all(hp.prefix == "lm" and hp.layer is not None and hp.kind in KINDS for hp in points)
        )

    @property
    def n_blocks(self) -> int:
        return len(self.modules)

    @property
    def final_point(self) -> str:
        """The hook point of the final block's output, which the recorded run must cache."""
        return f"lm.blocks.{self.n_blocks - 1}.resid_post"

    @property
    def method(self) -> str:
        """How the replayed runs are computed: ``"replay + kv"``, ``"replay"``, or, when the adapter
        says the LM is not causal on the recorded inputs, ``"replay (no kv reuse: ...)"``."""
        if self.reuse_kv:
            return "replay + kv"
        return f"replay ({NOT_CAUSAL})" if self.not_causal else "replay"

    @property
    def variant_method(self) -> str:
        """:attr:`method`, and whether masked variants were packed as a prefix tree (``", prefix tree"``)
        or :meth:`tree_logits`'s check failed (``" (no prefix tree: why)"``); nothing when never tried."""
        if self.tree_verdict is None:
            return self.method
        return (
            f"{self.method}, prefix tree"
            if self.tree_verdict == ""
            else f"{self.method} (no prefix tree: {self.tree_verdict})"
        )

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Record the block calls (and keys/values) of the forward run inside."""
        self.calls, self.recorder, self.usable, self.tree_verdict = [], _KVRecorder(), True, None
        handles = [m.register_forward_pre_hook(self._capture, with_kwargs=True) for m in self.modules]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        self.usable = self.usable and len(self.calls) == self.n_blocks
        self.reuse_kv = self.usable and self._kv_reusable()

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        named = _named_arguments(module, args, kwargs)
        if named is None:
            self.usable = False
            return None
        layer = len(self.calls)
        if layer < len(self.hidden) and self.hidden[layer] not in named:
            first = next(iter(inspect.signature(module.forward).parameters), None)  # e.g. ``x``, not ``hidden_states``
            if first is None or not isinstance(named.get(first), Tensor):
                self.usable = False
                return None
            self.hidden[layer] = first
        self.calls.append({k: v for k, v in named.items() if k not in KV_KWARGS})
        self.kv_kwarg = cache_kwarg(module.forward)
        if self.kv_kwarg is None:
            return None
        return (), {**self.calls[-1], self.kv_kwarg: self.recorder}

    def ready(self, run: RunResult, inputs: Mapping[str, Any]) -> bool:
        """Whether the recorded run (one row, cached at :attr:`final_point`) can be replayed: every
        block was recorded, and normalising and unembedding the final block's output at the readout
        position gives the run's readout logits (not so for heads that pool positions). Keys and
        values are reused only if the adapter says the LM is causal on ``inputs``."""
        if not (self.usable and run.spans is not None and run.spans.batch_size == 1 and self.final_point in run.cache):
            return False
        if self.reuse_kv and not self.hooked.adapter.is_causal(inputs):
            self.reuse_kv, self.not_causal = False, True
        self.final = run.cache[self.final_point]
        self.last = int(run.spans.mask("last")[0].nonzero().max())
        with torch.no_grad():
            mine = self.reader(self.final[:, self.last])
        logits = self.hooked.readout_logits(run.logits, inputs)
        if mine.shape != logits.shape:
            return False
        return bool((mine.float() - logits.float()).abs().max() <= 1e-4 * logits.float().abs().max() + 1e-5)

    def _kv_reusable(self) -> bool:
        """Keys/values can be reused when the adapter says the LM is causal (and no attention module
        says otherwise), every block recorded them once, and every sequence-long call argument is one
        the adapter says how to cut (``Adapter.sequence_kwargs``)."""
        self.not_causal = self.hooked.adapter.causal is False
        if self.not_causal or len(self.recorder.entries) != self.n_blocks:
            return False
        if any(getattr(m, "is_causal", None) is False for block in self.modules for m in block.modules()):
            return False
        seq = self.calls[0][self.hidden[0]].shape[1]
        if any(k.shape[-2] != seq for k, _ in self.recorder.entries):
            return False
        for call, hidden in zip(self.calls, self.hidden):
            for name, value in call.items():
                if name == hidden or name in self.sequence_kwargs:
                    continue
                if name == "attention_mask":
                    if value is not None and not (value.dim() == 4 and value.shape[-2] == seq) and value.dim() != 2:
                        return False
                elif _has_seq_axis(value, seq):
                    return False
        return True

    def row(self, r: int, n: int) -> BlockReplay:
        """The recording of row ``r`` of a recorded batch of ``n`` rows, as if that row had been run
        alone (up to float round-off of the batched run): every block call's arguments, keys and values
        cut to the row on their batch axis (``Adapter.sequence_kwargs``, else the first when it has
        ``n`` entries). Call :meth:`ready` on the row's run before replaying."""
        out = copy.copy(self)
        axes = {name: arg.batch for name, arg in self.sequence_kwargs.items()}
        out.calls = [{k: _row_of(v, axes.get(k, 0), r, n) for k, v in call.items()} for call in self.calls]
        out.recorder = _KVRecorder()
        out.recorder.entries = [(k[r : r + 1], v[r : r + 1]) for k, v in self.recorder.entries]
        out.tree_verdict, out.last, out.final = None, -1, None
        return out

    def block_input(self, block: int) -> Tensor:
        """The recorded residual stream entering block ``block``, Float[1, seq, d] (``block ==
        n_blocks``: the final block's output)."""
        return self.final if block == self.n_blocks else self.calls[block][self.hidden[block]]

    def start(self, block: int, first: int) -> int:
        """The first position to re-run for a patch from position ``first`` on entering block
        ``block``: ``first`` (at most the readout position) when keys/values are reused, else 0."""
        return min(first, self.last) if self.reuse_kv and block < self.n_blocks else 0

    @torch.no_grad()
    def logits(self, h: Tensor, block: int, start: int = 0, edits: Sequence[Edit] = ()) -> Tensor:
        """Readout logits Float[n, vocab] of blocks ``block..L-1`` run on ``h`` Float[n, seq - start, d]
        (the residual stream entering block ``block`` at positions ``start..``; ``start`` from
        :meth:`start`), with ``edits`` applied inside the blocks."""
        with self.hooked.hooked(edits=list(edits)) if edits else contextlib.nullcontext():
            h = self.run_blocks(h, block, start)
        return self.reader(h[:, self.last - start])

    def run_blocks(self, h: Tensor, block: int, start: int = 0) -> Tensor:
        """The final block's output Float[n, seq - start, d] of blocks ``block..L-1`` run on ``h``
        (as in :meth:`logits`; hooks installed by the caller fire inside)."""
        for layer in range(block, self.n_blocks):
            kwargs = self._block_kwargs(layer, start, h.shape[0])
            h = _first(self.modules[layer](**{self.hidden[layer]: h}, **kwargs))
        return h

    def tree_logits(self, h: Tensor, tree: PrefixTree) -> Tensor | None:
        """Readout logits Float[n, vocab] of a :class:`~mmlens.core.prefix_tree.PrefixTree`'s n variants:
        blocks 0..L-1 run on ``h`` Float[1, T, d] (the residual stream entering block 0 at the tree's
        nodes), each node attending to the recorded keys and values of positions before its branch
        position and to its ancestors. Only when :meth:`tree_refusal` is None; None when the first
        call's check fails (see :func:`forest_logits`, of which this is the one-recording case)."""
        out = forest_logits([(self, tree, h)])
        return None if out is None else out[0]

    def tree_refusal(self) -> str | None:
        """Why :meth:`tree_logits` cannot be used on this recording (None: it can, as far as is known
        before its first call checks it): keys and values must be reusable, every block's attention
        mask 4-D over the recorded positions or absent, and the first call's check must have passed."""
        if not self.reuse_kv:
            return "no kv reuse"
        if not all(self._square_mask(layer) for layer in range(self.n_blocks)):
            return "a block's attention mask is not 4-D over the recorded positions"
        return self.tree_verdict or None

    def _square_mask(self, layer: int) -> bool:
        """Whether block ``layer``'s recorded attention mask is absent or Float/Bool[..., seq, seq]."""
        mask, seq = self.calls[layer].get("attention_mask"), self.block_input(layer).shape[1]
        return mask is None or (isinstance(mask, Tensor) and mask.dim() == 4 and mask.shape[-2:] == (seq, seq))

    def first_block_call(self, inputs: Mapping[str, Any], edits: Sequence[Edit] = ()) -> tuple[Tensor, dict]:
        """The first LM block's call in a run of ``inputs`` with ``edits`` (which must lie before the
        LM blocks), without running any block (the run stops there): the residual stream entering it
        Float[b, seq, d] and its other arguments by name."""
        captured: list[dict] = []

        def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append(_named_arguments(module, args, kwargs) or {})
            raise _StopForward

        handle = self.modules[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.hooked.run(inputs, edits=list(edits))
        except _StopForward:
            pass
        finally:
            handle.remove()
        first = next(iter(inspect.signature(self.modules[0].forward).parameters), None)
        named = captured[0] if captured else {}
        hidden = self.hidden[0] if self.hidden[0] in named else first
        if not isinstance(named.get(hidden), Tensor):
            raise RuntimeError(f"{self.hooked.name}: the first LM block never ran, or its input has no tensor")
        return named[hidden], {k: v for k, v in named.items() if k != hidden}

    def matches_first_call(self, hidden: Tensor, call: Mapping[str, Any]) -> bool:
        """Whether a run's first block call on n rows (:meth:`first_block_call`) has the recorded
        hidden states' shape per row and, in every row, every other argument (masks, positions,
        rotary tables; not the key/value cache) equal bit for bit to the recording's: then every block
        would see what it saw in the recorded run except where the hidden states differ."""
        n = hidden.shape[0]
        recorded = {k: v for k, v in self.calls[0].items() if k != self.hidden[0]}
        mine = {k: v for k, v in call.items() if k not in KV_KWARGS}
        if hidden.shape[1:] != self.block_input(0).shape[1:] or mine.keys() != recorded.keys():
            return False
        axes = {name: arg.batch for name, arg in self.sequence_kwargs.items()}
        return all(_same_argument(_row_of(mine[k], axes.get(k, 0), r, n), recorded[k]) for k in mine for r in range(n))

    def rows_disagree(self, call: Mapping[str, Any], n: int) -> str | None:
        """The first argument of a block call on ``n`` rows (from :meth:`first_block_call`; other than
        the attention mask and the key/value cache) whose rows differ, e.g. per-row rotary positions;
        None when every argument with ``n`` rows on its batch axis has ``n`` equal rows."""
        for name, value in call.items():
            if name == "attention_mask" or name in KV_KWARGS:
                continue
            arg = self.sequence_kwargs.get(name)
            axis = 0 if arg is None else arg.batch
            for v in value if isinstance(value, (tuple, list)) else (value,):
                if axis is None or not isinstance(v, Tensor) or not -v.dim() <= axis < v.dim() or v.shape[axis] != n:
                    continue
                if not torch.equal(v, v.narrow(axis, 0, 1).expand_as(v)):
                    return name
        return None

    def _block_kwargs(self, layer: int, start: int, n: int) -> dict[str, Any]:
        """Block ``layer``'s call arguments for queries at positions ``start..`` (batch ``n``)."""
        call = self.calls[layer]
        out = {k: v for k, v in call.items() if k != self.hidden[layer]}
        if self.reuse_kv:
            hidden = call[self.hidden[layer]]
            for name, arg in self.sequence_kwargs.items():
                if call.get(name) is not None:
                    out[name] = _cut(call[name], arg.seq, start)
            out["attention_mask"] = _cut_mask(call.get("attention_mask"), hidden, start)
            out[self.kv_kwarg] = _PrefixKV(self.recorder.entries, layer, start, n)
        batch_axes = {name: arg.batch for name, arg in self.sequence_kwargs.items()}
        return _expand(out, n, batch_axes)


@torch.no_grad()
def forest_logits(parts: Sequence[tuple[BlockReplay, PrefixTree, Tensor]]) -> list[Tensor] | None:
    """Readout logits of several recordings' prefix trees in one call of the LM's blocks: for each
    part (engine, tree, h), Float[n, vocab] of the tree's n variants, ``h`` Float[1, T, d] being the
    residual stream entering block 0 at the tree's nodes. Each node attends to its own recording's
    keys and values before its branch position (as that recording's mask allows) and to its
    ancestors; nothing of another part is visible. Every engine's :meth:`BlockReplay.tree_refusal`
    must be None.

    The first call on a recording also runs the row's own last (up to 4) positions after its tree's
    nodes (:meth:`PrefixTree.with_own_path`): when their readout differs from the recorded run's
    (relative 1e-4), e.g. because a block ignores the mask or positions it is given, that engine's
    ``tree_verdict`` says so, :meth:`BlockReplay.tree_refusal` refuses from then on, and this returns
    None. Recordings whose block calls differ in other arguments (:func:`forest_refusal`) run one by one."""
    engines = [engine for engine, _, _ in parts]
    if len(parts) > 1 and forest_refusal(engines) is not None:
        singles = [forest_logits([part]) for part in parts]
        return None if any(s is None for s in singles) else [s[0] for s in singles]
    checks = [engine.tree_verdict is None and engine not in engines[:j] for j, engine in enumerate(engines)]
    trees, hs = zip(*(_with_check(*part) if check else part[1:] for part, check in zip(parts, checks)))
    first = engines[0]
    h = torch.cat(hs, dim=1)
    for layer in range(first.n_blocks):
        kwargs = _forest_kwargs(engines, trees, layer)
        h = _first(first.modules[layer](**{first.hidden[layer]: h}, **kwargs))
    offsets = [0, *itertools.accumulate(len(tree) for tree in trees)]
    readouts = torch.cat([tree.readout + offset for tree, offset in zip(trees, offsets)])
    logits = first.reader(h[0, readouts.to(h.device)]).split([len(tree.readout) for tree in trees])
    if any(checks) and not _own_paths_agree([(e, lg[-1]) for e, lg, c in zip(engines, logits, checks) if c]):
        return None
    return [lg[:-1] if check else lg for lg, check in zip(logits, checks)]


def forest_refusal(engines: Sequence[BlockReplay]) -> str | None:
    """Why the recordings of ``engines`` cannot share one :func:`forest_logits` call (None: they can):
    they must replay the same model's blocks, and every block call must agree in each argument
    other than the hidden states, the attention mask and the sequence arguments."""
    first = engines[0]
    for engine in engines[1:]:
        if engine.hooked is not first.hooked or len(engine.calls) != len(first.calls):
            return "recordings of different wrapped models"
        for layer, (mine, theirs) in enumerate(zip(engine.calls, first.calls)):
            skip = {first.hidden[layer], "attention_mask", *first.sequence_kwargs}
            if mine.keys() != theirs.keys():
                return f"block {layer} was called with different arguments"
            for name in mine.keys() - skip:
                if not _same_argument(mine[name], theirs[name]):
                    return f"block {layer}'s argument {name!r} differs between the recordings"
    return None


def _same_argument(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_argument(x, y) for x, y in zip(a, b))
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    return a is b or a == b


def _with_check(engine: BlockReplay, tree: PrefixTree, h: Tensor) -> tuple[PrefixTree, Tensor]:
    """The tree and its block-0 input with the row's own last (up to 4) positions appended."""
    start = max(0, engine.last - 3)
    own = engine.block_input(0)[:, start : engine.last + 1]
    return tree.with_own_path(start, engine.last), torch.cat([h, own.to(h)], dim=1)


def _own_paths_agree(checked: list[tuple[BlockReplay, Tensor]]) -> bool:
    """Whether each engine's own-path readout equals its recorded run's; records the verdict."""
    want = checked[0][0].reader(torch.cat([engine.final[:, engine.last] for engine, _ in checked]))
    agree = True
    for (engine, got), expected in zip(checked, want):
        error = float((got.float() - expected.float()).abs().max())
        engine.tree_verdict = ""
        if not error <= 1e-4 * float(expected.float().abs().max()) + 1e-5:
            engine.tree_verdict = (
                f"the row's own positions, packed after the variants, differ from its run by {error:.3g}"
            )
            agree = False
    return agree


def _forest_kwargs(engines: Sequence[BlockReplay], trees: Sequence[PrefixTree], layer: int) -> dict[str, Any]:
    """Block ``layer``'s call arguments for the nodes of every part's tree (batch 1)."""
    first = engines[0]
    calls = [engine.calls[layer] for engine in engines]
    hidden = first.hidden[layer]
    positions = [tree.positions.to(call[hidden].device) for tree, call in zip(trees, calls)]
    out = {k: v for k, v in calls[0].items() if k != hidden}
    for name, arg in first.sequence_kwargs.items():
        if calls[0].get(name) is not None:
            out[name] = _cat([_take(call[name], arg.seq, p) for call, p in zip(calls, positions)], arg.seq)
    masks = [_tree_mask(call.get("attention_mask"), call[hidden], tree) for call, tree in zip(calls, trees)]
    seqs = [call[hidden].shape[1] for call in calls]
    out["attention_mask"] = _block_diagonal(masks, seqs)
    entries = [engine.recorder.entries[layer] for engine in engines]
    keys, values = torch.cat([k for k, _ in entries], dim=-2), torch.cat([v for _, v in entries], dim=-2)
    out[first.kv_kwarg] = _PrefixKV([(keys, values)], 0, sum(seqs), 1)
    return out


def _cat(values: list[Any], axis: int) -> Any:
    """Tensors (or tuples/lists of them, element by element) concatenated along ``axis``."""
    if isinstance(values[0], (tuple, list)):
        return type(values[0])(_cat(list(group), axis) for group in zip(*values))
    return torch.cat(values, dim=axis)


def _block_diagonal(masks: list[Tensor], seqs: list[int]) -> Tensor:
    """One mask Float or Bool[..., T, S + T] from each part's :func:`_tree_mask` Float/Bool[..., T_j,
    seq_j + T_j]: part j's nodes see part j's recorded keys (columns of the S = sum seq_j) and part
    j's nodes (of the T = sum T_j), nothing else."""
    if len(masks) == 1:
        return masks[0]
    sizes = [mask.shape[-2] for mask in masks]
    lead = torch.broadcast_shapes(*(mask.shape[:-2] for mask in masks))
    total, nodes = sum(seqs), sum(sizes)
    like = masks[0]
    fill = False if like.dtype == torch.bool else torch.finfo(like.dtype).min
    out = torch.full((*lead, nodes, total + nodes), fill, dtype=like.dtype, device=like.device)
    row = key = 0
    for mask, seq, size in zip(masks, seqs, sizes):
        out[..., row : row + size, key : key + seq] = mask[..., :seq]
        out[..., row : row + size, total + row : total + row + size] = mask[..., seq:]
        row, key = row + size, key + seq
    return out


class _StopForward(Exception):
    """Raised by :meth:`BlockReplay.first_block_call` to end a run at the first LM block."""


def _named_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """A module call's arguments by parameter name (None when they cannot all be named)."""
    signature = inspect.signature(module.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return None
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return None
        else:
            named[name] = value
    return named


def _cut_mask(mask: Tensor | None, hidden: Tensor, start: int) -> Tensor | None:
    """An attention mask for queries ``start..`` over all keys: a 4-D mask's rows from ``start`` on;
    a causal additive mask when the call had none; a 2-D padding mask unchanged."""
    if mask is None:
        seq, dtype = hidden.shape[1], hidden.dtype
        allowed = torch.arange(start, seq)[:, None] >= torch.arange(seq)[None, :]
        causal = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        return causal[None, None].to(hidden.device)
    return mask[..., start:, :] if mask.dim() == 4 else mask


def _cut(value: Any, axis: int, start: int) -> Any:
    """``value`` (a tensor or a tuple/list of them) from index ``start`` on along ``axis`` (negative:
    from the end)."""
    if isinstance(value, (tuple, list)):
        return type(value)(_cut(v, axis, start) for v in value)
    return value.narrow(axis, start, value.shape[axis] - start)


def _take(value: Any, axis: int, index: Tensor) -> Any:
    """``value`` (a tensor or a tuple/list of them) at ``index`` along ``axis`` (negative: from the end)."""
    if isinstance(value, (tuple, list)):
        return type(value)(_take(v, axis, index) for v in value)
    return value.index_select(axis % value.dim(), index.to(value.device))


def _tree_mask(mask: Tensor | None, hidden: Tensor, tree: PrefixTree) -> Tensor:
    """The attention mask Float or Bool[..., T, seq + T] of a tree's nodes over the recorded keys
    (allowed where the recorded mask allows them and they precede the node's branch position) and
    over the nodes (allowed where the recorded mask allows them and they are the node's ancestors)."""
    mask = _cut_mask(mask, hidden, 0)
    positions = tree.positions.to(mask.device)
    rows = mask.index_select(-2, positions)
    before = torch.arange(mask.shape[-1], device=mask.device)[None, :] < tree.branch.to(mask.device)[:, None]
    own = rows.index_select(-1, positions)
    ancestors = tree.ancestors.to(mask.device)
    if mask.dtype == torch.bool:
        return torch.cat([rows & before, own & ancestors], dim=-1)
    off = torch.finfo(mask.dtype).min
    return torch.cat([rows.masked_fill(~before, off), own.masked_fill(~ancestors, off)], dim=-1)


def _row_of(value: Any, axis: int | None, r: int, n: int) -> Any:
    """Row ``r`` of a batch-``n`` call argument (tensors, or tuples/lists of them) on ``axis``;
    unchanged without a batch axis or when that axis is not ``n`` long (a broadcast argument)."""
    if isinstance(value, (tuple, list)):
        return type(value)(_row_of(v, axis, r, n) for v in value)
    if axis is None or not isinstance(value, Tensor) or not -value.dim() <= axis < value.dim():
        return value
    return value.narrow(axis, r, 1) if value.shape[axis] == n else value


def _has_seq_axis(value: Any, seq: int) -> bool:
    if isinstance(value, (tuple, list)):
        return any(_has_seq_axis(v, seq) for v in value)
    return isinstance(value, Tensor) and seq > 1 and seq in value.shape[1:]


def _expand(kwargs: dict, n: int, batch_axes: Mapping[str, int | None]) -> dict:
    """Batch-1 call arguments (tensors, or tuples of them) expanded to batch ``n`` on their batch axis
    (``batch_axes[name]``, default 0; ``None``: no batch axis)."""
    out = {}
    for k, v in kwargs.items():
        axis = batch_axes.get(k, 0)
        if axis is None:
            out[k] = v
        elif isinstance(v, Tensor):
            out[k] = _expand_axis(v, axis, n)
        elif isinstance(v, tuple) and all(isinstance(t, Tensor) for t in v):
            out[k] = tuple(_expand_axis(t, axis, n) for t in v)
        else:
            out[k] = v
    return out


def _expand_axis(value: Tensor, axis: int, n: int) -> Tensor:
    """``value`` expanded (a view) from size 1 to ``n`` along ``axis``; unchanged when that is not 1."""
    if value.dim() == 0 or not -value.dim() <= axis < value.dim() or value.shape[axis] != 1:
        return value
    shape = list(value.shape)
    shape[axis] = n
    return value.expand(*shape)


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


SHARED_PREFIX_MIN: int = 8
"""The shortest shared prefix (positions) that :func:`record_points` records once."""

SHARED_PREFIX_TOLERANCE: float = 1e-4
"""The largest relative difference :func:`record_points`'s check accepts between the shared-prefix
recording of one row and that row's plain forward."""

SHARED_PREFIX_KINDS: frozenset[str] = frozenset({"resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"})
"""Kinds of LM block points (Float[b, pos, d]) that :func:`record_points` can record with a shared prefix."""


def record_points(
    hooked: HookedModel,
    inputs: Mapping[str, Any],
    names: Sequence[str],
    edits: Sequence[Edit] = (),
    *,
    shared_prefix: bool = True,
    min_prefix: int = SHARED_PREFIX_MIN,
) -> tuple[dict[str, Tensor], str]:
    """The LM block points ``names`` (each Float[b, seq, d]) of one run of ``inputs`` with ``edits``,
    computing the positions that every row shares only once.

    When the rows' residual streams entering the first LM block agree bit for bit on their first
    ``P >= min_prefix`` positions (a shared prompt prefix), the LM is causal with a key/value cache
    (:class:`BlockReplay`), padding is only at the ends of rows and no edit lies inside the LM blocks,
    one row is run in full and every row replays positions ``P..`` attending to that row's keys and
    values; positions ``< P`` take that row's values. The result is checked against a plain forward
    of the row with the most padding (relative difference at most 1e-4 at its real positions);
    otherwise, or when it fails, or with ``shared_prefix=False``, one plain forward of the batch (bit
    for bit the model's own activations). Pad positions hold unspecified values.

    Returns:
        ``(cache, method)``: ``{name: Float[b, seq, d]}`` and how it was computed: ``"shared prefix:
        ..."`` with the prefix length and the check's difference, or ``"plain forward (why)"``.
    """
    spans = hooked.spans(inputs)
    why = _shared_prefix_refusal(hooked, spans, names, edits) if shared_prefix else "shared_prefix=False"
    if why is None:
        cache, why = _shared_prefix_cache(hooked, inputs, spans, names, edits, min_prefix)
        if cache is not None:
            return cache, why
    run = hooked.run(inputs, cache=list(names), edits=list(edits))
    return {n: run.cache[n] for n in names}, f"plain forward ({why})"


def _shared_prefix_cache(
    hooked: HookedModel,
    inputs: Mapping[str, Any],
    spans: Any,
    names: Sequence[str],
    edits: Sequence[Edit],
    min_prefix: int,
) -> tuple[dict[str, Tensor] | None, str]:
    """:func:`record_points`'s fast path: ``(cache, method)``, or ``(None, why not)``."""
    engine = BlockReplay(hooked)
    h0, call = engine.first_block_call(inputs, edits)
    differing = engine.rows_disagree(call, h0.shape[0])
    if differing is not None:
        return None, f"the rows differ in the first block's argument {differing!r}"
    lengths = spans.valid.sum(1)
    same = (h0 == h0[:1]).all(-1).all(0)
    prefix = min(int(same.long().cumprod(0).sum()), int(lengths.min()) - 1)
    if prefix < min_prefix:
        return None, f"the rows share {max(prefix, 0)} leading positions (< {min_prefix})"
    cache, why = _replay_suffixes(engine, inputs, names, h0, prefix, lengths)
    if cache is None:
        return None, why
    row, worst = _check_row(hooked, inputs, names, h0, cache, lengths)
    if not worst <= SHARED_PREFIX_TOLERANCE:
        return (
            None,
            f"the shared-prefix recording of row {row} differed from its plain forward by {worst:.1e} (relative)",
        )
    return cache, (
        f"shared prefix: positions 0..{prefix - 1} recorded once, {h0.shape[1] - prefix} replayed per row with "
        f"their keys and values; checked on row {row} (relative difference {worst:.1e})"
    )


def _shared_prefix_refusal(hooked: HookedModel, spans: Any, names: Sequence[str], edits: Sequence[Edit]) -> str | None:
    """Why :func:`record_points` cannot record these points with a shared prefix (None: it can try)."""
    points = [hooked.resolve(n) for n in names]
    if spans.batch_size < 2:
        return "one row"
    if not BlockReplay.supports(hooked):
        return "the LM's blocks cannot be replayed"
    if any(hp.prefix != "lm" or hp.layer is None or hp.kind not in SHARED_PREFIX_KINDS for hp in points):
        return f"points other than LM block points of kinds {sorted(SHARED_PREFIX_KINDS)}"
    if any((hp := hooked.resolve(e.hook)).prefix == "lm" and hp.layer is not None for e in edits):
        return "an edit inside the LM blocks"
    valid = spans.valid.long()
    if not torch.equal(valid, valid.cumprod(1)):
        return "padding not only at the ends of rows"
    return None


def _replay_suffixes(
    replay: BlockReplay, inputs: Mapping[str, Any], names: Sequence[str], h0: Tensor, prefix: int, lengths: Tensor
) -> tuple[dict[str, Tensor] | None, str]:
    """Run the longest row in full (recorded by ``replay``), then every row's positions ``prefix..`` on its
    keys and values: ``(cache, "")``, or ``(None, why)`` when that row cannot be replayed with reused keys."""
    hooked = replay.hooked
    row = int(lengths.argmax())
    one = hooked.rows(inputs, [row])
    with replay.capture():
        run = hooked.run(one, cache=[*names, replay.final_point], edits=[_entry(h0, row)])
    if not (replay.ready(run, one) and replay.reuse_kv):
        return None, f"the recorded row cannot be replayed from position {prefix} ({replay.method})"
    with torch.no_grad(), hooked.hooked(cache=list(names)) as recording:
        replay.run_blocks(h0[:, prefix:], 0, prefix)
    b = h0.shape[0]
    cache = {n: torch.cat([run.cache[n][:, :prefix].expand(b, -1, -1), recording.cache[n]], dim=1) for n in names}
    return cache, ""


def _check_row(
    hooked: HookedModel,
    inputs: Mapping[str, Any],
    names: Sequence[str],
    h0: Tensor,
    cache: dict[str, Tensor],
    lengths: Tensor,
) -> tuple[int, float]:
    """The last row with the most padding (not the recorded one when the rows have one length) and the
    largest relative difference, over ``names`` at its real positions, between ``cache`` and that
    row's plain forward."""
    row = len(lengths) - 1 - int(lengths.flip(0).argmin())
    plain = hooked.run(hooked.rows(inputs, [row]), cache=list(names), edits=[_entry(h0, row)]).cache
    real = int(lengths[row])
    worst = 0.0
    for n in names:
        a, b = cache[n][row, :real].float(), plain[n][0, :real].float()
        worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)))
    return row, worst


def _entry(h0: Tensor, row: int) -> Edit:
    """An edit that sets one row's residual stream entering the first LM block to ``h0[row]``."""
    return replace("lm.blocks.0.resid_pre", h0[row : row + 1])


class FrozenEncoders:
    """Encoder blocks that return their recorded outputs instead of computing, for batched runs
    whose edits all lie after the encoders (projector, fusion, LM).

    ``with frozen.record(): run = hooked.run(...)`` records each encoder block's output; inside
    ``with frozen.replaying():`` every such block returns that output, repeated to the batch (an
    input with the recorded batch size, e.g. a graph shared by all rows, gets it unchanged).
    """

    def __init__(self, hooked: HookedModel):
        paths = dict.fromkeys(
            hp.site.module
            for hp in hooked.hook_points.values()
            if hp.stage == "encoder" and hp.layer is not None and hp.kind in ("resid_pre", "out")
        )
        self.modules = [get_module(hooked.model, path) for path in paths]
        self.outputs: dict[int, tuple[int, Any]] = {}

    @staticmethod
    def supports(hooked: HookedModel, points: Sequence[HookPoint]) -> bool:
        """Whether ``hooked`` has encoders, none packing every row's items into one sequence (axes
        ``("pack", "item")``: a recorded row cannot be tiled), and none of ``points`` (the edited
        points) lies inside one."""
        encoders = [hp for hp in hooked.hook_points.values() if hp.stage == "encoder"]
        return (
            bool(encoders)
            and all("pack" not in hp.axes for hp in encoders)
            and all(hp.stage != "encoder" for hp in points)
        )

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self.outputs[id(module)] = (_batch_of(args, kwargs), output)

        handles = [m.register_forward_hook(hook, with_kwargs=True) for m in self.modules]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @property
    def active(self) -> bool:
        """Whether any encoder block ran in the recorded run (e.g. not when the graph is given as embeddings)."""
        return bool(self.outputs)

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        replaced = [m for m in self.modules if id(m) in self.outputs]
        for module in replaced:
            recorded_batch, output = self.outputs[id(module)]

            def forward(*args: Any, _batch: int = recorded_batch, _output: Any = output, **kwargs: Any) -> Any:
                n = _batch_of(args, kwargs)
                return _output if n == _batch else _tile(_output, n // _batch)

            module.forward = forward
        try:
            yield
        finally:
            for module in replaced:
                del module.forward


def _batch_of(args: tuple, kwargs: dict) -> int:
    """The leading size of a call's first tensor argument."""
    return next(v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)).shape[0]


def _tile(value: Any, n: int) -> Any:
    """``value`` (a tensor, or a tuple/list/ModelOutput of them) repeated ``n`` times along dim 0."""
    if isinstance(value, Tensor):
        return value.repeat(n, *([1] * (value.dim() - 1)))
    if isinstance(value, (tuple, list)):
        return type(value)(_tile(v, n) for v in value)
    if isinstance(value, Mapping):
        return type(value)(**{k: _tile(v, n) for k, v in value.items()})
    return value


class PrefixRunner:
    """A frozen causal LM (a transformers ``PreTrainedModel``) run on a shared prefix, whose keys and
    values are computed once, plus per-row suffixes.

    Suffixes are right-padded, so the answer position of row i is ``prefix + lengths[i] - 1`` and
    padding never influences it (causal attention); no attention mask is needed.
    """

    def __init__(self, lm: nn.Module, prefix_ids: list[int]):
        self.lm = lm
        self.decoder = lm.get_decoder()
        self.unembed = lm.get_output_embeddings()
        self.cache_kwarg = cache_kwarg(self.decoder.forward) or "past_key_values"
        device = lm.get_input_embeddings().weight.device
        with torch.no_grad():
            out = lm(input_ids=torch.tensor([prefix_ids], device=device), use_cache=True)
        cache = next(out.get(name) for name in KV_KWARGS if out.get(name) is not None)
        self.prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]

    def answer_logits(self, suffix_embeds: Tensor, lengths: Tensor) -> Tensor:
        """Suffix embeddings Float[b, s, d] with real lengths Long[b] -> next-token logits Float[b, vocab]
        at each row's last real suffix position."""
        from transformers import DynamicCache

        b = suffix_embeds.shape[0]
        prefix = [
            (expand_prefix(k, k.shape[-2], b).contiguous(), expand_prefix(v, v.shape[-2], b).contiguous())
            for k, v in self.prefix_kv
        ]
        cache = DynamicCache(ddp_cache_data=prefix, config=self.lm.config)
        hidden = self.decoder(
            inputs_embeds=suffix_embeds, use_cache=True, **{self.cache_kwarg: cache}
        ).last_hidden_state
        last = hidden[torch.arange(b, device=hidden.device), lengths.to(hidden.device) - 1]
        return self.unembed(last)


__all__ = [
    "KINDS",
    "KV_KWARGS",
    "SHARED_PREFIX_KINDS",
    "SHARED_PREFIX_MIN",
    "SHARED_PREFIX_TOLERANCE",
    "BlockReplay",
    "FrozenEncoders",
    "PrefixRunner",
    "cache_kwarg",
    "expand_prefix",
    "forest_logits",
    "forest_refusal",
    "record_points",
]
