"""Explainers: per-position, per-modality importance behind one interface.

Every explainer scores the positions of the fused sequence where all modalities meet the language
model: the LM's input embeddings (``fusion.embeds`` on multimodal models, ``lm.embed`` on text
LMs), so text tokens, image tokens and graph tokens are scored in one space and grouped by the
modality spans. The *baseline* of a modality is its neutral reference (the adapter's: pad text,
zero or mean image, zero graph embedding) embedded the same way.

Two modes:

- ``mode="joint"``: every modality is explained at once (integrated gradients integrate from the
  all-neutral input; occlusion occludes positions of every modality).
- ``mode="<modality>"`` (unimodal): only that modality is explained, the others held at their
  input values, as unimodal tools do; other positions get NaN.

The explained quantity is a :data:`mmlens.methods.patching.Metric` on final-position logits, one value per
row; by default :func:`predicted_prob`, the probability of each row's predicted token.

>>> explanation = mmlens.explain(hm, inputs, "integrated_gradients")
>>> explanation.importance()          # {"image": Float[b], "text": Float[b]}: share of |score| mass
"""

from __future__ import annotations

import contextlib
import math
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from mmlens.core.edits import replace
from mmlens.core.names import nearest_names
from mmlens.core.plan import RunResult
from mmlens.core.prefix_tree import PrefixTree, prefix_trees
from mmlens.core.replay import BlockReplay, forest_logits
from mmlens.core.spans import ModalitySpans
from mmlens.core.wrapper import HookedModel
from mmlens.methods.patching import Corruption, Metric, sweep


def predicted_prob(hooked: HookedModel, inputs: Mapping[str, Any]) -> Metric:
    """The probability of the predicted final-position token of ``inputs`` (one row), for every row
    of the logits it is applied to (the variants of that input)."""
    with torch.no_grad():
        logits = hooked.readout_logits(hooked.run(inputs).logits, inputs)
    return _prob_of_prediction(logits)


def _prob_of_prediction(logits: Tensor) -> Metric:
    """:func:`predicted_prob` from one row's final logits Float[1, vocab]."""
    return prediction_metric(logits, "prob")


PREDICTION_METRICS = ("prob", "logprob", "logodds", "logit_diff")
"""What :func:`prediction_metric` can measure of the input's predicted token."""


def prediction_metric(logits: Tensor, kind: str = "prob") -> Metric:
    """A metric of the predicted token of one row's final logits Float[1, vocab]: ``"prob"`` (its
    probability; saturates near 0 and 1), ``"logprob"`` (its log-probability, nats), ``"logodds"``
    (log p - log(1 - p), from the logits without rounding) or ``"logit_diff"`` (its logit minus the
    largest other logit); the last two do not saturate."""
    if logits.shape[0] != 1:
        raise ValueError(f"predicted_prob takes one input row, got {logits.shape[0]}")
    if kind not in PREDICTION_METRICS:
        raise ValueError(f"metric must be one of {PREDICTION_METRICS}, got {kind!r}")
    target = int(logits[0].argmax())
    if kind == "prob":
        return lambda out: out.float().softmax(-1)[:, target]
    if kind == "logprob":
        return lambda out: out.float().log_softmax(-1)[:, target]
    if kind == "logodds":
        return lambda out: out.float()[:, target] - _others(out.float(), target).logsumexp(1)

    return lambda out: out.float()[:, target] - _others(out.float(), target).max(1).values


def _others(logits: Tensor, target: int) -> Tensor:
    """Float[n, vocab - 1]: the logits without column ``target``."""
    return torch.cat([logits[:, :target], logits[:, target + 1 :]], 1)


def embedding_point(hooked: HookedModel) -> str:
    """The hook point where every modality enters the LM: ``fusion.embeds`` or ``lm.embed``."""
    for name in ("fusion.embeds", "lm.embed"):
        if name in hooked.hook_points:
            return name
    raise ValueError(
        f"adapter {hooked.adapter.name!r} has neither 'fusion.embeds' nor 'lm.embed'; explainers need "
        "the LM's input embeddings"
    )


