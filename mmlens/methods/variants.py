"""Masked and rebased variants of recorded input rows, run as few positions as possible.

A *variant* of a row takes, at each position, its own LM-input embedding, its baseline, or another
source (:mod:`mmlens.core.prefix_tree`). :func:`masked_values` / :func:`masked_values_rows` compute
the explained metric of many variants: on a causal LM each is replayed from its first changed
position, variants sharing a prefix of sources share it (prefix trees), and the trees of several
rows share calls of the blocks (:func:`mmlens.core.replay.forest_logits`). Rows that differ from a
recorded row only in their LM-input embeddings (perturbed draws, neutral ablations) become variants
of its recording (:func:`rebased_setups`). Occlusion, faithfulness, stability and Granger use them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mmlens.core.prefix_tree import PrefixTree, prefix_trees
from mmlens.core.replay import BlockReplay, forest_logits
from mmlens.core.spans import ModalitySpans
from mmlens.core.wrapper import HookedModel
from mmlens.methods.setups import Setup, baseline_of, with_embeds


class CannotRebase(ValueError):
    """Raised by :func:`rebased_setups` when rows cannot be shown to be variants of a recording; the
    message says why. Prepare them instead (:func:`prepare_rows`)."""


def rebased_setups(hooked: HookedModel, setup: Setup, rows: Sequence[dict]) -> list[Setup]:
    """The joint setups of input rows that differ from ``setup``'s row only in their LM-input
    embeddings (e.g. perturbed draws that keep the layout), as variants of ``setup``'s recording: the
    rows run together only up to the first LM block (their embeddings), and their readout logits are
    replayed on the recording from the first position where each differs (a row that differs
    nowhere up to the readout gets ``setup``'s logits). Their masked variants then share prefix-tree
    nodes with ``setup``'s (:func:`masked_values_rows`). The rows are explained as ``setup`` is (its
    metric). :func:`rebase_rows` does this for several recordings at once.

    Raises :class:`CannotRebase` when that cannot be shown to equal their own runs: ``setup`` has no
    replay reusing keys and values, or a row's layout or first block call (every argument but the
    hidden states, e.g. rotary tables that depend on the content) differs from the recording's."""
    out = rebase_rows(hooked, [(setup, rows)])[0]
    if isinstance(out, CannotRebase):
        raise out
    return out


def rebase_rows(
    hooked: HookedModel, requests: Sequence[tuple[Setup, Sequence[dict]]]
) -> list[list[Setup] | CannotRebase]:
    """:func:`rebased_setups` of several (setup, rows) requests: each request's setups, or the
    :class:`CannotRebase` saying why not. The rows' logits of every recording are read off prefix
    trees in shared calls of the blocks (:func:`mmlens.core.replay.forest_logits`) where the engines
    allow, else off one batched replay per recording."""
    out: list = []
    for setup, rows in requests:
        try:
            out.append(_rebase_inputs(hooked, setup, rows))
        except CannotRebase as err:
            out.append(err)
    ready = [(setup, found) for (setup, _), found in zip(requests, out) if not isinstance(found, CannotRebase)]
    logits = iter(_rebased_logits([(setup, hidden) for setup, (hidden, _) in ready]))
    for r, ((setup, rows), found) in enumerate(zip(requests, out)):
        if not isinstance(found, CannotRebase):
            out[r] = _rebased(hooked, setup, rows, *found, next(logits))
    return out


def _rebase_inputs(hooked: HookedModel, setup: Setup, rows: Sequence[dict]) -> tuple[Tensor, list[ModalitySpans]]:
    """The rows' block-0 inputs Float[n, seq, d] and spans, after checking they can be rebased."""
    engine = setup.replay
    if engine is None or not engine.reuse_kv or setup.edited or setup.explained.shape[0] != 1:
        raise CannotRebase("the row's setup has no replay that reuses keys and values")
    spans = [hooked.spans(row) for row in rows]
    if not all(s.same_layout(setup.spans) for s in spans):
        raise CannotRebase("a row's layout (modality spans) differs from the recorded row's")
    if not rows:
        return setup.embeds[:0], []
    try:
        hidden, call = engine.first_block_call(hooked.join(rows) if len(rows) > 1 else rows[0])
    except (ValueError, RuntimeError) as err:
        raise CannotRebase(f"the rows cannot be run together up to the first LM block: {err}") from err
    if hidden.shape[0] != len(rows) or not engine.matches_first_call(hidden, call):
        raise CannotRebase("a row's first LM block call differs from the recording's beyond its hidden states")
    return hidden, spans


