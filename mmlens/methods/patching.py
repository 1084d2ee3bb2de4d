"""Activation, path and attribution patching over every stage, batched and reusing what it can.

Vocabulary: a *pair* is (clean, corrupted) inputs. **Denoising** runs the corrupted input with
clean activations patched in (which component restores the clean behaviour?); **noising** runs the
clean input with corrupted activations patched in (which component is necessary?). A *cell* is one
patch: a hook point's layer, a position (or a modality span) and optionally a head.

Speed (``sweep``): all cells of one pair are patched in batched forwards (``batch_size`` variants
per pass). For points in the language model's blocks (residual stream, attention/MLP outputs,
heads) the sweep replays only blocks ``l..L-1`` from the target run's residual stream at block
``l`` (:class:`mmlens.core.replay.BlockReplay`): the earlier blocks, and any encoder or projector
before the LM, are never recomputed. When the adapter says the LM is causal it also replays only
positions from the first patched one on, with the keys and values of earlier positions taken from
the target run. Only the final position is unembedded. Cells
whose source activation equals the target's (no-op patches) are not run at all. Replay matches a
full forward to float round-off; ``tests/test_patching.py`` checks it on every kind of point.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mmlens.core.adapter import HookPoint
from mmlens.core.edits import Edit, HookContext, Where, add, apply, replace, selection_mask, where_selected
from mmlens.core.inputs import check_count
from mmlens.core.replay import BlockReplay, FrozenEncoders
from mmlens.core.spans import ModalitySpans
from mmlens.core.wrapper import HookedModel, RunResult

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


# -- corruptions ----------------------------------------------------------------------------------


@dataclass
class Corruption:
    """A corrupted input: inputs to run, plus edits applied during the run (for embedding noise)."""

    inputs: dict
    edits: list[Edit]
    description: str


def corrupt(
    hooked: HookedModel,
    inputs: Mapping[str, Any],
    modality: str,
    method: str = "neutral",
    *,
    other: Mapping[str, Any] | None = None,
    noise: float = 3.0,
    seed: int = 0,
) -> Corruption:
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
        return Corruption(
            _swap(hooked, inputs, other, spans, modality), [], f"{modality}: swapped with another example"
        )
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


def _swap(hooked: HookedModel, inputs: dict, other: dict, spans: ModalitySpans, modality: str) -> dict:
    """``inputs`` with the input keys of ``modality`` (``Adapter.modality_inputs``) taken from ``other``:
    keys laid out along the fused sequence ([b, seq], e.g. token ids) at that modality's positions,
    the others whole."""
    keys = hooked.adapter.modality_inputs.get(modality)
    if not keys:
        raise KeyError(
            f"adapter {hooked.adapter.name!r} does not say which inputs carry {modality!r} (modality_inputs)"
        )
    mask = spans.masks[modality]
    swapped = dict(inputs)
    for k in keys:
        if k not in other:
            continue
        own, new = inputs.get(k), other[k]
        if isinstance(own, Tensor) and own.shape == mask.shape and own.shape == new.shape:
            swapped[k] = torch.where(mask.to(own.device), new, own)
        else:
            swapped[k] = new
    return swapped


def check_same_layout(a: ModalitySpans, b: ModalitySpans, name_a: str = "clean", name_b: str = "corrupted") -> None:
    """Raise if two inputs' spans do not line up position by position."""
    if a.valid.shape != b.valid.shape:
        raise ValueError(
            f"{name_a} and {name_b} inputs have different shapes [batch, seq]: {tuple(a.valid.shape)} vs "
            f"{tuple(b.valid.shape)}; pad them to the same length, or patch by span (axes=('layer', 'span'))"
        )
    if not a.same_layout(b):
        counts = {m: (a.masks[m].sum(1).tolist(), b.masks[m].sum(1).tolist()) for m in a.masks if m in b.masks}
        raise ValueError(
            f"{name_a} and {name_b} spans do not line up (positions per modality, {name_a} vs {name_b}: "
            f"{counts}); use inputs with the same layout, or patch by span (axes=('layer', 'span'))"
        )