@dataclass
class Explanation:
    """Per-position importance of one batch.

    Attributes:
        scores: Float[b, seq], signed (positive: the position supports the metric); NaN where the
            explainer does not score (padding; other modalities in unimodal mode).
        spans: the batch's modality spans.
        method: the explainer's name; ``mode``: ``"joint"`` or the explained modality.
        value: Float[b], the metric on the input.
        info: the method's options, and for integrated gradients ``completeness_error`` per row:
            |sum of scores - (f(input) - f(baseline))|, the Riemann sum's error (large when the
            path crosses a sharp feature, e.g. a zero pad embedding through RMSNorm: add steps);
            for occlusion ``forwards`` per row: how the masked variants ran (``"replay + kv"``,
            ``"replay + kv, prefix tree"`` when packed, ``"replay + kv (no prefix tree: ...)"`` when
            the packing check refused, ``"replay"``, ``"replay (no kv reuse: ...)"`` when the LM is
            not causal on the row, or ``"full forwards"``).
    """

    scores: Tensor
    spans: ModalitySpans
    method: str
    mode: str
    value: Tensor
    info: dict = field(default_factory=dict)

    @property
    def modalities(self) -> list[str]:
        return self.spans.modalities if self.mode == "joint" else [self.mode]

    def masked(self, modality: str) -> Tensor:
        """Float[b, seq]: the scores on ``modality``'s positions, 0 elsewhere (and at NaN)."""
        mask = self.spans.masks[modality].to(self.scores.device)
        return torch.where(mask & ~self.scores.isnan(), self.scores, torch.zeros_like(self.scores))

    def importance(self, absolute: bool = True) -> dict[str, Tensor]:
        """Each explained modality's share of the total score mass, Float[b] per modality (sums to
        1 over modalities; ``absolute=False`` shares the signed sums instead)."""
        per = {m: (self.masked(m).abs() if absolute else self.masked(m)).sum(1) for m in self.modalities}
        total = sum(v.abs() for v in per.values()) if not absolute else sum(per.values())
        return {m: v / total.clamp_min(1e-30) for m, v in per.items()}

    def distribution(self, modality: str) -> Tensor:
        """Float[b, seq]: |scores| on ``modality``'s positions normalized to sum 1 per row."""
        mass = self.masked(modality).abs()
        return mass / mass.sum(1, keepdim=True).clamp_min(1e-30)

    def top_mask(self, modality: str, fraction: float) -> Tensor:
        """Bool[b, seq]: the ``ceil(fraction * n)`` highest-scoring positions of ``modality`` per row
        (n its position count; ties broken by position)."""
        if not 0 <= fraction <= 1:
            raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
        mask = self.spans.masks[modality].to(self.scores.device)
        out = torch.zeros_like(mask)
        for row in range(mask.shape[0]):
            positions = mask[row].nonzero()[:, 0]
            k = math.ceil(fraction * len(positions) - 1e-9)
            order = torch.argsort(self.scores[row, positions].nan_to_num(float("-inf")), descending=True, stable=True)
            out[row, positions[order[:k]]] = True
        return out

    def table(self) -> pd.DataFrame:
        """One row per scored position: row, position, modality, score."""
        modality = self.spans.modality_of_positions()
        rows = [
            {"row": b, "position": p, "modality": modality[b][p], "score": float(self.scores[b, p])}
            for b in range(self.scores.shape[0])
            for p in range(self.scores.shape[1])
            if not torch.isnan(self.scores[b, p])
        ]
        return pd.DataFrame(rows)


@dataclass
class Setup:
    """What every explainer (and every desideratum) needs for one input row: the LM-input embeddings,
    the baseline, which positions to explain, the metric, and the replay engine of the input's run."""

    point: str
    embeds: Tensor  # Float[b, seq, d] at the input
    baseline: Tensor  # Float[b, seq, d]: the neutral reference at the explained modalities' positions
    explained: Tensor  # Bool[b, seq]
    spans: ModalitySpans
    logits: Tensor  # Float[b, vocab]: the input's final-position logits
    metric: Metric  # what is explained
    value: Tensor  # Float[b]: the metric on the input
    replay: BlockReplay | None = None  # the input run's block calls, when variants can replay from them
    edited: bool = False  # the embeddings are an embedding-level variant, not the inputs' own
    recording_logits: Tensor | None = None  # Float[1, vocab] of the run ``replay`` recorded, when not ``embeds``'


_NEUTRAL_CACHE: OrderedDict[tuple, tuple[weakref.ref, dict, Tensor]] = OrderedDict()
_NEUTRAL_CACHE_SIZE = 128


def _neutral_embeds(hooked: HookedModel, neutral: dict, point: str) -> Tensor:
    """The LM-input embeddings Float[b, seq, d] of a neutral-reference input, from a small LRU cache
    when the same input recurs bit for bit on unchanged weights (every explainer and metric of one
    input asks for the same neutral references). Keyed by the model, its parameters' in-place
    version counters (so edited weights miss) and the inputs' bytes; a hit is checked for equality."""
    model = hooked.model
    key = (
        id(model),
        point,
        sum(p._version for p in model.parameters()),
        tuple((k, _fingerprint(v)) for k, v in sorted(neutral.items())),
    )
    hit = _NEUTRAL_CACHE.get(key)
    if hit is not None and hit[0]() is model and _same_inputs(hit[1], neutral):
        _NEUTRAL_CACHE.move_to_end(key)
        return hit[2]
    with torch.no_grad():
        embeds = hooked.run(neutral, cache=point).cache[point]
    _NEUTRAL_CACHE[key] = (weakref.ref(model), neutral, embeds)
    while len(_NEUTRAL_CACHE) > _NEUTRAL_CACHE_SIZE:
        _NEUTRAL_CACHE.popitem(last=False)
    return embeds