def _rebased(
    hooked: HookedModel, setup: Setup, rows: Sequence[dict], hidden: Tensor, spans: list, logits: Tensor
) -> list[Setup]:
    """The rebased rows' :class:`Setup` objects from their block-0 inputs and readout logits."""
    out = []
    for row, row_spans, row_embeds, row_logits in zip(rows, spans, hidden.split(1), logits.split(1)):
        baseline, explained = baseline_of(hooked, row, row_spans, row_embeds, "joint")
        value = setup.metric(row_logits).detach()
        out.append(
            Setup(
                setup.point,
                row_embeds,
                baseline,
                explained,
                row_spans,
                row_logits,
                setup.metric,
                value,
                setup.replay,
                recording_logits=setup.logits,
            )
        )
    return out


def _rebased_logits(requests: list[tuple[Setup, Tensor]]) -> list[Tensor]:
    """Readout logits Float[n, vocab] of each (setup, rows' block-0 inputs Float[n, seq, d]): the
    setup's own logits for a row that differs nowhere up to the readout; the others as prefix trees
    of all recordings together (sources: 0 the recording, r + 1 row r), or, where the engine refuses
    trees or a check fails, one batched replay per recording from the first position any differs."""
    out = [setup.logits.expand(len(hidden), -1).clone() for setup, hidden in requests]
    parts, targets = [], []
    for i, (setup, hidden) in enumerate(requests):
        engine = setup.replay
        changed = (hidden != engine.block_input(0)).any(-1)[:, : engine.last + 1].cpu()
        moved = changed.any(1).nonzero()[:, 0].tolist()
        if not moved:
            continue
        if engine.tree_refusal() is not None or PACK_TOKENS <= 0:
            out[i][moved] = _replayed_logits(engine, hidden[moved])
            continue
        sources = [torch.where(changed[r], r + 1, 0) for r in moved]
        table = torch.cat([engine.block_input(0), hidden])
        for tree, members in prefix_trees(sources, engine.last, max(PACK_TOKENS, engine.last + 1)):
            positions = tree.positions.to(table.device)
            parts.append((engine, tree, table[tree.source.to(table.device), positions][None], len(table[0])))
            targets.append((i, [moved[m] for m in members]))
    for call in _pack_calls([(k, part[1], [], part[3]) for k, part in enumerate(parts)], max(PACK_TOKENS, 1)):
        chosen = [parts[k][:3] for k, *_ in call]
        logits = forest_logits(chosen)
        for (k, *_), got in zip(call, logits or [None] * len(call)):
            i, rows = targets[k]
            engine, hidden = requests[i][0].replay, requests[i][1]
            out[i][rows] = got.to(out[i]) if got is not None else _replayed_logits(engine, hidden[rows])
    return out


def _replayed_logits(engine: BlockReplay, embeds: Tensor) -> Tensor:
    """Readout logits Float[n, vocab] of rows whose block-0 inputs are ``embeds`` Float[n, seq, d],
    replayed on ``engine``'s recording from the first position where any differs from it."""
    differs = (embeds != engine.block_input(0)).any(-1).any(0).nonzero()[:, 0]
    first = engine.start(0, int(differs[0]) if len(differs) else engine.last)
    return engine.logits(embeds[:, first:], 0, first)


PACK_TOKENS: int = 512
"""Most positions in one packed prefix tree of masked variants (unless one variant alone needs more);
0 turns packing off (sorted batches only, e.g. to measure what packing saves)."""