# -- sweeps ---------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One patch of a sweep: ``where`` (its hook point, positions ``at`` Bool[seq] or None = all, and
    head ``heads`` or None = all), the ``layer`` (None for points without one), and labels for the table."""

    where: Where
    layer: int | None
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
            ``"replay"`` (blocks l..L-1; also when the adapter says the LM is not causal) or
            ``"replay + kv"`` (blocks l..L-1 on positions from the first patched one).
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


AXES = {
    ("layer", "position"),
    ("layer", "span"),
    ("layer", "head"),
    ("position",),
    ("layer",),
    ("span",),
    ("head",),
    ("layer", "position", "head"),
}


def points(hooked: HookedModel, hook: str) -> list[HookPoint]:
    """The hook points ``hook`` names: a full name (one point) or a short block-point name (every
    layer of it, in layer order)."""
    if hook in hooked.hook_points:
        return [hooked.hook_points[hook]]
    prefix, kind = hook.rsplit(".", 1) if "." in hook else ("lm", hook)
    found = [
        hp for hp in hooked.hook_points.values() if hp.prefix == prefix and hp.kind == kind and hp.layer is not None
    ]
    if not found:
        return [hooked.resolve(hook)]
    return sorted(found, key=lambda hp: hp.layer)


def _cells(
    hooked: HookedModel,
    points: list[HookPoint],
    axes: tuple[str, ...],
    spans: ModalitySpans,
    row: int,
    tokens: list[str],
    encoder_lengths: dict[str, int] | None = None,
) -> list[Cell]:
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
                    labels.update(
                        position=key, token=f"<{hp.modality or hp.stage} {key}>", modality=hp.modality or hp.stage
                    )
                if "span" in axes:
                    labels["span"] = key
                if head is not None:
                    labels["head"] = head
                cells.append(Cell(Where(hp.name, mask, head), layer, labels))
    return cells


def _patch_edit(hp: HookPoint, rows: list[tuple[int, Cell]], source: Tensor, start: int = 0) -> Edit:
    """One edit at ``hp`` that patches row r of the batch with ``source`` (the activation from the
    other run, batch 1) at that row's cell; ``start``: the run covers positions ``start..`` only."""

    def fn(act: Tensor, ctx: HookContext) -> Tensor:
        out = act.clone()
        src = source[:, start:].to(act.device, act.dtype) if start else source.to(act.device, act.dtype)
        for r, cell in rows:
            mask = _cell_mask(cell, hp, out[r : r + 1], start)
            out[r : r + 1] = where_selected(mask, src, out[r : r + 1])
        return out

    return apply(hp.name, fn)


def _cell_mask(cell: Cell, hp: HookPoint, act: Tensor, start: int = 0) -> Tensor | None:
    """The cell's (positions x heads) mask over ``act`` Float[1, seq - start, ...] (None: all of it)."""
    return selection_mask(cell.where, act, hp, lambda at: at[start:].to(act.device)[None])


def _unchanged(cell: Cell, hp: HookPoint, source: Tensor, target: Tensor) -> bool:
    """Whether patching ``cell`` writes exactly the value already there (source == target, batch 1)."""
    if source.shape != target.shape:
        return False
    mask = _cell_mask(cell, hp, source)
    return torch.equal(source, target) if mask is None else torch.equal(source[mask], target[mask])