def _fingerprint(value: Any) -> Any:
    if isinstance(value, Tensor):
        data = value.detach().contiguous().cpu()
        return (
            str(data.dtype),
            tuple(data.shape),
            hash(data.view(-1).view(torch.uint8).numpy().tobytes())
            if data.dtype != torch.bool
            else hash(data.numpy().tobytes()),
        )
    return repr(value)


def _same_inputs(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for k, v in a.items():
        w = b[k]
        if isinstance(v, Tensor) or isinstance(w, Tensor):
            if not (
                isinstance(v, Tensor)
                and isinstance(w, Tensor)
                and v.shape == w.shape
                and v.dtype == w.dtype
                and torch.equal(v, w)
            ):
                return False
        elif v is not w and v != w:
            return False
    return True


def prepare(hooked: HookedModel, inputs: dict, metric: Metric | None, mode: str) -> Setup:
    """The :class:`Setup` of one input row: one forward of ``inputs`` (embeddings, final logits,
    recorded for replay) and one per explained modality's neutral reference (unless cached).
    ``metric=None``: :func:`predicted_prob` of this input."""
    replay = BlockReplay(hooked) if BlockReplay.supports(hooked) else None
    with torch.no_grad(), replay.capture() if replay else contextlib.nullcontext():
        run = hooked.run(inputs, cache=[embedding_point(hooked)] + ([replay.final_point] if replay else []))
    return _setup_of_run(hooked, inputs, run, replay, metric, mode)


BATCHED_SETUPS_AGREE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model -> whether :func:`prepare_rows`' batched setups agreed with one-row :func:`prepare` (checked
once per model; absent: not yet checked)."""


def prepare_rows(
    hooked: HookedModel, rows: Sequence[dict], metric: Metric | None | Sequence[Metric | None], mode: str
) -> list[Setup]:
    """The :func:`prepare` of each input row (``metric``: one for every row, or one per row), rows
    that share a layout from one batched forward each (one model call per layout instead of one per
    row; :meth:`HookedModel.join`). The first time per model, a batched setup is compared with its own
    :func:`prepare` (embeddings and logits within relative 1e-4, the same replay); if they differ,
    that model's rows are prepared one by one from then on, as they are when rows cannot be joined.
    Rows with the same layout at the same place in two calls get the same shapes, so equal rows get
    bit-equal setups."""
    metrics = list(metric) if isinstance(metric, (list, tuple)) else [metric] * len(rows)
    if len(metrics) != len(rows):
        raise ValueError(f"got {len(metrics)} metrics for {len(rows)} rows; pass one metric, or one per row")
    groups: list[tuple[ModalitySpans, list[int]]] = []
    for r, row in enumerate(rows):
        spans = hooked.spans(row)
        group = next((members for first, members in groups if first.same_layout(spans)), None)
        if group is None:
            groups.append((spans, [r]))
        else:
            group.append(r)
    out: list[Setup | None] = [None] * len(rows)
    for _, members in groups:
        group_rows, group_metrics = [rows[r] for r in members], [metrics[r] for r in members]
        for r, setup in zip(members, _prepare_joined(hooked, group_rows, group_metrics, mode)):
            out[r] = setup
    return out


def _prepare_joined(hooked: HookedModel, rows: list[dict], metrics: list[Metric | None], mode: str) -> list[Setup]:
    """:func:`prepare` of rows sharing a layout, from one batched forward when they can be joined."""
    if len(rows) < 2 or BATCHED_SETUPS_AGREE.get(hooked.model) is False:
        return [prepare(hooked, row, metric, mode) for row, metric in zip(rows, metrics)]
    try:
        batch = hooked.join(rows)
    except (ValueError, RuntimeError):
        return [prepare(hooked, row, metric, mode) for row, metric in zip(rows, metrics)]
    replay = BlockReplay(hooked) if BlockReplay.supports(hooked) else None
    names = [embedding_point(hooked)] + ([replay.final_point] if replay else [])
    with torch.no_grad(), replay.capture() if replay else contextlib.nullcontext():
        run = hooked.run(batch, cache=names)
    setups = []
    for r, (row, metric) in enumerate(zip(rows, metrics)):
        cut = RunResult(None, run.logits[r : r + 1], {n: run.cache[n][r : r + 1] for n in names}, hooked.spans(row))
        setups.append(_setup_of_run(hooked, row, cut, replay.row(r, len(rows)) if replay else None, metric, mode))
    if hooked.model not in BATCHED_SETUPS_AGREE:
        BATCHED_SETUPS_AGREE[hooked.model] = _same_setup(setups[0], prepare(hooked, rows[0], metrics[0], mode))
        if not BATCHED_SETUPS_AGREE[hooked.model]:
            return [prepare(hooked, row, metric, mode) for row, metric in zip(rows, metrics)]
    return setups


def _same_setup(a: Setup, b: Setup) -> bool:
    """Whether two setups of one row agree: embeddings and logits within relative 1e-4, the same
    replay availability and kind, and ``a``'s replay of the row's last (up to 4) positions gives its
    logits (so a recording cut wrongly from a batch is caught)."""

    def close(x: Tensor, y: Tensor) -> bool:
        x, y = x.float(), y.float()
        return x.shape == y.shape and float((x - y).abs().max()) <= 1e-4 * float(y.abs().max()) + 1e-6

    same_replay = (a.replay is None) == (b.replay is None) and (a.replay is None or a.replay.method == b.replay.method)
    if not (same_replay and close(a.embeds, b.embeds) and close(a.logits, b.logits) and close(a.baseline, b.baseline)):
        return False
    if a.replay is None:
        return True
    start = a.replay.start(0, max(0, a.replay.last - 3))
    with torch.no_grad():
        return close(a.replay.logits(a.replay.block_input(0)[:, start:], 0, start), a.logits)


def _setup_of_run(
    hooked: HookedModel, inputs: dict, run: RunResult, replay: BlockReplay | None, metric: Metric | None, mode: str
) -> Setup:
    """:func:`prepare`'s :class:`Setup` from the (recorded) run of one input row."""
    point = embedding_point(hooked)
    spans = hooked.spans(inputs)
    if mode != "joint" and mode not in spans.masks:
        raise ValueError(f"mode must be 'joint' or a modality of these inputs {spans.modalities}, got {mode!r}")
    embeds = run.cache[point]
    logits = hooked.readout_logits(run.logits, inputs).detach()
    if replay is not None and not (replay.ready(run, inputs) and torch.equal(replay.block_input(0), embeds)):
        replay = None  # e.g. a head that pools positions, or positional embeddings added after the embedding point
    metric = metric or _prob_of_prediction(logits)
    baseline, explained = _baseline(hooked, inputs, spans, embeds, mode)
    return Setup(point, embeds, baseline, explained, spans, logits, metric, metric(logits).detach(), replay)