def masked_values(
    hooked: HookedModel,
    inputs: dict,
    setup: Setup,
    masks: Sequence[Tensor],
    batch_size: int = 32,
    pack: bool | None = None,
) -> Tensor:
    """Float[len(masks)]: the metric of one input row when each Bool[seq] mask's positions take
    their baseline embedding.

    A masked position whose embedding already equals its baseline bit for bit changes nothing, so
    each mask is first reduced to the positions where they differ. Each distinct reduced mask runs
    once; an empty one is the input itself (``setup.value``): e.g. every variant of an input whose
    modality is already at its neutral reference.
    When the LM's blocks can be replayed from the embeddings (:class:`mmlens.core.replay.BlockReplay`)
    and the adapter says the LM is causal, each variant recomputes only positions from its first
    masked one, attending to the input run's keys and values before it, and only the readout position
    is unembedded: packed as a prefix tree (:mod:`mmlens.core.prefix_tree`, variants sharing masked
    prefixes share them) when that costs less than batches sorted by first position (``pack=None``,
    see :func:`_cheaper_forest`; ``pack=True``: whenever the engine allows) and the engine's packing
    check passes (:meth:`~mmlens.core.replay.BlockReplay.tree_refusal`), else (or with ``pack=False``)
    in such batches of ``batch_size``. :func:`masked_values_rows` does this for several rows at once.
    """
    return masked_values_rows(hooked, [(inputs, setup, masks)], batch_size, pack)[0]


MaskJob = tuple[dict, Setup, Sequence[Tensor]]
"""One row's masked variants: (input row, its :class:`Setup`, Bool[seq] masks)."""


def masked_values_rows(
    hooked: HookedModel, jobs: Sequence[MaskJob], batch_size: int = 32, pack: bool | None = None
) -> list[Tensor]:
    """:func:`masked_values` of several rows, one Float[len(masks)] per (inputs, setup, masks) job.
    Jobs whose setups share a recording (the same ``setup.replay``: a row and draws rebased on it by
    :func:`rebased_setups`) are variants of that one run: their prefix trees are built together, so
    positions they agree on (bit for bit) are computed once. The trees of every recording whose
    engine allows them run together, several recordings per call of the blocks
    (:func:`mmlens.core.replay.forest_logits`)."""
    out: list[Tensor | None] = [None] * len(jobs)
    with torch.no_grad():
        groups = [_Group([jobs[j] for j in members], members) for members in _by_recording(jobs)]
        retry = pack
        if pack is not False and PACK_TOKENS > 0:
            able = [g for g in groups if g.variants and _trees_allowed(g.setups[0])]
            calls = _cheaper_forest(able, batch_size, always=pack is True)
            if calls is None:
                retry = False  # batches were chosen: do not weigh the trees again group by group
            else:
                for group, values in zip(able, _forest_values(able, calls)):
                    group.values = values
        for group in groups:
            if group.values is None:  # batches, or a group whose shared call failed its check
                group.values = _group_values(hooked, group, batch_size, retry)
            for j, value in zip(group.members, group.results()):
                out[j] = value
    return out


def _by_recording(jobs: Sequence[MaskJob]) -> list[list[int]]:
    """Job indices grouped by the recording their setups replay (each job alone without one)."""
    groups: dict[int, list[int]] = {}
    for j, (_, setup, _) in enumerate(jobs):
        groups.setdefault(id(setup.replay) if setup.replay is not None else -1 - j, []).append(j)
    return list(groups.values())


