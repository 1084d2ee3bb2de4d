"""Activation, path and attribution patching over every stage, batched and reusing what it can.

Vocabulary: a *pair* is (clean, corrupted) inputs. **Denoising** runs the corrupted input with
clean activations patched in (which component restores the clean behaviour?); **noising** runs the
clean input with corrupted activations patched in (which component is necessary?). A *cell* is one
patch: a hook point's layer, a position (or a modality span) and optionally a head.

Speed (``sweep``): all cells of one pair are patched in batched forwards (``batch_size`` variants
per pass). For points in the language model's blocks (residual stream, attention/MLP outputs,
heads) the sweep replays only blocks ``l..L-1`` from the target run's residual stream at block
``l``: the earlier blocks, and any encoder or projector before the LM, are never recomputed. Under
causal attention it also replays only positions from the first patched one on, with the keys and
values of earlier positions taken from the target run. Only the final position is unembedded. Cells
whose source activation equals the target's (no-op patches) are not run at all. Replay matches a
full forward to float round-off; ``tests/test_patching.py`` checks it on every kind of point.
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mmlens.core.adapter import HookPoint, get_module
from mmlens.core.edits import Edit, HookContext, add, apply, replace
from mmlens.core.spans import ModalitySpans
from mmlens.core.wrapper import HookedModel

Metric = Callable[[Tensor], Tensor]
"""Final-position logits Float[b, vocab] -> one number per row Float[b]."""


# -- metrics --------------------------------------------------------------------------------------

def logit_diff(answer: int, wrong: int) -> Metric:
    """``logit[answer] - logit[wrong]`` at the final position."""
    return lambda logits: logits[:, answer] - logits[:, wrong]


def logprob(target: int) -> Metric:
    """Log-probability of ``target`` at the final position (nats)."""
    return lambda logits: logits.float().log_softmax(-1)[:, target]


def prob(target: int) -> Metric:
    """Probability of ``target`` at the final position."""
    return lambda logits: logits.float().softmax(-1)[:, target]


def kl_from(reference: Tensor) -> Metric:
    """KL(reference || patched) in nats, ``reference`` the clean final-position logits Float[vocab] or [b, vocab]."""
    ref = reference.float().log_softmax(-1)
    return lambda logits: (ref.exp() * (ref - logits.float().log_softmax(-1))).sum(-1)


def last_logits(logits: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Logits at each row's last real position: Float[b, seq, vocab] -> Float[b, vocab] (classifier
    logits Float[b, classes] pass through)."""
    if logits.dim() == 2:
        return logits
    if attention_mask is None:
        return logits[:, -1]
    last = attention_mask.long().cumsum(1).argmax(1)
    return logits[torch.arange(logits.shape[0], device=logits.device), last.to(logits.device)]


# -- corruptions ----------------------------------------------------------------------------------

@dataclass
class Corruption:
    """A corrupted input: inputs to run, plus edits applied during the run (for embedding noise)."""

    inputs: dict
    edits: list[Edit]
    description: str


def corrupt(hooked: HookedModel, inputs: Mapping[str, Any], modality: str, method: str = "neutral", *,
            other: Mapping[str, Any] | None = None, noise: float = 3.0, seed: int = 0) -> Corruption:
    """Corrupt one modality of ``inputs``.

    Args:
        method: ``"neutral"`` (the adapter's neutral reference: zero/mean image, zero graph
            embedding, pad text), ``"swap"`` (take that modality from ``other``, another example
            with the same layout) or ``"noise"`` (ROME-style: Gaussian noise of ``noise`` times the
            std of that modality's input embeddings, added at ``fusion.embeds`` / ``lm.embed``).
    """
    inputs = hooked.check_inputs(inputs)
    spans = hooked.spans(inputs)
    if modality not in spans.masks:
        raise KeyError(f"modality {modality!r} is not in these inputs; spans here: {spans.modalities}")
    if method == "neutral":
        return Corruption(hooked.neutral(inputs, modality), [], f"{modality}: neutral reference")
    if method == "swap":
        if other is None:
            raise ValueError("method='swap' needs other= (an example whose modality to take)")
        other = hooked.check_inputs(other)
        other_spans = hooked.spans(other)
        check_same_layout(spans, other_spans, "inputs", "other")
        if modality == "text":
            text = spans.masks["text"].to(inputs["input_ids"].device)
            swapped = {**inputs, "input_ids": torch.where(text, other["input_ids"], inputs["input_ids"])}
        else:
            text_keys = {"input_ids", "attention_mask"}
            swapped = {**inputs, **{k: v for k, v in other.items() if k not in text_keys}}
        return Corruption(swapped, [], f"{modality}: swapped with another example")
    if method == "noise":
        point = "fusion.embeds" if "fusion.embeds" in hooked.hook_points else "lm.embed"
        run = hooked.run(inputs, cache=point)
        embeds = run.cache[point]
        mask = spans.masks[modality].to(embeds.device)
        g = torch.Generator(device="cpu").manual_seed(seed)
        scale = noise * embeds[mask].float().std()
        delta = (torch.randn(embeds.shape, generator=g) * scale).to(embeds.device, embeds.dtype) * mask[..., None]
        return Corruption(dict(inputs), [add(point, delta)], f"{modality}: Gaussian noise x{noise} embedding std")
    raise ValueError(f"unknown corruption method {method!r}; use 'neutral', 'swap' or 'noise'")


def check_same_layout(a: ModalitySpans, b: ModalitySpans, name_a: str = "clean", name_b: str = "corrupted") -> None:
    """Raise if two inputs' spans do not line up position by position."""
    if a.valid.shape != b.valid.shape:
        raise ValueError(f"{name_a} and {name_b} inputs have different shapes [batch, seq]: {tuple(a.valid.shape)} vs "
                         f"{tuple(b.valid.shape)}; pad them to the same length, or patch by span (axes=('layer', 'span'))")
    if not a.same_layout(b):
        counts = {m: (a.masks[m].sum(1).tolist(), b.masks[m].sum(1).tolist()) for m in a.masks if m in b.masks}
        raise ValueError(f"{name_a} and {name_b} spans do not line up (positions per modality, {name_a} vs {name_b}: "
                         f"{counts}); use inputs with the same layout, or patch by span (axes=('layer', 'span'))")