def _baseline(
    hooked: HookedModel, inputs: dict, spans: ModalitySpans, embeds: Tensor, mode: str
) -> tuple[Tensor, Tensor]:
    """The baseline Float[1, seq, d] (each explained modality's neutral reference at its positions,
    ``embeds`` elsewhere) and the explained positions Bool[1, seq] of one input row."""
    point = embedding_point(hooked)
    baseline = embeds.clone()
    explained = torch.zeros(spans.valid.shape, dtype=torch.bool, device=embeds.device)
    for m in spans.modalities if mode == "joint" else [mode]:
        neutral = hooked.neutral(inputs, m)
        if not hooked.spans(neutral).same_layout(spans):
            raise ValueError(f"the neutral reference of {m!r} changes the layout; explainers need one that keeps it")
        reference = _neutral_embeds(hooked, neutral, point)
        mask = spans.masks[m].to(embeds.device)
        baseline[mask] = reference[mask]
        explained |= mask
    return baseline, explained & spans.valid.to(embeds.device)


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
        baseline, explained = _baseline(hooked, row, row_spans, row_embeds, "joint")
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
        if pack is not False and PACK_TOKENS > 0:
            able = [g for g in groups if g.variants and _trees_allowed(g.setups[0])]
            calls = _cheaper_forest(able, batch_size, always=pack is True)
            if calls is not None:
                for group, values in zip(able, _forest_values(able, calls)):
                    group.values = values
        for group in groups:
            if group.values is None:
                group.values = _group_values(hooked, group, batch_size, pack)
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


def with_embeds(
    hooked: HookedModel, inputs: dict, point: str, embeds: Tensor, metric: Metric, grad: bool = False
) -> Tensor:
    """The metric Float[n] of runs of one input row whose LM-input embeddings (at ``point``) are
    ``embeds`` Float[n, seq, d] (the other inputs repeated to n rows)."""
    batch = hooked.repeat(inputs, embeds.shape[0])
    run = hooked.run(batch, edits=[replace(point, embeds)], grad=grad)
    return metric(hooked.readout_logits(run.logits, batch))


def _gradient_x_input(hooked, inputs, metric, setup: Setup) -> Tensor:
    embeds = setup.embeds.detach().clone().requires_grad_(True)
    value = with_embeds(hooked, inputs, setup.point, embeds, metric, grad=True).sum()
    (grad,) = torch.autograd.grad(value, embeds)
    return ((setup.embeds - setup.baseline) * grad).sum(-1)


def _ig_scores(hooked, inputs, metric, setup: Setup, steps: int, batch_size: int) -> Tensor:
    """Float[1, seq]: integrated gradients with ``steps`` midpoint Riemann steps from the baseline."""
    alphas = (torch.arange(steps, dtype=setup.embeds.dtype, device=setup.embeds.device) + 0.5) / steps
    delta = setup.embeds - setup.baseline
    total = torch.zeros_like(setup.embeds[0])
    for start in range(0, steps, batch_size):
        a = alphas[start : start + batch_size]
        path = (setup.baseline + a[:, None, None] * delta).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(with_embeds(hooked, inputs, setup.point, path, metric, grad=True).sum(), path)
        total += grad.sum(0)
    return (delta[0] * total / steps).sum(-1)[None]