class _Group:
    """The masked variants of jobs sharing one recording, as sources per position (0: the recorded
    embeddings; then each job's baseline and embeddings, every source numbered by the first entry
    equal to it bit for bit at that position, so equal values share tree nodes)."""

    def __init__(self, jobs: list[MaskJob], members: list[int]):
        self.members, self.inputs = members, [x for x, _, _ in jobs]
        self.setups = [setup for _, setup, _ in jobs]
        first = self.setups[0]
        recorded = first.replay.block_input(0) if first.replay is not None else first.embeds
        entries = [recorded] + [t for setup in self.setups for t in (setup.baseline, setup.embeds)]
        self.table = torch.cat([t.to(recorded) for t in entries])  # Float[K, seq, d]
        self.canon = _canonical_sources(self.table)  # Long[K, seq] on the CPU
        self.masks: list[list[Tensor]] = []  # per job: each mask's sources, Long[seq]
        self.variants: list[tuple[int, Tensor]] = []  # distinct non-zero (job, sources)
        self.index: list[dict[bytes, int]] = []
        for j, (_, _, masks) in enumerate(jobs):
            own = [self._sources(j, mask) for mask in masks]
            index: dict[bytes, int] = {}
            for sources in own:
                key = sources.numpy().tobytes()
                if sources.any() and key not in index:
                    index[key] = len(self.variants)
                    self.variants.append((j, sources))
            self.masks.append(own)
            self.index.append(index)
        self.values: Tensor | None = None  # Float[len(variants)], once computed

    def _sources(self, j: int, mask: Tensor) -> Tensor:
        seq = self.canon.shape[1]
        ids = torch.where(mask.cpu(), 1 + 2 * j, 2 + 2 * j)
        return self.canon[ids, torch.arange(seq)]

    def gather(self, sources: Tensor, positions: Tensor) -> Tensor:
        """Float[..., P, d]: the embeddings of ``sources`` Long[..., P] at ``positions`` Long[P]."""
        device = self.table.device
        return self.table[sources.to(device), positions.to(device)]

    def unchanged(self, j: int) -> float:
        """Job ``j``'s metric on the recorded run itself (a variant whose sources are all 0)."""
        setup = self.setups[j]
        if setup.recording_logits is None:
            return float(setup.value[0])
        return float(setup.metric(setup.recording_logits)[0])

    def results(self) -> list[Tensor]:
        """Float[len(masks)] per job from :attr:`values`."""
        out = []
        for j, (own, index) in enumerate(zip(self.masks, self.index)):
            f = self.unchanged(j)
            out.append(torch.tensor([float(self.values[index[s.numpy().tobytes()]]) if s.any() else f for s in own]))
        return out

    def apply_metrics(self, rows: list[int], logits: Tensor) -> Tensor:
        """Float[len(rows)]: each variant's own job's metric of its logits Float[len(rows), vocab]."""
        out = torch.empty(len(rows))
        jobs = torch.tensor([self.variants[u][0] for u in rows])
        for j in jobs.unique().tolist():
            where = (jobs == j).nonzero()[:, 0]
            out[where] = self.setups[j].metric(logits[where.to(logits.device)]).float().cpu()
        return out


def _canonical_sources(table: Tensor) -> Tensor:
    """Long[K, seq]: for each entry and position, the first entry equal to it there (bit for bit)."""
    canon = torch.empty(table.shape[:2], dtype=torch.long)
    for k in range(table.shape[0]):
        equal = (table[: k + 1] == table[k]).all(-1)
        canon[k] = equal.int().argmax(0).cpu()
    return canon


def _trees_allowed(setup: Setup) -> bool:
    return setup.replay is not None and setup.replay.tree_refusal() is None


def _group_values(hooked: HookedModel, group: _Group, batch_size: int, pack: bool | None) -> Tensor:
    """Float[len(variants)] of one group: as prefix trees when allowed and chosen (and the engine's
    check passes), else in batches sorted by first changed position."""
    if pack is not False and PACK_TOKENS > 0 and group.variants and _trees_allowed(group.setups[0]):
        calls = _cheaper_forest([group], batch_size, always=pack is True)
        values = _forest_values([group], calls)[0] if calls is not None else None
        if values is not None:
            return values
    sources = [s for _, s in group.variants]
    firsts = [int(s.nonzero()[0]) for s in sources]
    order = sorted(range(len(sources)), key=firsts.__getitem__) if group.setups[0].replay else range(len(sources))
    return _batched_values(hooked, group, list(order), batch_size)


CALL_FLOPS: float = 2e7
"""The cost of one block call beyond its arithmetic (Python, kernel launches), in flops: ~0.4 ms on
a 2-core CPU at ~50 GFLOP/s. Only :func:`masked_values`'s choice between prefix trees and sorted
batches reads it (a speed heuristic, never a result)."""


ForestCall = list[tuple[int, PrefixTree, list[int]]]
"""One call of the blocks: (group, tree, the indices of the group's variants it reads out) per part."""