@dataclass
class _PairRuns:
    """One pair's unpatched runs (one row each), its metric, and what replays the target run's
    patched variants (a :class:`BlockReplay`, :class:`FrozenEncoders`, or neither: full forwards)."""

    target: dict
    source_run: RunResult
    target_run: RunResult
    metric: Metric
    source_value: float
    target_value: float
    engine: BlockReplay | None
    frozen: FrozenEncoders | None

    @property
    def method(self) -> str:
        if self.engine is not None:
            return self.engine.method
        return "full forwards, encoders cached" if self.frozen is not None else "full forwards"


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
        replay: reuse what a patch cannot change (:mod:`mmlens.core.replay`): for points in the LM's
            blocks, recompute only blocks l..L-1 and, when the adapter says the LM is causal, only
            positions from the first patched one; for points after the encoders (projector,
            fusion), reuse the encoder outputs. ``False`` runs every cell as a plain full forward.
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
    check_count("batch_size", batch_size, hint="it is the number of patched variants per forward pass")
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    corruption = _as_corruption(corrupted)
    clean = hooked.check_inputs(clean)
    corrupt_inputs = hooked.check_inputs(corruption.inputs)
    clean_spans = hooked.spans(clean)
    swept = _select_layers(points(hooked, hook), layers, hook)
    shared = [hp.name for hp in swept if "batch" not in hp.axes]
    if shared:
        raise ValueError(
            f"sweep patches one batch row per variant, but {shared[:3]} have no batch axis (laid out "
            f"{list(hooked.hook_points[shared[0]].axes)}: shared by every row); patch them with hooked.run(edits=...)"
        )
    if "span" not in axes and any(hp.fused_positions for hp in swept):
        check_same_layout(clean_spans, hooked.spans(corrupt_inputs))
    source, target = _source_and_target(clean, corrupt_inputs, corruption.edits, direction)
    reuse = _reuse(hooked, swept, target[1]) if replay else None
    target_spans = hooked.spans(target[0])
    rows, clean_values, corrupt_values, skipped, method = [], [], [], 0, "full forwards"
    for pair in range(clean_spans.batch_size):
        runs = _pair_runs(hooked, pair, clean, source, target, direction, metric, swept, reuse)
        method = runs.method if runs.method != "full forwards" else method
        pair_values = (runs.source_value, runs.target_value)
        clean_v, corrupt_v = pair_values if direction == "denoise" else pair_values[::-1]
        clean_values.append(clean_v)
        corrupt_values.append(corrupt_v)
        cells = _pair_cells(hooked, swept, axes, target_spans, pair, runs)
        bar = {"desc": f"patching pair {pair}", "disable": not progress}
        values, n_skipped = _cell_values(hooked, runs, cells, target[1], batch_size, skip_unchanged, tqdm_options=bar)
        skipped += n_skipped
        rows += _sweep_rows(pair, cells, values, runs)
    return SweepResult(pd.DataFrame(rows), clean_values, corrupt_values, direction, hook, axes, skipped, method)


def _as_corruption(corrupted: Mapping[str, Any] | Corruption) -> Corruption:
    return corrupted if isinstance(corrupted, Corruption) else Corruption(dict(corrupted), [], "given")


def _select_layers(swept: list[HookPoint], layers: Sequence[int] | None, hook: str) -> list[HookPoint]:
    """The points of ``swept`` at ``layers`` (all when None)."""
    if layers is None:
        return swept
    wanted = set(layers)
    chosen = [hp for hp in swept if hp.layer in wanted]
    if not chosen:
        raise ValueError(f"layers {sorted(wanted)} select no layer of {hook!r}")
    return chosen


def _source_and_target(
    clean: dict, corrupt_inputs: dict, corrupt_edits: list[Edit], direction: str
) -> tuple[tuple[dict, list[Edit]], tuple[dict, list[Edit]]]:
    """The (inputs, edits) of the run patches come from and of the run they go into: clean into
    corrupted for denoising, corrupted into clean for noising."""
    source, target = (clean, []), (corrupt_inputs, corrupt_edits)
    return (target, source) if direction == "noise" else (source, target)


def _reuse(hooked: HookedModel, swept: list[HookPoint], target_edits: list[Edit]) -> str | None:
    """What a replay of the target run can reuse: ``"blocks"`` (:class:`BlockReplay`), ``"encoders"``
    (:class:`FrozenEncoders`) or nothing."""
    if BlockReplay.supports(hooked, swept):
        return "blocks"
    edited = [hooked.resolve(e.hook) for e in target_edits]
    return "encoders" if FrozenEncoders.supports(hooked, swept + edited) else None