def _integrated_gradients(
    hooked,
    inputs,
    metric,
    setup: Setup,
    steps: int = 32,
    batch_size: int = 16,
    tolerance: float | None = 0.01,
    max_steps: int = 1024,
    on_failure: str = "raise",
    atol: float = 1e-5,
) -> tuple[Tensor, dict]:
    """Integrated gradients with a convergence guard: from ``steps``, the step count doubles until the
    completeness error |sum of scores - (f(x) - f(baseline))| is at most ``tolerance`` * |f(x) -
    f(baseline)| + ``atol`` (float32 rounding of the sums), up to ``max_steps``; past that ``on_failure="raise"``
    refuses with the numbers, ``"record"`` returns the last scores with ``converged=False``.
    ``tolerance=None``: the guard is off (``steps`` exactly; the error is still recorded)."""
    if on_failure not in ("raise", "record"):
        raise ValueError(f"on_failure must be 'raise' or 'record', got {on_failure!r}")
    with torch.no_grad():
        gap = float((setup.value - with_embeds(hooked, inputs, setup.point, setup.baseline, metric))[0])
    allowed = float("inf") if tolerance is None else tolerance * abs(gap) + atol
    tried = []
    while True:
        scores = _ig_scores(hooked, inputs, metric, setup, steps, batch_size)
        error = abs(float(scores[setup.explained].sum()) - gap)
        tried.append((steps, error))
        if error <= allowed or 2 * steps > max_steps:
            break
        steps *= 2
    converged = error <= allowed
    info = {
        "steps_used": steps,
        "completeness_error": error,
        "gap": gap,
        "allowed_error": allowed,
        "converged": converged,
        "guard": "off" if tolerance is None else ("refined" if len(tried) > 1 else "passed"),
        "tried": tried,
    }
    if not converged:
        info["guard"] = "failed"
        if on_failure == "raise":
            raise ValueError(
                f"integrated_gradients did not converge: completeness error {error:.3g} > {allowed:.3g} "
                f"({tolerance} * |f(x) - f(baseline)| = {abs(gap):.3g}) at every step count tried "
                f"{[t for t, _ in tried]}; raise max_steps (now {max_steps}), or pass on_failure='record' "
                "to keep the unconverged scores"
            )
    return scores, info


def _occlusion(
    hooked, inputs, metric, setup: Setup, window: int = 1, batch_size: int = 32, pack: bool | None = None
) -> Tensor:
    return _occlusion_rows(hooked, [inputs], [setup], window, batch_size, pack)[0]