def _cheaper_forest(groups: Sequence[_Group], batch_size: int, always: bool = False) -> list[ForestCall] | None:
    """The prefix trees of every group's variants that change a position up to its readout, packed
    into calls of at most the node budget, when they cost less than each group's batches sorted by
    first changed position (or ``always``); else None.

    Cost per block (a speed heuristic only, never a result): ``24 d^2`` flops per position for the
    linear layers (a transformer's ~12 d^2 weights), ``4 d`` per attended key, :data:`CALL_FLOPS` per
    call; a call's T nodes each attend (densely, masked) to its recordings' keys and its T nodes, so
    calls are capped at ``2 d`` nodes (also at ``PACK_TOKENS``; a group's own trees also at
    ``batch_size`` variants' worth of its positions)."""
    if not groups:
        return None
    width = groups[0].table.shape[-1]

    def cost(positions: int, keys: int) -> float:
        return CALL_FLOPS + positions * (24 * width * width + 4 * width * keys)

    batched, parts = 0.0, []
    for g, group in enumerate(groups):
        engine = group.setups[0].replay
        last, seq = engine.last, engine.block_input(0).shape[1]
        sources = [s for _, s in group.variants]
        firsts = sorted(min(int(s.nonzero()[0]), last) for s in sources)
        batched += sum(
            cost(len(firsts[i : i + batch_size]) * (seq - firsts[i]), seq) for i in range(0, len(firsts), batch_size)
        )
        early = [u for u, s in enumerate(sources) if bool(s[: last + 1].any())]
        budget = max(last + 1, min(batch_size * (last + 1), PACK_TOKENS, 2 * width))
        trees = prefix_trees([sources[u] for u in early], last, budget) if early else []
        parts += [(g, tree, [early[i] for i in members], seq) for tree, members in trees]
    calls = _pack_calls(parts, min(PACK_TOKENS, 2 * width))
    forest = sum(cost(sum(len(t) for _, t, _, _ in call), sum(len(t) + s for _, t, _, s in call)) for call in calls)
    return [[(g, t, members) for g, t, members, _ in call] for call in calls] if always or forest < batched else None


def _pack_calls(parts: list[tuple[int, PrefixTree, list[int], int]], budget: int) -> list[list]:
    """Consecutive parts (group, tree, members, seq) grouped into calls of at most ``budget`` nodes (a
    larger tree alone), about equally large: a part joins the current call while its middle stays
    within the average call size that ``budget`` implies."""
    total = sum(len(part[1]) for part in parts)
    target = total / max(1, math.ceil(total / budget))
    calls: list[list] = []
    size = 0
    for part in parts:
        n = len(part[1])
        if calls and size + n <= budget and size + n / 2 <= target:
            calls[-1].append(part)
            size += n
        else:
            calls.append([part])
            size = n
    return calls


def _forest_values(groups: Sequence[_Group], calls: list[ForestCall]) -> list[Tensor | None]:
    """Float[len(variants)] per group from :func:`_cheaper_forest`'s calls (None for a group in a
    call whose check failed); variants in no tree change only positions after the readout (which a
    causal LM's readout cannot see) and take the recorded run's value."""
    values: list[Tensor | None] = []
    for group in groups:
        values.append(torch.tensor([group.unchanged(j) for j, _ in group.variants]))
    for call in calls:
        parts = [
            (groups[g].setups[0].replay, tree, groups[g].gather(tree.source, tree.positions)[None])
            for g, tree, _ in call
        ]
        logits = forest_logits(parts)
        for (g, _, members), part_logits in zip(call, logits or [None] * len(call)):
            if logits is None or values[g] is None:
                values[g] = None
            else:
                values[g][members] = groups[g].apply_metrics(members, part_logits)
    return values


def _batched_values(hooked: HookedModel, group: _Group, order: list[int], batch_size: int) -> Tensor:
    """Float[len(variants)] of one group in batches of ``batch_size`` in ``order``: replayed from each
    batch's first changed position when the engine allows, else full forwards (of a group of one job)."""
    values = torch.empty(len(group.variants))
    engine = group.setups[0].replay
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        sources = torch.stack([group.variants[u][1] for u in chunk])
        seq = sources.shape[1]
        if engine is not None:
            first = engine.start(0, int(sources[0].nonzero()[0]))
            variants = group.gather(sources[:, first:], torch.arange(first, seq))
            values[chunk] = group.apply_metrics(chunk, engine.logits(variants, 0, first))
        else:
            setup = group.setups[0]
            variants = group.gather(sources, torch.arange(seq))
            out = with_embeds(hooked, group.inputs[0], setup.point, variants, setup.metric)
            values[chunk] = out.float().cpu()
    return values


__all__ = [
    "CALL_FLOPS",
    "CannotRebase",
    "ForestCall",
    "masked_values",
    "masked_values_rows",
    "MaskJob",
    "PACK_TOKENS",
    "rebase_rows",
    "rebased_setups",
]