def _pair_runs(
    hooked: HookedModel,
    pair: int,
    clean: dict,
    source: tuple[dict, list[Edit]],
    target: tuple[dict, list[Edit]],
    direction: str,
    metric: Metric | str,
    swept: list[HookPoint],
    reuse: str | None,
) -> _PairRuns:
    """Run row ``pair`` of the source and the target inputs (the target run recorded for reuse)."""
    names = [hp.name for hp in swept]
    src, tgt = hooked.rows(source[0], pair), hooked.rows(target[0], pair)
    src_run = hooked.run(src, cache=names, edits=source[1])
    clean_row = hooked.rows(clean, pair)
    clean_logits = hooked.readout_logits(
        src_run.logits if direction == "denoise" else hooked.run(clean_row).logits, clean_row
    )
    pair_metric = kl_from(clean_logits) if metric == "kl" else metric
    if not callable(pair_metric):
        raise TypeError(f"metric must be a callable on final-position logits or 'kl', got {metric!r}")
    engine = BlockReplay(hooked) if reuse == "blocks" else None
    frozen = FrozenEncoders(hooked) if reuse == "encoders" else None
    cache = list(dict.fromkeys(names + ([engine.final_point] if engine else [])))
    with engine.capture() if engine else frozen.record() if frozen else contextlib.nullcontext():
        tgt_run = hooked.run(tgt, cache=cache, edits=target[1])
    if engine is not None and not engine.ready(tgt_run, tgt):
        engine = None  # e.g. a head that pools positions: patched cells run full forwards
    if frozen is not None and not frozen.active:
        frozen = None
    return _PairRuns(
        tgt,
        src_run,
        tgt_run,
        pair_metric,
        float(pair_metric(hooked.readout_logits(src_run.logits, src))[0]),
        float(pair_metric(hooked.readout_logits(tgt_run.logits, tgt))[0]),
        engine,
        frozen,
    )


def _pair_cells(
    hooked: HookedModel, swept: list[HookPoint], axes: tuple[str, ...], spans: ModalitySpans, pair: int, runs: _PairRuns
) -> list[Cell]:
    """The cells of one pair (spans it lacks left out)."""
    cache = runs.source_run.cache
    lengths = {hp.name: cache[hp.name].shape[1] for hp in swept if not hp.fused_positions and cache[hp.name].dim() >= 3}
    cells = _cells(hooked, swept, axes, spans, pair, hooked.position_labels(runs.target)[0], lengths)
    return [c for c in cells if c.where.at is None or c.where.at.any()] if "span" in axes else cells


def _cell_values(
    hooked: HookedModel,
    runs: _PairRuns,
    cells: list[Cell],
    target_edits: list[Edit],
    batch_size: int,
    skip_unchanged: bool,
    tqdm_options: dict,
) -> tuple[list[float], int]:
    """The metric with each cell patched, in batches, and how many no-op cells were skipped."""
    values = [
        runs.target_value
        if skip_unchanged
        and _unchanged(
            c,
            hooked.hook_points[c.where.hook],
            runs.source_run.cache[c.where.hook],
            runs.target_run.cache[c.where.hook],
        )
        else None
        for c in cells
    ]
    todo = [i for i, v in enumerate(values) if v is None]
    for start in tqdm(range(0, len(todo), batch_size), **tqdm_options):
        chunk = [cells[i] for i in todo[start : start + batch_size]]
        if runs.engine is not None:
            logits = _replayed_logits(hooked, runs.engine, chunk, runs.source_run.cache)
        else:
            with runs.frozen.replaying() if runs.frozen else contextlib.nullcontext():
                logits = _patched_full(hooked, runs.target, target_edits, chunk, runs.source_run.cache)
        for i, v in zip(todo[start : start + batch_size], runs.metric(logits).float().cpu().tolist()):
            values[i] = v
    return values, len(cells) - len(todo)