def _occlusion_rows(
    hooked: HookedModel,
    rows: Sequence[dict],
    setups: Sequence[Setup],
    window: int = 1,
    batch_size: int = 32,
    pack: bool | None = None,
) -> list[Tensor]:
    """Occlusion of several rows (Float[1, seq] each), their masked variants run together
    (:func:`masked_values_rows`)."""
    jobs, positions = [], []
    for inputs, setup in zip(rows, setups):
        explained = setup.explained[0].nonzero()[:, 0].tolist()
        masks = []
        for p in explained:
            mask = torch.zeros(setup.explained.shape[1], dtype=torch.bool)
            mask[[q for q in range(p - window // 2, p - window // 2 + window) if q in explained]] = True
            masks.append(mask)
        jobs.append((inputs, setup, masks))
        positions.append(explained)
    values = masked_values_rows(hooked, jobs, batch_size, pack)
    out = []
    for (_, setup, _), explained, value in zip(jobs, positions, values):
        scores = torch.full(setup.explained.shape, float("nan"), device=setup.embeds.device)
        if explained:
            scores[0, explained] = setup.value.float() - value.to(scores.device)
        out.append(scores)
    return out


_occlusion.rows = _occlusion_rows


def _attentions(hooked: HookedModel, inputs: dict) -> list[Tensor]:
    """The LM's attention patterns, one Float[b, heads, seq, seq] per layer, read from each
    attention module's output under eager attention (switched on for the call, restored after; on
    mmlens's own models by the attention modules' ``return_weights`` flag)."""
    from transformers import PreTrainedModel

    from mmlens.core.adapter import get_module

    models = [m for m in hooked.model.modules() if isinstance(m, PreTrainedModel)]
    previous = [m.config._attn_implementation for m in models]
    modules = [
        get_module(hooked.model, hp.attn or hp.site.module)
        for hp in sorted(
            (hp for hp in hooked.hook_points.values() if hp.prefix == "lm" and hp.kind == "attn_out"),
            key=lambda hp: hp.layer,
        )
    ]
    if not modules:
        raise ValueError(f"adapter {hooked.adapter.name!r} has no LM attention points ('lm.blocks.*.attn_out')")
    flagged = [m for m in modules if hasattr(m, "return_weights")]
    flags = [m.return_weights for m in flagged]
    weights: list[Tensor] = []
    handles = [
        m.register_forward_hook(
            lambda module, args, out: weights.append(out[1] if isinstance(out, tuple) and len(out) > 1 else None)
        )
        for m in modules
    ]
    try:
        for m in models:
            m.set_attn_implementation("eager")
        for m in flagged:
            m.return_weights = True
        with torch.no_grad():
            hooked.model(**inputs)
    finally:
        for h in handles:
            h.remove()
        for m, flag in zip(flagged, flags):
            m.return_weights = flag
        for m, implementation in zip(models, previous):
            m.set_attn_implementation(implementation)
    if len(weights) != len(modules) or any(w is None for w in weights):
        raise ValueError(
            f"{type(hooked.model).__name__}'s attention modules did not return their weights under eager attention"
        )
    return weights


def _from_readout(hooked: HookedModel, inputs: dict, matrix: Tensor) -> Tensor:
    """Float[b, seq, seq] -> Float[b, seq]: how much the positions the output reads take from each
    position: row ``last`` (causal LMs), or the mean of the real positions' rows (pooling heads,
    ``Adapter.readout == "mean"``)."""
    spans = hooked.spans(inputs)
    readers = hooked.readout_mask(spans).to(matrix.device).float()
    return (matrix * readers[:, :, None]).sum(1) / readers.sum(1, keepdim=True)


def _attention(hooked, inputs, metric, setup: Setup) -> Tensor:
    """Attention from the read-out positions (the final one; all, for pooling heads), mean over heads
    and layers."""
    weights = torch.stack([a.float().mean(1) for a in _attentions(hooked, inputs)]).mean(0)
    return _from_readout(hooked, inputs, weights)


def _attention_rollout(hooked, inputs, metric, setup: Setup, residual: float = 0.5) -> Tensor:
    """Abnar & Zuidema (2020): per layer ``residual * I + (1 - residual) * mean_heads(A)``,
    rows renormalized, multiplied from the first layer to the last."""
    rollout = None
    for a in _attentions(hooked, inputs):
        mixed = residual * torch.eye(a.shape[-1], device=a.device) + (1 - residual) * a.float().mean(1)
        mixed = mixed / mixed.sum(-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
    return _from_readout(hooked, inputs, rollout)


def _patching(hooked, inputs, metric, setup: Setup, layer: int = 0) -> Tensor:
    """Exact noising per position: the metric's drop when the residual stream entering block
    ``layer`` takes, at one position, its value on the baseline input (the patching engine)."""
    corruption = Corruption(inputs, [replace(setup.point, setup.baseline)], "baseline")
    result = sweep(
        hooked,
        inputs,
        corruption,
        metric,
        hook=f"lm.blocks.{layer}.resid_pre",
        axes=("position",),
        direction="noise",
        progress=False,
    )
    scores = torch.full(setup.explained.shape, float("nan"), device=setup.embeds.device)
    positions = torch.tensor(result.table.position.tolist(), device=scores.device)
    scores[0, positions] = torch.tensor(
        (result.clean[0] - result.table.value).tolist(), dtype=scores.dtype, device=scores.device
    )
    return scores


def _random(hooked, inputs, metric, setup: Setup, seed: int = 0) -> Tensor:
    """Control: standard normal noise, seeded by ``seed`` and the input's embeddings (the same input
    gets the same scores; any change of the input draws new ones). Ignores the model."""
    data = setup.embeds.detach().float().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes()
    generator = torch.Generator().manual_seed(zlib.crc32(data, seed))
    return torch.randn(setup.explained.shape, generator=generator).to(setup.embeds.device)


def _constant(hooked, inputs, metric, setup: Setup) -> Tensor:
    """Control: every explained position scores 1 (uniform)."""
    return torch.ones(setup.explained.shape, device=setup.embeds.device)


def _inverted(hooked, inputs, metric, setup: Setup, **options: Any) -> Tensor:
    """Control: negated occlusion (the options are occlusion's): the most helpful positions rank last."""
    return -_occlusion(hooked, inputs, metric, setup, **options)


def _inverted_rows(hooked: HookedModel, rows: Sequence[dict], setups: Sequence[Setup], **options: Any) -> list[Tensor]:
    return [-scores for scores in _occlusion_rows(hooked, rows, setups, **options)]


_inverted.rows = _inverted_rows


Explainer = Callable[..., "Tensor | tuple[Tensor, dict]"]
"""The explainer contract: ``fn(hooked, inputs, metric, setup, **options)`` with ``inputs`` one row
(batch 1), ``metric`` the :data:`mmlens.methods.patching.Metric` to explain (final-position logits ->
Float[n]) and ``setup`` its :class:`Setup` (LM-input embeddings, baseline, explained positions,
spans); returns Float[1, seq] signed scores (positive: the position supports the metric), or
``(scores, info)`` with a dict of diagnostics for :attr:`Explanation.info`. Scores outside
``setup.explained`` are ignored (set to NaN). An explainer that reads the input only through
``setup`` (``setup.embeds``/``baseline``, :func:`with_embeds`, :func:`masked_values`) can explain
embedding-level variants (``embeds_only=True`` in :func:`register_explainer`, or the attribute
``fn.embeds_only = True`` on a callable passed directly). A ``rows`` attribute explains several rows
at once (see :func:`explain_rows`)."""

EXPLAINERS: dict[str, Explainer] = {
    "gradient_x_input": _gradient_x_input,
    "integrated_gradients": _integrated_gradients,
    "occlusion": _occlusion,
    "attention": _attention,
    "attention_rollout": _attention_rollout,
    "patching": _patching,
    "random": _random,
    "constant": _constant,
    "inverted": _inverted,
}
"""Name -> implementation (the :data:`Explainer` contract); :func:`register_explainer` adds to it."""

CONTROLS: tuple[str, ...] = ("random", "constant", "inverted")
"""The control explainers: seeded noise, uniform scores, negated occlusion; a useful explainer beats them."""

EMBEDS_ONLY: set[str] = {"gradient_x_input", "integrated_gradients", "occlusion", "random", "constant", "inverted"}
"""The explainers that read the input only through their :class:`Setup`, so they can explain
embedding-level variants (:func:`variant_setup`); the attention explainers and ``patching`` re-run
the inputs themselves."""


def register_explainer(name: str, fn: Explainer, *, embeds_only: bool = False, overwrite: bool = False) -> None:
    """Add ``fn`` (the :data:`Explainer` contract) to :data:`EXPLAINERS` as ``name``, usable by
    :func:`explain` and every desideratum. ``embeds_only``: it reads the input only through its setup."""
    if not callable(fn):
        raise TypeError(f"explainer {name!r} must be callable, got {type(fn).__name__}")
    if name in EXPLAINERS and not overwrite:
        raise ValueError(f"explainer {name!r} exists; pass overwrite=True to replace it")
    EXPLAINERS[name] = fn
    EMBEDS_ONLY.discard(name)
    if embeds_only:
        EMBEDS_ONLY.add(name)


def reads_setup_only(method: str | Explainer) -> bool:
    """Whether ``method`` can explain embedding-level variants: a name in :data:`EMBEDS_ONLY`, or a
    callable with the attribute ``embeds_only = True``."""
    return method in EMBEDS_ONLY if isinstance(method, str) else bool(getattr(method, "embeds_only", False))


def explainer_name(method: str | Explainer) -> str:
    """The name a method is reported under: itself, or a callable's ``__name__``."""
    return method if isinstance(method, str) else getattr(method, "__name__", type(method).__name__)


def resolve_explainer(method: str | Explainer) -> Explainer:
    """The implementation of a registered name, or the callable itself."""
    if callable(method):
        return method
    check_method(method)
    return EXPLAINERS[method]


def explain(
    hooked: HookedModel,
    inputs: Mapping[str, Any],
    method: str | Explainer = "integrated_gradients",
    *,
    mode: str = "joint",
    metric: Metric | None = None,
    **options: Any,
) -> Explanation:
    """Explain ``inputs`` with a registered explainer (:data:`EXPLAINERS`) or a callable (the
    :data:`Explainer` contract).

    Args:
        method: ``"gradient_x_input"`` ((input - baseline) . gradient), ``"integrated_gradients"``
            (``steps=32`` midpoint Riemann steps from the baseline, batched, doubled until the
            completeness error is within ``tolerance=0.01`` of |f(x) - f(baseline)|, up to
            ``max_steps=1024``, else ``on_failure="raise"``), ``"occlusion"`` (the metric's drop when
            ``window`` positions take their baseline value, batched), ``"attention"`` (attention from
            the read-out positions, mean over heads and layers), ``"attention_rollout"``
            (``residual=0.5``), ``"patching"`` (exact noising at ``lm.blocks.{layer}.resid_pre``
            through the patching engine); the controls ``"random"`` (``seed``), ``"constant"``,
            ``"inverted"`` (negated occlusion); or a callable.
        mode: ``"joint"`` or one modality (unimodal: the others held at their input values).
        metric: what is explained, on final-position logits (default: per row, :func:`predicted_prob`).
        options: the method's options named above.

    Returns:
        An :class:`Explanation` with NaN outside the explained positions; ``info`` holds the options and,
        per row, whatever the explainer reported (integrated gradients: ``completeness_error``,
        ``steps_used``, ``converged``, ``guard``).
    """
    check_method(method)
    inputs = hooked.check_inputs(inputs)
    rows = [
        explain_row(hooked, prepare(hooked, one, metric, mode), one, method, mode, options)
        for one in (hooked.rows(inputs, row) for row in range(hooked.spans(inputs).batch_size))
    ]
    info = dict(options)
    for key in dict.fromkeys(k for e in rows for k in e.info if k not in options):
        info[key] = [e.info.get(key, [None])[0] for e in rows]
    return Explanation(
        torch.cat([e.scores for e in rows]),
        hooked.spans(inputs),
        explainer_name(method),
        mode,
        torch.cat([e.value for e in rows]),
        info,
    )


def check_method(method: str | Explainer) -> None:
    """Raise, naming the nearest explainers, when ``method`` is neither callable nor in :data:`EXPLAINERS`."""
    if callable(method):
        return
    if method not in EXPLAINERS:
        near = nearest_names(method, EXPLAINERS, n=3, cutoff=0.3, fallback=False)
        raise ValueError(
            f"unknown explainer {method!r}; did you mean {near}? Explainers: {sorted(EXPLAINERS)}, "
            "or register one with mmlens.register_explainer(name, fn)"
        )


def variant_setup(hooked: HookedModel, inputs: dict, setup: Setup, embeds: Tensor) -> Setup:
    """The :class:`Setup` of input row ``inputs`` with its LM-input embeddings replaced by ``embeds``
    Float[1, seq, d] (same baseline, positions and metric; no replay): what an embedding-level
    variant (a dataset-mean or resampled reference, an adversarial perturbation) is explained from."""
    with torch.no_grad():
        logits = with_embeds(hooked, inputs, setup.point, embeds, lambda out: out).detach()
    return Setup(
        setup.point,
        embeds,
        setup.baseline,
        setup.explained,
        setup.spans,
        logits,
        setup.metric,
        setup.metric(logits).detach(),
        None,
        edited=True,
    )


def explain_row(
    hooked: HookedModel, prepared: Setup, one: dict, method: str | Explainer, mode: str, options: Mapping[str, Any]
) -> Explanation:
    """:func:`explain` of one input row from its :func:`prepare` (which fixes the metric and mode)."""
    _check_variant(prepared, method)
    out = resolve_explainer(method)(hooked, one, prepared.metric, prepared, **options)
    return _explanation(prepared, method, mode, options, out)


def explain_rows(
    hooked: HookedModel,
    prepared: Sequence[Setup],
    rows: Sequence[dict],
    method: str | Explainer,
    mode: str,
    options: Mapping[str, Any],
) -> list[Explanation]:
    """:func:`explain_row` of several rows, one :class:`Explanation` each. An explainer with a
    ``rows`` attribute (``fn.rows(hooked, rows, setups, **options)`` -> one Float[1, seq] per row;
    occlusion and its inverted control) explains them in one go, their masked variants run together;
    others one row at a time."""
    together = getattr(resolve_explainer(method), "rows", None)
    if together is None or len(rows) < 2:
        return [explain_row(hooked, p, one, method, mode, options) for p, one in zip(prepared, rows)]
    for p in prepared:
        _check_variant(p, method)
    outs = together(hooked, list(rows), list(prepared), **options)
    return [_explanation(p, method, mode, options, out) for p, out in zip(prepared, outs)]


def _check_variant(prepared: Setup, method: str | Explainer) -> None:
    if prepared.edited and not reads_setup_only(method):
        raise ValueError(
            f"explainer {explainer_name(method)!r} cannot explain an embedding-level variant (it may re-run the "
            f"inputs); explainers that can: {sorted(EMBEDS_ONLY)} (register yours with embeds_only=True, or set "
            "fn.embeds_only = True)"
        )


def _explanation(
    prepared: Setup, method: str | Explainer, mode: str, options: Mapping[str, Any], out: Tensor | tuple
) -> Explanation:
    """The :class:`Explanation` of one row from its explainer's output (scores, or (scores, info))."""
    raw, extra = out if isinstance(out, tuple) else (out, {})
    raw = raw.detach().float()
    scores = torch.where(prepared.explained.to(raw.device), raw, torch.full_like(raw, float("nan"))).cpu()
    info = dict(options)
    info.update({k: [v] for k, v in extra.items()})
    if explainer_name(method) == "occlusion":  # how the masked variants ran: replay (+ kv), or full forwards
        info["forwards"] = [prepared.replay.variant_method if prepared.replay else "full forwards"]
    return Explanation(scores, prepared.spans, explainer_name(method), mode, prepared.value.float().cpu(), info)


__all__ = [
    "CannotRebase",
    "CONTROLS",
    "EMBEDS_ONLY",
    "EXPLAINERS",
    "Explainer",
    "Explanation",
    "Setup",
    "check_method",
    "embedding_point",
    "explain",
    "explain_row",
    "explain_rows",
    "explainer_name",
    "masked_values",
    "masked_values_rows",
    "PREDICTION_METRICS",
    "predicted_prob",
    "prediction_metric",
    "prepare",
    "prepare_rows",
    "rebase_rows",
    "rebased_setups",
    "reads_setup_only",
    "register_explainer",
    "resolve_explainer",
    "variant_setup",
    "with_embeds",
]