# -- sweeps ---------------------------------------------------------------------------------------

@dataclass
class Cell:
    """One patch: ``layer`` (None for points without one), ``positions`` Bool[seq] (None = all),
    ``head`` (None = all), and labels for the table."""

    point: str
    layer: int | None
    positions: Tensor | None
    head: int | None
    labels: dict


@dataclass
class SweepResult:
    """What :func:`sweep` returns.

    Attributes:
        table: one row per (pair, cell): ``pair, layer, position, span, head, token, modality`` (as
            they apply), ``value`` (the metric), ``normalized`` ((value - corrupt)/(clean - corrupt)
            for denoising; (value - clean)/(corrupt - clean) for noising... see :func:`sweep`).
        clean, corrupted: the metric on the unpatched clean / corrupted run, per pair.
        direction, hook, axes: what was swept.
        skipped: cells that were no-op patches (source == target activation) and not recomputed.
        method: how the other cells were run: ``"full forwards"``, ``"full forwards, encoders
            cached"`` (patches after the encoders: encoder blocks return their target-run outputs),
            ``"replay"`` (blocks l..L-1) or ``"replay + kv"`` (blocks l..L-1 on positions from the
            first patched one).
    """

    table: pd.DataFrame
    clean: list[float]
    corrupted: list[float]
    direction: str
    hook: str
    axes: tuple[str, ...]
    skipped: int = 0
    method: str = "full forwards"

    def grid(self, pair: int = 0, value: str = "value") -> pd.DataFrame:
        """The sweep of one pair as a 2-D frame (first axis as rows, second as columns)."""
        sub = self.table[self.table.pair == pair]
        if len(self.axes) == 1:
            return sub.set_index(self.axes[0])[[value]]
        return sub.pivot(index=self.axes[0], columns=self.axes[1], values=value)


AXES = {("layer", "position"), ("layer", "span"), ("layer", "head"), ("position",), ("layer",), ("span",),
        ("head",), ("layer", "position", "head")}


def _points(hooked: HookedModel, hook: str) -> list[HookPoint]:
    """``hook`` as a full name (one point) or a short block-point name (every layer of it)."""
    if hook in hooked.hook_points:
        return [hooked.hook_points[hook]]
    prefix, kind = hook.rsplit(".", 1) if "." in hook else ("lm", hook)
    points = [hp for hp in hooked.hook_points.values() if hp.prefix == prefix and hp.kind == kind and hp.layer is not None]
    if not points:
        return [hooked.resolve(hook)]
    return sorted(points, key=lambda hp: hp.layer)


def _cells(hooked: HookedModel, points: list[HookPoint], axes: tuple[str, ...], spans: ModalitySpans, row: int,
           tokens: list[str], encoder_lengths: dict[str, int] | None = None) -> list[Cell]:
    """The cells of one pair; ``encoder_lengths`` gives the token count of encoder points (which do
    not index the fused sequence)."""
    encoder_lengths = encoder_lengths or {}
    cells = []
    modality = spans.modality_of_positions()[row]
    valid = spans.valid[row].cpu()
    for hp in points:
        layer = hp.layer
        if "head" in axes and not hp.heads:
            raise ValueError(f"{hp.name!r} has no head axis; per-head patching works at 'z' points (e.g. hook='z')")
        heads = range(hp.heads) if "head" in axes else [None]
        if "position" in axes:
            if hp.fused_positions:
                position_sets = [(p, torch.arange(valid.shape[0]) == p) for p in range(valid.shape[0]) if valid[p]]
            else:
                n = encoder_lengths.get(hp.name)
                if n is None:
                    raise ValueError(f"{hp.name!r} has no position axis")
                position_sets = [(p, torch.arange(n) == p) for p in range(n)]
        elif "span" in axes:
            position_sets = [(m, spans.masks[m][row].cpu()) for m in spans.modalities]
        else:
            position_sets = [(None, None)]
        for key, mask in position_sets:
            for head in heads:
                labels: dict[str, Any] = {}
                if "layer" in axes or len(points) > 1:
                    labels["layer"] = layer
                if "position" in axes and hp.fused_positions:
                    labels.update(position=key, token=tokens[key], modality=modality[key])
                elif "position" in axes:
                    labels.update(position=key, token=f"<{hp.modality or hp.stage} {key}>", modality=hp.modality or hp.stage)
                if "span" in axes:
                    labels["span"] = key
                if head is not None:
                    labels["head"] = head
                cells.append(Cell(hp.name, layer, mask, head, labels))
    return cells


def _patch_edit(hp: HookPoint, rows: list[tuple[int, Cell]], source: Tensor, start: int = 0) -> Edit:
    """One edit at ``hp`` that patches row r of the batch with ``source`` (the activation from the
    other run, batch 1) at that row's cell; ``start``: the run covers positions ``start..`` only."""

    def fn(act: Tensor, ctx: HookContext) -> Tensor:
        out = act.clone()
        src = source[:, start:].to(act.device, act.dtype) if start else source.to(act.device, act.dtype)
        for r, cell in rows:
            if cell.positions is None and cell.head is None:
                out[r] = src[0]
                continue
            pos = cell.positions[start:].to(act.device) if cell.positions is not None else slice(None)
            if cell.head is None:
                out[r, pos] = src[0, pos]
            else:
                out[r, pos, cell.head] = src[0, pos, cell.head]
        return out

    return apply(hp.name, fn)