def _sweep_rows(pair: int, cells: list[Cell], values: list[float], runs: _PairRuns) -> list[dict]:
    """One pair's rows of the :class:`SweepResult` table: each cell's labels, value and normalized value."""
    gap = runs.source_value - runs.target_value
    return [
        {
            "pair": pair,
            **cell.labels,
            "value": v,
            "normalized": (v - runs.target_value) / gap if gap != 0 else float("nan"),
        }
        for cell, v in zip(cells, values)
    ]


def _patched_full(
    hooked: HookedModel, target: dict, target_edits: list[Edit], chunk: list[Cell], sources: Mapping[str, Tensor]
) -> Tensor:
    """Full batched forwards, one row per cell, with per-row patch edits."""
    batch = hooked.repeat(target, len(chunk))
    by_point: dict[str, list[tuple[int, Cell]]] = {}
    for r, cell in enumerate(chunk):
        by_point.setdefault(cell.where.hook, []).append((r, cell))
    edits = list(target_edits) + [_patch_edit(hooked.hook_points[p], rows, sources[p]) for p, rows in by_point.items()]
    run = hooked.run(batch, edits=edits)
    return hooked.readout_logits(run.logits, batch)


def _replayed_logits(
    hooked: HookedModel, engine: BlockReplay, chunk: list[Cell], sources: Mapping[str, Tensor]
) -> Tensor:
    """Readout logits Float[len(chunk), vocab] of the target run with each cell patched, replayed from
    the cell's block (and, with keys/values reused, from the chunk's first patched position) on."""
    results: dict[int, Tensor] = {}
    by_block: dict[int, list[tuple[int, Cell]]] = {}
    for r, cell in enumerate(chunk):
        hp = hooked.hook_points[cell.where.hook]
        by_block.setdefault(cell.layer + 1 if hp.kind == "resid_post" else cell.layer, []).append((r, cell))
    for block, rows in by_block.items():
        start = engine.start(block, min(_first_position(cell) for _, cell in rows))
        base = engine.block_input(block)
        h = base[:, start:].expand(len(rows), base.shape[1] - start, *base.shape[2:]).clone()
        inner: dict[str, list[tuple[int, Cell]]] = {}
        for i, (_, cell) in enumerate(rows):
            hp = hooked.hook_points[cell.where.hook]
            if hp.kind in ("resid_pre", "resid_post"):
                mask = _cell_mask(cell, hp, h[i : i + 1], start)
                h[i : i + 1] = where_selected(mask, sources[hp.name][:, start:].to(h.device, h.dtype), h[i : i + 1])
            else:
                inner.setdefault(hp.name, []).append((i, cell))
        edits = [_patch_edit(hooked.hook_points[p], cells, sources[p], start) for p, cells in inner.items()]
        logits = engine.logits(h, block, start, edits)
        for i, (r, _) in enumerate(rows):
            results[r] = logits[i]
    return torch.stack([results[r] for r in range(len(chunk))])


def _first_position(cell: Cell) -> int:
    return 0 if cell.where.at is None else int(cell.where.at.nonzero()[0])


# -- attribution patching ---------------------------------------------------------------------------


def attribution_patch(
    hooked: HookedModel,
    clean: Mapping[str, Any],
    corrupted: Mapping[str, Any] | Corruption,
    metric: Metric,
    *,
    hook: str = "resid_pre",
    axes: Sequence[str] = ("layer", "position"),
) -> SweepResult:
    """Attribution patching (Nanda 2023): the denoising effect of each cell estimated to first order,
    ``(clean_act - corrupted_act) . d metric / d act`` at the corrupted run, from one forward and one
    backward pass per pair. Same table layout as :func:`sweep` (``value`` is the estimated metric
    after patching, ``effect`` the estimated change)."""
    axes = tuple(axes)
    corruption = _as_corruption(corrupted)
    clean = hooked.check_inputs(clean)
    corrupt_inputs = hooked.check_inputs(corruption.inputs)
    spans = hooked.spans(corrupt_inputs)
    check_same_layout(hooked.spans(clean), spans)
    swept = points(hooked, hook)
    names = [hp.name for hp in swept]
    rows, clean_values, corrupt_values = [], [], []
    for pair in range(spans.batch_size):
        c, x = hooked.rows(clean, pair), hooked.rows(corrupt_inputs, pair)
        clean_run = hooked.run(c, cache=names)
        run = hooked.run(x, cache=names, edits=corruption.edits, keep_grad=True)
        output = metric(hooked.readout_logits(run.logits, x))[0]
        grads = torch.autograd.grad(output, [run.cache[n] for n in names])
        value = output.item()
        clean_v = float(metric(hooked.readout_logits(clean_run.logits, c))[0])
        clean_values.append(clean_v)
        corrupt_values.append(value)
        tokens = hooked.position_labels(x)[0]
        lengths = {
            n: run.cache[n].shape[1]
            for n in names
            if not hooked.hook_points[n].fused_positions and run.cache[n].dim() >= 3
        }
        cells = _cells(hooked, swept, axes, spans, pair, tokens, lengths)
        for cell in cells:
            name = cell.where.hook
            contrib = (clean_run.cache[name] - run.cache[name].detach()) * grads[names.index(name)]
            mask = _cell_mask(cell, hooked.hook_points[name], contrib)
            effect = float((contrib if mask is None else contrib[mask]).sum())
            gap = clean_v - value
            rows.append(
                {
                    "pair": pair,
                    **cell.labels,
                    "value": value + effect,
                    "effect": effect,
                    "normalized": effect / gap if gap != 0 else float("nan"),
                }
            )
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


def edge_attribution_patch(
    hooked: HookedModel,
    clean: Mapping[str, Any],
    corrupted: Mapping[str, Any] | Corruption,
    metric: Metric,
    *,
    by: str = "edge",
) -> EdgeScores:
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
    corruption = _as_corruption(corrupted)
    clean = hooked.check_inputs(clean)
    corrupt_inputs = hooked.check_inputs(corruption.inputs)
    spans = hooked.spans(corrupt_inputs)
    check_same_layout(hooked.spans(clean), spans)
    nodes, resid = _edge_points(hooked)
    rows, clean_values, corrupt_values = [], [], []
    for pair in range(spans.batch_size):
        c, x = hooked.rows(clean, pair), hooked.rows(corrupt_inputs, pair)
        per_position, clean_v, corrupt_v = _edge_effects(hooked, c, x, corruption.edits, metric, nodes, resid)
        groups = {m: spans.masks[m][pair] for m in spans.modalities} if by == "span" else {None: spans.valid[pair]}
        clean_values.append(clean_v)
        corrupt_values.append(corrupt_v)
        for label, mask in groups.items():
            scores = per_position[:, :, mask.to(per_position.device)].sum(-1).cpu()
            labels = {"span": label} if by == "span" else {}
            rows += _edge_rows(pair, nodes, scores, clean_v - corrupt_v, labels)
    return EdgeScores(pd.DataFrame(rows), clean_values, corrupt_values, nodes)


def _edge_points(hooked: HookedModel) -> tuple[list[str], list[str]]:
    """The nodes of :func:`edge_attribution_patch`, and the residual points whose gradients give the
    receivers' input gradients (each block's ``resid_pre`` and ``resid_mid``, then the last ``resid_post``)."""
    layers = sorted(
        hp.layer
        for hp in hooked.hook_points.values()
        if hp.prefix == "lm" and hp.kind == "resid_pre" and hp.layer is not None
    )
    missing = [
        f"lm.blocks.{i}.{k}"
        for i in layers
        for k in ("attn_out", "resid_mid", "mlp_out", "resid_post")
        if f"lm.blocks.{i}.{k}" not in hooked.hook_points
    ]
    if not layers or missing:
        raise ValueError(
            f"edge attribution needs the LM's attention/MLP/residual points; this adapter lacks {missing[:4]}"
        )
    nodes = (
        ["lm.blocks.0.resid_pre"]
        + [f"lm.blocks.{i}.{k}" for i in layers for k in ("attn_out", "mlp_out")]
        + ["lm.final_norm"]
    )
    resid = [f"lm.blocks.{i}.{k}" for i in layers for k in ("resid_pre", "resid_mid")] + [
        f"lm.blocks.{layers[-1]}.resid_post"
    ]
    return nodes, resid