def _unchanged(cell: Cell, source: Tensor, target: Tensor) -> bool:
    """Whether patching ``cell`` writes exactly the value already there (source == target, batch 1)."""
    if source.shape != target.shape:
        return False
    src, tgt = source[0], target[0]
    if cell.positions is not None:
        pos = cell.positions.to(src.device)
        src, tgt = src[pos], tgt[pos]
    if cell.head is not None:
        src, tgt = src[..., cell.head, :], tgt[..., cell.head, :]
    return torch.equal(src, tgt)


def _repeat(inputs: Mapping[str, Any], n: int) -> dict:
    """Inputs of batch 1 repeated to batch ``n`` (graph tensors shared, node ids repeated)."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, Tensor) and k not in ("node_features", "edge_index"):
            out[k] = v.expand(n, *v.shape[1:]) if v.shape[0] == 1 else v.repeat(n, *([1] * (v.dim() - 1)))
        else:
            out[k] = v
    return out


def _row(inputs: Mapping[str, Any], i: int) -> dict:
    return {k: (v[i:i + 1] if isinstance(v, Tensor) and k not in ("node_features", "edge_index") else v)
            for k, v in inputs.items()}


def sweep(
    hooked: HookedModel,
    clean: Mapping[str, Any],
    corrupted: Mapping[str, Any] | Corruption,
    metric: Metric | str,
    *,
    hook: str = "resid_pre",
    axes: Sequence[str] = ("layer", "position"),
    direction: str = "denoise",
    batch_size: int = 8,
    replay: bool = True,
    skip_unchanged: bool = True,
    layers: Sequence[int] | None = None,
    progress: bool = True,
) -> SweepResult:
    """Patch every cell of ``hook`` x ``axes`` for every (clean, corrupted) row pair.

    Args:
        clean, corrupted: model inputs with the same batch size (one pair per row); ``corrupted``
            may be a :class:`Corruption` (its edits apply to the corrupted run).
        metric: a :data:`Metric` on final-position logits, or ``"kl"`` (KL from the clean run).
        hook: a full hook name (``"lm.final_norm"``) or a short block-point name swept over layers
            (``"resid_pre"``, ``"attn_out"``, ``"z"``, ``"vision.resid_post"``).
        axes: ``("layer", "position")``, ``("layer", "span")``, ``("layer", "head")``, ``("position",)``, ...
        direction: ``"denoise"`` (clean -> corrupted run) or ``"noise"`` (corrupted -> clean run).
        batch_size: patched variants per forward pass.
        replay: reuse what a patch cannot change: for points in the LM's blocks, recompute only
            blocks l..L-1 and, under causal attention, only positions from the first patched one;
            for points after the encoders (projector, fusion), reuse the encoder outputs. ``False``
            runs every cell as a plain full forward.
        skip_unchanged: a cell whose source activation equals the target's bit for bit (e.g. every
            position before the first token where clean and corrupted prompts differ) is a no-op
            patch: its value is the unpatched target run's metric, and it is not recomputed.
        layers: sweep only these layers of a block point (default all).

    Returns:
        A :class:`SweepResult`; ``normalized`` is (value - target) / (source - target), the fraction of
        the gap between the unpatched target run and the source run that the patch moves.
    """
    axes = tuple(axes)
    if axes not in AXES:
        raise ValueError(f"axes {axes} not supported; use one of {sorted(AXES)}")
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    corruption = corrupted if isinstance(corrupted, Corruption) else Corruption(dict(corrupted), [], "given")
    clean = hooked.check_inputs(clean)
    corrupt_inputs = hooked.check_inputs(corruption.inputs)
    clean_spans, corrupt_spans = hooked.spans(clean), hooked.spans(corrupt_inputs)
    if "span" not in axes and any(hp.fused_positions for hp in _points(hooked, hook)):
        check_same_layout(clean_spans, corrupt_spans)
    points = _points(hooked, hook)
    if layers is not None:
        wanted = set(layers)
        points = [hp for hp in points if hp.layer in wanted]
        if not points:
            raise ValueError(f"layers {sorted(wanted)} select no layer of {hook!r}")
    names = [hp.name for hp in points]
    source_in, source_edits, target_in, target_edits = (
        (clean, [], corrupt_inputs, corruption.edits) if direction == "denoise" else (corrupt_inputs, corruption.edits, clean, []))
    target_spans = hooked.spans(target_in)
    n_pairs = clean_spans.batch_size
    decode = _token_text(hooked)
    use_replay = replay and {"lm.final_norm", "lm.logits"} <= set(hooked.hook_points) and all(
        hp.prefix == "lm" and hp.layer is not None and hp.kind in REPLAY_KINDS for hp in points)
    edited = [hooked.resolve(e.hook) for e in target_edits]
    use_frozen = replay and not use_replay and any(hp.stage == "encoder" for hp in hooked.hook_points.values()) \
        and all(hp.stage != "encoder" for hp in points + edited)
    rows = []
    clean_values, corrupt_values, skipped, method = [], [], 0, "full forwards"
    for pair in range(n_pairs):
        src, tgt = _row(source_in, pair), _row(target_in, pair)
        src_run = hooked.run(src, cache=names, edits=source_edits)
        clean_row = _row(clean, pair)
        clean_run_logits = src_run.logits if direction == "denoise" else hooked.run(clean_row).logits
        clean_logits = last_logits(clean_run_logits, clean_row.get("attention_mask"))
        pair_metric = kl_from(clean_logits) if metric == "kl" else metric
        if not callable(pair_metric):
            raise ValueError(f"metric must be a callable on final-position logits or 'kl', got {metric!r}")
        engine = _Replay(hooked) if use_replay else None
        frozen = _FrozenEncoders(hooked) if use_frozen else None
        target_names = names + ([f"lm.blocks.{len(engine.modules) - 1}.resid_post"] if engine else [])
        with engine.capture() if engine else frozen.record() if frozen else contextlib.nullcontext():
            tgt_run = hooked.run(tgt, cache=list(dict.fromkeys(target_names)), edits=target_edits)
        mask = tgt.get("attention_mask")
        last = int(mask[0].nonzero().max()) if mask is not None else tgt_run.logits.shape[1] - 1
        if engine is not None and not (engine.usable and engine.reproduces(
                tgt_run.cache[target_names[-1]], last_logits(tgt_run.logits, mask), last)):
            engine = None  # e.g. a head that pools positions: patched cells run full forwards
        if engine is not None:
            method = "replay + kv" if engine.reuse_kv else "replay"
        if frozen is not None and not frozen.active:
            frozen = None
        if frozen is not None:
            method = "full forwards, encoders cached"
        source_value = float(pair_metric(last_logits(src_run.logits, src.get("attention_mask")))[0])
        target_value = float(pair_metric(last_logits(tgt_run.logits, mask))[0])
        clean_v, corrupt_v = (source_value, target_value) if direction == "denoise" else (target_value, source_value)
        clean_values.append(clean_v)
        corrupt_values.append(corrupt_v)
        tokens = _row_tokens(decode, tgt, target_spans, pair)
        lengths = {n: src_run.cache[n].shape[1] for n in names if not hooked.hook_points[n].fused_positions
                   and src_run.cache[n].dim() >= 3}
        cells = _cells(hooked, points, axes, target_spans, pair, tokens, lengths)
        if "span" in axes:
            cells = [c for c in cells if c.positions is None or c.positions.any()]
        values = [target_value if skip_unchanged and _unchanged(c, src_run.cache[c.point], tgt_run.cache[c.point])
                  else None for c in cells]
        todo = [i for i, v in enumerate(values) if v is None]
        skipped += len(cells) - len(todo)
        bar = tqdm(range(0, len(todo), batch_size), desc=f"patching pair {pair}", disable=not progress)
        for start in bar:
            chunk = [cells[i] for i in todo[start:start + batch_size]]
            if engine is not None:
                logits = engine.patched_logits(chunk, {n: src_run.cache[n] for n in names}, tgt_run.cache, last)
            else:
                with frozen.replaying() if frozen else contextlib.nullcontext():
                    logits = _patched_full(hooked, tgt, target_edits, chunk, src_run, points)
            for i, v in zip(todo[start:start + batch_size], pair_metric(logits).float().cpu().tolist()):
                values[i] = v
        gap = source_value - target_value
        for cell, v in zip(cells, values):
            rows.append({"pair": pair, **cell.labels, "value": v,
                         "normalized": (v - target_value) / gap if gap != 0 else float("nan")})
    return SweepResult(table=pd.DataFrame(rows), clean=clean_values, corrupted=corrupt_values, direction=direction,
                       hook=hook, axes=axes, skipped=skipped, method=method)


def _token_text(hooked: HookedModel) -> Callable[[list[int]], list[str]]:
    tokenizer = hooked.tokenizer or getattr(hooked.processor, "tokenizer", None)
    return (lambda ids: [tokenizer.decode([i]) for i in ids]) if tokenizer is not None else (lambda ids: [str(i) for i in ids])


def _row_tokens(decode, inputs: Mapping[str, Any], spans: ModalitySpans, pair: int) -> list[str]:
    ids = inputs.get("input_ids")
    modality = spans.modality_of_positions()[pair]
    if ids is None:
        return [f"<{m}>" for m in modality]
    text = decode(ids[0].tolist())
    if len(text) == len(modality):
        return [t if m in ("text", "pad") else f"<{m}>" for t, m in zip(text, modality)]
    tokens = iter(text)  # fused positions not in input_ids (e.g. image patches prepended): ids fill text/pad in order
    text_like = sum(m in ("text", "pad") for m in modality)
    return [next(tokens) if m in ("text", "pad") and text_like == len(text) else f"<{m}>" for m in modality]


def _patched_full(hooked: HookedModel, target: dict, target_edits: list[Edit], chunk: list[Cell], src_run,
                  points: list[HookPoint]) -> Tensor:
    """Full batched forwards, one row per cell, with per-row patch edits."""
    batch = _repeat(target, len(chunk))
    by_point: dict[str, list[tuple[int, Cell]]] = {}
    for r, cell in enumerate(chunk):
        by_point.setdefault(cell.point, []).append((r, cell))
    edits = list(target_edits) + [_patch_edit(hooked.hook_points[p], rows, src_run.cache[p]) for p, rows in by_point.items()]
    run = hooked.run(batch, edits=edits)
    return last_logits(run.logits, batch.get("attention_mask"))


class _FrozenEncoders:
    """Encoder blocks that return their target-run outputs instead of computing, for batched runs
    whose patches all lie after the encoders (projector, fusion, LM).

    ``with frozen.record(): target_run = hooked.run(...)`` records each encoder block's output;
    inside ``with frozen.replaying():`` every such block returns that output, repeated to the batch
    (an input with the recorded batch size, e.g. a graph shared by all rows, gets it unchanged).
    """

    def __init__(self, hooked: HookedModel):
        paths = dict.fromkeys(hp.site.module for hp in hooked.hook_points.values()
                              if hp.stage == "encoder" and hp.layer is not None and hp.kind in ("resid_pre", "out"))
        self.modules = [get_module(hooked.model, path) for path in paths]
        self.outputs: dict[int, tuple[int, Any]] = {}

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


class _KVRecorder:
    """Passed as ``past_key_values`` to each block during the target run: records every attention
    layer's keys and values Float[b, kv_heads, seq, d_head] and returns them unchanged (a prefill)."""

    def __init__(self) -> None:
        self.entries: list[tuple[Tensor, Tensor]] = []

    def update(self, keys: Tensor, values: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        self.entries.append((keys, values))
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class _PrefixKV:
    """``past_key_values`` for a replay of positions ``start..``: each attention layer's new keys and
    values are appended to the target run's keys and values of positions ``< start`` (batch ``n``)."""

    def __init__(self, entries: list[tuple[Tensor, Tensor]], first_block: int, start: int, n: int) -> None:
        self.entries, self.first_block, self.start, self.n = entries, first_block, start, n
        self.calls = 0

    def update(self, keys: Tensor, values: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        old_k, old_v = self.entries[self.first_block + self.calls]
        self.calls += 1
        prefix_k = old_k[..., :self.start, :].expand(self.n, *old_k.shape[1:-2], self.start, old_k.shape[-1])
        prefix_v = old_v[..., :self.start, :].expand(self.n, *old_v.shape[1:-2], self.start, old_v.shape[-1])
        return torch.cat([prefix_k.to(keys.dtype), keys], dim=-2), torch.cat([prefix_v.to(values.dtype), values], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start


_POSITIONAL_KWARGS = {"position_ids": 1, "cache_position": 0, "position_embeddings": 1}
_KV_KWARGS = ("past_key_values", "cache")
"""A block's key/value-cache argument: ``past_key_values``, renamed ``cache`` in transformers 5.24."""
REPLAY_KINDS = {"resid_pre", "attn_out", "z", "resid_mid", "mlp_out", "resid_post"}


class _Replay:
    """Recompute only what a patch can change.

    A patch at block ``l`` (or inside it) cannot change blocks ``< l``, so the LM's blocks ``l..L-1``
    are re-run from the target run's residual stream at block ``l``, with the call arguments each
    block received in that run. Under causal attention a patch at position ``p`` cannot change
    positions ``< p`` either: the blocks then run on positions ``p0..`` only (``p0`` the earliest
    patched position of the batch), attending to the target run's keys and values for positions
    ``< p0``. Only the final position is normalized and unembedded.

    Use: ``with engine.capture(): target_run = hooked.run(...)`` records the block calls (and the
    keys/values) during the target run; then :meth:`patched_logits` per chunk of cells.
    """

    def __init__(self, hooked: HookedModel):
        self.hooked = hooked
        blocks = sorted((hp for hp in hooked.hook_points.values()
                         if hp.prefix == "lm" and hp.kind == "resid_pre" and hp.layer is not None), key=lambda hp: hp.layer)
        self.modules = [get_module(hooked.model, hp.site.module) for hp in blocks]
        self.hidden = [hp.site.kwarg or "hidden_states" for hp in blocks]
        self.norm = get_module(hooked.model, hooked.hook_points["lm.final_norm"].site.module)
        self.unembed = get_module(hooked.model, hooked.hook_points["lm.logits"].site.module)
        self.calls: list[dict[str, Any]] = []
        self.recorder = _KVRecorder()
        self.reuse_kv = False
        self.usable = True
        self.kv_kwarg = "past_key_values"

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Record the block calls of the forward run inside (the target run)."""
        self.calls, self.recorder = [], _KVRecorder()
        handles = [m.register_forward_pre_hook(self._capture, with_kwargs=True) for m in self.modules]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        self.usable = self.usable and len(self.calls) == len(self.modules)
        self.reuse_kv = self.usable and self._kv_reusable()

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        signature = inspect.signature(module.forward)
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            self.usable = False
            return None
        named: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    self.usable = False
                    return None
            else:
                named[name] = value
        layer = len(self.calls)
        if layer < len(self.hidden) and self.hidden[layer] not in named:
            first = next(iter(signature.parameters), None)  # e.g. ``x`` instead of ``hidden_states``
            if first is None or not isinstance(named.get(first), Tensor):
                self.usable = False
                return None
            self.hidden[layer] = first
        self.calls.append({k: v for k, v in named.items() if k not in _KV_KWARGS})
        kv = next((name for name in _KV_KWARGS if name in signature.parameters), None)
        if kv is None:
            return None
        self.kv_kwarg = kv
        return (), {**named, kv: self.recorder}

    @torch.no_grad()
    def reproduces(self, final_resid: Tensor, logits: Tensor, last: int) -> bool:
        """Whether normalizing and unembedding the final block's output Float[1, seq, d] at ``last``
        gives the model's final logits Float[1, vocab] (not so for heads that pool positions)."""
        mine = self.unembed(self.norm(final_resid[:, last]))
        if mine.shape != logits.shape:
            return False
        return bool((mine.float() - logits.float()).abs().max() <= 1e-4 * logits.float().abs().max() + 1e-5)

    def _kv_reusable(self) -> bool:
        """Keys/values can be reused when every block is causal self-attention that recorded them
        once, and every sequence-long call argument is one we know how to cut to a suffix."""
        if len(self.recorder.entries) != len(self.modules):
            return False
        for module in self.modules:
            flags = [m.is_causal for m in module.modules() if isinstance(getattr(m, "is_causal", None), bool)]
            if not flags or not all(flags):
                return False
        seq = self.calls[0][self.hidden[0]].shape[1]
        if any(k.shape[-2] != seq for k, _ in self.recorder.entries):
            return False
        for call, hidden in zip(self.calls, self.hidden):
            for name, value in call.items():
                if name == hidden or name in _POSITIONAL_KWARGS:
                    continue
                if name == "attention_mask":
                    if value is not None and not (value.dim() == 4 and value.shape[-2] == seq) and value.dim() != 2:
                        return False
                elif _has_seq_axis(value, seq):
                    return False
        return True

    def _block_kwargs(self, layer: int, start: int, n: int) -> dict[str, Any]:
        """Block ``layer``'s call arguments for queries at positions ``start..`` (batch ``n``)."""
        call = self.calls[layer]
        out = {k: v for k, v in call.items() if k != self.hidden[layer]}
        if self.reuse_kv:
            seq = call[self.hidden[layer]].shape[1]
            for name, axis in _POSITIONAL_KWARGS.items():
                if call.get(name) is not None:
                    out[name] = _cut(call[name], axis, start)
            mask = call.get("attention_mask")
            if mask is None:
                dtype = call[self.hidden[layer]].dtype
                allowed = torch.arange(start, seq)[:, None] >= torch.arange(seq)[None, :]
                mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
                out["attention_mask"] = mask[None, None].to(call[self.hidden[layer]].device)
            elif mask.dim() == 4:
                out["attention_mask"] = mask[..., start:, :]
            out[self.kv_kwarg] = _PrefixKV(self.recorder.entries, layer, start, n)
        return _expand(out, n)

    @torch.no_grad()
    def patched_logits(self, chunk: list[Cell], sources: dict[str, Tensor], target_cache: Mapping[str, Tensor],
                       last: int) -> Tensor:
        """Final-position logits Float[len(chunk), vocab] for the cells of ``chunk`` (``sources``:
        the source run's activation per point; ``last``: the final real position)."""
        results: dict[int, Tensor] = {}
        by_block: dict[int, list[tuple[int, Cell]]] = {}
        for r, cell in enumerate(chunk):
            hp = self.hooked.hook_points[cell.point]
            by_block.setdefault(cell.layer + 1 if hp.kind == "resid_post" else cell.layer, []).append((r, cell))
        n_blocks = len(self.modules)
        for block, rows in by_block.items():
            start = min(_first_position(cell) for _, cell in rows) if self.reuse_kv and block < n_blocks else 0
            base = self.calls[block][self.hidden[block]] if block < n_blocks else \
                target_cache[f"lm.blocks.{n_blocks - 1}.resid_post"]
            h = base[:, start:].expand(len(rows), base.shape[1] - start, *base.shape[2:]).clone()
            inner: dict[str, list[tuple[int, Cell]]] = {}
            for i, (_, cell) in enumerate(rows):
                if self.hooked.hook_points[cell.point].kind in ("resid_pre", "resid_post"):
                    _write(h, i, cell, sources[cell.point][:, start:], start)
                else:
                    inner.setdefault(cell.point, []).append((i, cell))
            edits = [_patch_edit(self.hooked.hook_points[p], cells, sources[p], start) for p, cells in inner.items()]
            with self.hooked.hooked(edits=edits) if edits else contextlib.nullcontext():
                for layer in range(block, n_blocks):
                    h = _first(self.modules[layer](**{self.hidden[layer]: h}, **self._block_kwargs(layer, start, len(rows))))
            logits = self.unembed(self.norm(h[:, last - start]))
            for i, (r, _) in enumerate(rows):
                results[r] = logits[i]
        return torch.stack([results[r] for r in range(len(chunk))])


def _first_position(cell: Cell) -> int:
    return 0 if cell.positions is None else int(cell.positions.nonzero()[0])


def _write(h: Tensor, row: int, cell: Cell, source: Tensor, start: int) -> None:
    """Write ``source`` (batch 1, positions ``start..``) into row ``row`` of ``h`` at the cell's positions."""
    source = source.to(h.device, h.dtype)
    if cell.positions is None:
        h[row] = source[0]
    else:
        pos = cell.positions[start:].to(h.device)
        h[row, pos] = source[0, pos]


def _cut(value: Any, axis: int, start: int) -> Any:
    """``value`` (a tensor or a tuple of them) from index ``start`` on along ``axis``."""
    if isinstance(value, tuple):
        return tuple(_cut(v, axis, start) for v in value)
    return value.narrow(axis, start, value.shape[axis] - start)


def _has_seq_axis(value: Any, seq: int) -> bool:
    if isinstance(value, (tuple, list)):
        return any(_has_seq_axis(v, seq) for v in value)
    return isinstance(value, Tensor) and seq > 1 and seq in value.shape[1:]



def _expand(kwargs: dict, n: int) -> dict:
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == 1 and k != "cache_position":
            out[k] = v.expand(n, *v.shape[1:])
        elif isinstance(v, tuple) and all(isinstance(t, Tensor) for t in v):
            out[k] = tuple(t.expand(n, *t.shape[1:]) if t.dim() > 0 and t.shape[0] == 1 else t for t in v)
        else:
            out[k] = v
    return out


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


# -- attribution patching ---------------------------------------------------------------------------

def attribution_patch(hooked: HookedModel, clean: Mapping[str, Any], corrupted: Mapping[str, Any] | Corruption,
                      metric: Metric, *, hook: str = "resid_pre", axes: Sequence[str] = ("layer", "position")) -> SweepResult:
    """Attribution patching (Nanda 2023): the denoising effect of each cell estimated to first order,
    ``(clean_act - corrupted_act) . d metric / d act`` at the corrupted run, from one forward and one
    backward pass per pair. Same table layout as :func:`sweep` (``value`` is the estimated metric
    after patching, ``effect`` the estimated change)."""
    axes = tuple(axes)
    corruption = corrupted if isinstance(corrupted, Corruption) else Corruption(dict(corrupted), [], "given")
    clean = hooked.check_inputs(clean)
    corrupt_inputs = hooked.check_inputs(corruption.inputs)
    spans = hooked.spans(corrupt_inputs)
    check_same_layout(hooked.spans(clean), spans)
    points = _points(hooked, hook)
    names = [hp.name for hp in points]
    decode = _token_text(hooked)
    rows, clean_values, corrupt_values = [], [], []
    for pair in range(spans.batch_size):
        c, x = _row(clean, pair), _row(corrupt_inputs, pair)
        clean_run = hooked.run(c, cache=names)
        run = hooked.run(x, cache=names, edits=corruption.edits, keep_grad=True)
        output = metric(last_logits(run.logits, x.get("attention_mask")))[0]
        grads = torch.autograd.grad(output, [run.cache[n] for n in names])
        value = output.item()
        clean_v = float(metric(last_logits(clean_run.logits, c.get("attention_mask")))[0])
        clean_values.append(clean_v)
        corrupt_values.append(value)
        tokens = _row_tokens(decode, x, spans, pair)
        lengths = {n: run.cache[n].shape[1] for n in names if not hooked.hook_points[n].fused_positions
                   and run.cache[n].dim() >= 3}
        cells = _cells(hooked, points, axes, spans, pair, tokens, lengths)
        for cell in cells:
            i = names.index(cell.point)
            contrib = (clean_run.cache[cell.point] - run.cache[cell.point].detach()) * grads[i]
            contrib = contrib[0]
            if cell.head is not None:
                contrib = contrib[:, cell.head]
            if cell.positions is not None:
                contrib = contrib[cell.positions.to(contrib.device)]
            effect = float(contrib.sum())
            gap = clean_v - value
            rows.append({"pair": pair, **cell.labels, "value": value + effect, "effect": effect,
                         "normalized": effect / gap if gap != 0 else float("nan")})
    return SweepResult(pd.DataFrame(rows), clean_values, corrupt_values, "denoise", hook, axes)


@dataclass
class EdgeScores:
    """What :func:`edge_attribution_patch` returns.

    Attributes:
        table: one row per (pair, sender, receiver[, span]): ``score`` (the estimated change of the
            metric when only that edge carries the clean value into the corrupted run, at the
            sender positions of ``span``), ``normalized`` (score / (clean - corrupted)).
        clean, corrupted: the metric on the unpatched runs, per pair.
        nodes: node names in order (the residual stream's input, then each block's attention and MLP,
            then ``lm.final_norm``, the logits' input); senders are all but the last, receivers all
            but the first.
    """

    table: pd.DataFrame
    clean: list[float]
    corrupted: list[float]
    nodes: list[str]

    def matrix(self, pair: int = 0, span: str | None = None, value: str = "score") -> pd.DataFrame:
        """Senders x receivers for one pair (summed over spans unless ``span`` is given); NaN where
        no edge exists (a receiver before its sender)."""
        sub = self.table[self.table.pair == pair]
        if span is not None:
            if "span" not in sub.columns:
                raise ValueError("these scores are not split by span; call edge_attribution_patch(..., by='span')")
            sub = sub[sub.span == span]
        summed = sub.groupby(["sender", "receiver"], sort=False)[value].sum(min_count=1)
        grid = summed.unstack("receiver")
        return grid.reindex(index=self.nodes[:-1], columns=self.nodes[1:])

    def top(self, k: int = 10, pair: int = 0) -> pd.DataFrame:
        """The ``k`` edges with the largest |score| for one pair."""
        sub = self.table[self.table.pair == pair]
        return sub.reindex(sub.score.abs().sort_values(ascending=False).index).head(k).reset_index(drop=True)


def edge_attribution_patch(hooked: HookedModel, clean: Mapping[str, Any], corrupted: Mapping[str, Any] | Corruption,
                           metric: Metric, *, by: str = "edge") -> EdgeScores:
    """Edge attribution patching (Syed et al. 2023) between the LM's components.

    Nodes are the residual stream's input (``lm.blocks.0.resid_pre``: token, image or graph
    embeddings), every block's attention (``attn_out``) and MLP (``mlp_out``), and the logits' input
    (``lm.final_norm``). The edge u -> v is scored ``(u_clean - u_corrupted) . dmetric/d(input of v)``
    at the corrupted run, from one forward and one backward pass per pair, where the gradient is the
    one reaching v's input through v only: ``g(resid_pre) - g(resid_mid)`` for an attention,
    ``g(resid_mid) - g(resid_post)`` for an MLP. Summed over receivers, a sender's scores equal
    node attribution patching of its output (:func:`attribution_patch`), up to round-off.

    Args:
        by: ``"edge"`` (sum over positions) or ``"span"`` (one score per modality span of the sender
            positions: how much of the edge's effect comes from image, text or graph positions).
    """
    if by not in ("edge", "span"):
        raise ValueError(f"by must be 'edge' or 'span', got {by!r}")
    corruption = corrupted if isinstance(corrupted, Corruption) else Corruption(dict(corrupted), [], "given")
    clean = hooked.check_inputs(clean)
    corrupt_inputs = hooked.check_inputs(corruption.inputs)
    spans = hooked.spans(corrupt_inputs)
    check_same_layout(hooked.spans(clean), spans)
    layers = sorted(hp.layer for hp in hooked.hook_points.values()
                    if hp.prefix == "lm" and hp.kind == "resid_pre" and hp.layer is not None)
    missing = [f"lm.blocks.{i}.{k}" for i in layers for k in ("attn_out", "resid_mid", "mlp_out", "resid_post")
               if f"lm.blocks.{i}.{k}" not in hooked.hook_points]
    if not layers or missing:
        raise ValueError(f"edge attribution needs the LM's attention/MLP/residual points; this adapter lacks {missing[:4]}")
    nodes = ["lm.blocks.0.resid_pre"] + [f"lm.blocks.{i}.{k}" for i in layers for k in ("attn_out", "mlp_out")] \
        + ["lm.final_norm"]
    senders = nodes[:-1]
    resid = [f"lm.blocks.{i}.{k}" for i in layers for k in ("resid_pre", "resid_mid")] + [f"lm.blocks.{layers[-1]}.resid_post"]
    # receiver inputs' gradients: attn_j = g(resid_pre_j) - g(resid_mid_j); mlp_j = g(resid_mid_j) - g(resid_pre_j+1)
    rows, clean_values, corrupt_values = [], [], []
    for pair in range(spans.batch_size):
        c, x = _row(clean, pair), _row(corrupt_inputs, pair)
        clean_run = hooked.run(c, cache=senders)
        run = hooked.run(x, cache=list(dict.fromkeys(senders + resid)), edits=corruption.edits, keep_grad=True)
        output = metric(last_logits(run.logits, x.get("attention_mask")))[0]
        grads = torch.autograd.grad(output, [run.cache[n] for n in resid])
        receiver_grads = torch.stack([grads[i] - grads[i + 1] for i in range(len(grads) - 1)] + [grads[-1]])[:, 0]
        deltas = torch.stack([(clean_run.cache[n] - run.cache[n].detach())[0] for n in senders])
        per_position = torch.einsum("std,rtd->srt", deltas.double(), receiver_grads.double())  # [sender, receiver, pos]
        groups = {m: spans.masks[m][pair] for m in spans.modalities} if by == "span" else {None: spans.valid[pair]}
        clean_v = float(metric(last_logits(clean_run.logits, c.get("attention_mask")))[0])
        gap = clean_v - output.item()
        clean_values.append(clean_v)
        corrupt_values.append(output.item())
        for label, mask in groups.items():
            scores = per_position[:, :, mask.to(per_position.device)].sum(-1).cpu()
            for s, sender in enumerate(senders):
                for r, receiver in enumerate(nodes[1:]):
                    if r + 1 <= s:  # the receiver comes before the sender (or is the sender)
                        continue
                    score = float(scores[s, r])
                    rows.append({"pair": pair, "sender": sender, "receiver": receiver,
                                 **({"span": label} if by == "span" else {}), "score": score,
                                 "normalized": score / gap if gap != 0 else float("nan")})
    return EdgeScores(pd.DataFrame(rows), clean_values, corrupt_values, nodes)


def correlation(estimate: SweepResult, exact: SweepResult, value: str = "value") -> dict[str, float]:
    """Pearson and Spearman correlation between two sweeps over the same cells (e.g. attribution vs
    exact patching), plus the largest absolute difference."""
    keys = [c for c in exact.table.columns if c not in ("value", "normalized", "effect", "token", "modality")]
    merged = exact.table.merge(estimate.table, on=keys, suffixes=("_exact", "_estimate"))
    if len(merged) != len(exact.table):
        raise ValueError(f"the sweeps cover different cells ({len(estimate.table)} vs {len(exact.table)})")
    a, b = merged[f"{value}_exact"], merged[f"{value}_estimate"]
    return {"pearson": float(a.corr(b)), "spearman": float(a.rank().corr(b.rank())),
            "max_abs_diff": float((a - b).abs().max()), "n_cells": len(merged)}


# -- path patching ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Component:
    """A component: a hook point with optional positions (any span selector) and heads."""

    hook: str
    at: Any = None
    heads: Any = None


def path_patch(hooked: HookedModel, clean: Mapping[str, Any], corrupted: Mapping[str, Any] | Corruption,
               metric: Metric, senders: Sequence[Component], receivers: Sequence[Component],
               frozen: str = "lm.blocks.*") -> float:
    """Path patching (Wang et al. 2022; Goldowsky-Dill et al. 2023): the metric on the clean run when
    only the paths from ``senders`` to ``receivers`` carry corrupted activations.

    1. Run clean and corrupted, caching everything.
    2. Run clean with the senders set to their corrupted values and every other attention/MLP output
       (``attn_out``/``mlp_out`` points matching ``frozen``) held at its clean value; record the
       receivers' values.
    3. Run clean with only the receivers set to the values recorded in step 2.

    Returns the metric of step 3 (for the first pair). With no senders it equals the clean metric.
    """
    corruption = corrupted if isinstance(corrupted, Corruption) else Corruption(dict(corrupted), [], "given")
    clean = hooked.check_inputs(_row(clean, 0))
    corrupt_inputs = hooked.check_inputs(_row(corruption.inputs, 0))
    check_same_layout(hooked.spans(clean), hooked.spans(corrupt_inputs))
    sender_hooks = [hooked.resolve(s.hook).name for s in senders]
    receiver_hooks = [hooked.resolve(r.hook).name for r in receivers]
    freeze = [n for n, hp in hooked.hook_points.items() if hp.kind in ("attn_out", "mlp_out")
              and fnmatch.fnmatchcase(n, frozen) and n not in sender_hooks]
    clean_run = hooked.run(clean, cache=freeze + sender_hooks + receiver_hooks)
    corrupt_run = hooked.run(corrupt_inputs, cache=sender_hooks, edits=corruption.edits)
    edits = [replace(n, clean_run.cache[n]) for n in freeze]
    edits += [replace(s_hook, _select(corrupt_run.cache[s_hook], clean_run.cache[s_hook], s, hooked, clean))
              for s, s_hook in zip(senders, sender_hooks)]
    step2 = hooked.run(clean, cache=receiver_hooks, edits=edits)
    final_edits = [replace(r_hook, _select(step2.cache[r_hook], clean_run.cache[r_hook], r, hooked, clean))
                   for r, r_hook in zip(receivers, receiver_hooks)]
    patched = hooked.run(clean, edits=final_edits)
    return float(metric(last_logits(patched.logits, clean.get("attention_mask")))[0])


def _select(new: Tensor, old: Tensor, component: Component, hooked: HookedModel, inputs: dict) -> Tensor:
    """``old`` with ``new`` written at the component's positions/heads (a full-shape value)."""
    if component.at is None and component.heads is None:
        return new
    hp = hooked.resolve(component.hook)
    out = old.clone()
    mask = hooked.spans(inputs).mask(component.at) if component.at is not None else torch.ones(old.shape[:2], dtype=torch.bool)
    mask = mask.to(old.device)
    if component.heads is None:
        out[mask] = new[mask]
    else:
        heads = [component.heads] if isinstance(component.heads, int) else list(component.heads)
        if not hp.heads or old.dim() != 4:
            raise ValueError(f"heads= needs a per-head point such as 'lm.blocks.3.z'; {hp.name!r} has no head axis")
        for h in heads:
            out[:, :, h][mask] = new[:, :, h][mask]
    return out


__all__ = ["Component", "Corruption", "EdgeScores", "SweepResult", "attribution_patch", "check_same_layout", "correlation",
           "corrupt", "edge_attribution_patch", "kl_from", "last_logits", "logit_diff", "logprob", "path_patch", "prob", "sweep"]