def _edge_effects(
    hooked: HookedModel,
    clean: dict,
    corrupted: dict,
    edits: list[Edit],
    metric: Metric,
    nodes: list[str],
    resid: list[str],
) -> tuple[Tensor, float, float]:
    """One pair's edge scores per sender position, Float64[sender, receiver, pos], from one forward and
    one backward pass of the corrupted run (with ``edits``); and the clean and corrupted metric."""
    senders = nodes[:-1]
    clean_run = hooked.run(clean, cache=senders)
    run = hooked.run(corrupted, cache=list(dict.fromkeys(senders + resid)), edits=edits, keep_grad=True)
    output = metric(hooked.readout_logits(run.logits, corrupted))[0]
    grads = torch.autograd.grad(output, [run.cache[n] for n in resid])
    # receiver inputs' gradients: attn_j = g(resid_pre_j) - g(resid_mid_j); mlp_j = g(resid_mid_j) - g(resid_pre_j+1)
    receiver_grads = torch.stack([grads[i] - grads[i + 1] for i in range(len(grads) - 1)] + [grads[-1]])[:, 0]
    deltas = torch.stack([(clean_run.cache[n] - run.cache[n].detach())[0] for n in senders])
    per_position = torch.einsum("std,rtd->srt", deltas.double(), receiver_grads.double())
    clean_v = float(metric(hooked.readout_logits(clean_run.logits, clean))[0])
    return per_position, clean_v, output.item()


def _edge_rows(pair: int, nodes: list[str], scores: Tensor, gap: float, labels: dict) -> list[dict]:
    """Rows of the :class:`EdgeScores` table from one pair's ``scores`` Float[sender, receiver] (senders
    ``nodes[:-1]``, receivers ``nodes[1:]``; edges into a receiver before the sender are left out)."""
    rows = []
    for s, sender in enumerate(nodes[:-1]):
        for r, receiver in enumerate(nodes[1:]):
            if r + 1 <= s:  # the receiver comes before the sender (or is the sender)
                continue
            score = float(scores[s, r])
            rows.append(
                {
                    "pair": pair,
                    "sender": sender,
                    "receiver": receiver,
                    **labels,
                    "score": score,
                    "normalized": score / gap if gap != 0 else float("nan"),
                }
            )
    return rows


def correlation(estimate: SweepResult, exact: SweepResult, value: str = "value") -> dict[str, float]:
    """Pearson and Spearman correlation between two sweeps over the same cells (e.g. attribution vs
    exact patching), plus the largest absolute difference."""
    keys = [c for c in exact.table.columns if c not in ("value", "normalized", "effect", "token", "modality")]
    merged = exact.table.merge(estimate.table, on=keys, suffixes=("_exact", "_estimate"))
    if len(merged) != len(exact.table):
        raise ValueError(f"the sweeps cover different cells ({len(estimate.table)} vs {len(exact.table)})")
    a, b = merged[f"{value}_exact"], merged[f"{value}_estimate"]
    return {
        "pearson": float(a.corr(b)),
        "spearman": float(a.rank().corr(b.rank())),
        "max_abs_diff": float((a - b).abs().max()),
        "n_cells": len(merged),
    }


# -- path patching ----------------------------------------------------------------------------------

Component = Where
"""A component of path patching: a hook point with optional positions (any span selector) and heads."""


def path_patch(
    hooked: HookedModel,
    clean: Mapping[str, Any],
    corrupted: Mapping[str, Any] | Corruption,
    metric: Metric,
    senders: Sequence[Component],
    receivers: Sequence[Component],
    frozen: str = "lm.blocks.*",
) -> float:
    """Path patching (Wang et al. 2022; Goldowsky-Dill et al. 2023): the metric on the clean run when
    only the paths from ``senders`` to ``receivers`` carry corrupted activations.

    1. Run clean and corrupted, caching everything.
    2. Run clean with the senders set to their corrupted values and every other attention/MLP output
       (``attn_out``/``mlp_out`` points matching ``frozen``) held at its clean value, except the
       receivers themselves (at their positions/heads) and the ``attn_out`` carrying a head (``z``)
       sender, whose other heads the sender's write holds at clean; record the receivers' values.
    3. Run clean with only the receivers set to the values recorded in step 2.

    Returns the metric of step 3 (for the first pair). With no senders it equals the clean metric.
    """
    corruption = _as_corruption(corrupted)
    clean = hooked.rows(hooked.check_inputs(clean), 0)
    corrupt_inputs = hooked.rows(hooked.check_inputs(corruption.inputs), 0)
    check_same_layout(hooked.spans(clean), hooked.spans(corrupt_inputs))
    sender_hooks = [hooked.resolve(s.hook).name for s in senders]
    receiver_hooks = [hooked.resolve(r.hook).name for r in receivers]
    # a head sender reaches the residual stream through its block's attn_out: that one is not held
    carriers = {(hp.prefix, hp.layer) for hp in map(hooked.resolve, sender_hooks) if hp.kind == "z"}
    freeze = [
        n
        for n, hp in hooked.hook_points.items()
        if hp.kind in ("attn_out", "mlp_out")
        and fnmatch.fnmatchcase(n, frozen)
        and n not in sender_hooks
        and not (hp.kind == "attn_out" and (hp.prefix, hp.layer) in carriers)
    ]
    clean_run = hooked.run(clean, cache=freeze + sender_hooks + receiver_hooks)
    corrupt_run = hooked.run(corrupt_inputs, cache=sender_hooks, edits=corruption.edits)
    held = [
        _freeze_except(hooked, n, clean_run.cache[n], [r for r in receivers if hooked.resolve(r.hook).name == n], clean)
        for n in freeze
    ]
    edits = [e for e in held if e is not None]
    edits += [
        replace(s_hook, _select(corrupt_run.cache[s_hook], clean_run.cache[s_hook], s, hooked, clean))
        for s, s_hook in zip(senders, sender_hooks)
    ]
    step2 = hooked.run(clean, cache=receiver_hooks, edits=edits)
    final_edits = [
        replace(r_hook, _select(step2.cache[r_hook], clean_run.cache[r_hook], r, hooked, clean))
        for r, r_hook in zip(receivers, receiver_hooks)
    ]
    patched = hooked.run(clean, edits=final_edits)
    return float(metric(hooked.readout_logits(patched.logits, clean))[0])


def _freeze_except(
    hooked: HookedModel, name: str, clean: Tensor, receivers: list[Component], inputs: dict
) -> Edit | None:
    """Hold ``name`` at its ``clean`` value, except where one of ``receivers`` (components at this
    point) selects: there it keeps what the run computes, so step 2 records the receivers' values
    (None: a receiver takes the whole point, nothing is held)."""
    if not receivers:
        return replace(name, clean)
    spans = hooked.spans(inputs)
    hp = hooked.resolve(name)
    masks = [selection_mask(r, clean, hp, lambda at: spans.mask(at).to(clean.device)) for r in receivers]
    if any(m is None for m in masks):
        return None
    free = torch.stack(masks).any(0)
    return apply(name, lambda act, ctx: where_selected(free, act, clean.to(act.dtype)))


def _select(new: Tensor, old: Tensor, component: Component, hooked: HookedModel, inputs: dict) -> Tensor:
    """``old`` with ``new`` written at the component's positions/heads (a full-shape value)."""
    spans = hooked.spans(inputs)
    mask = selection_mask(component, old, hooked.resolve(component.hook), lambda at: spans.mask(at).to(old.device))
    return where_selected(mask, new, old)


__all__ = [
    "Component",
    "Corruption",
    "EdgeScores",
    "SweepResult",
    "attribution_patch",
    "check_same_layout",
    "correlation",
    "corrupt",
    "edge_attribution_patch",
    "kl_from",
    "logit_diff",
    "logprob",
    "path_patch",
    "points",
    "prob",
    "sweep",
]
