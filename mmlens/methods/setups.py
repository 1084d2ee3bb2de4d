"""The setup of an explained input row, which every explainer and desideratum starts from.

One recorded forward of a row gives its LM-input embeddings, its final logits, the explained metric
(by default :func:`predicted_prob`), each explained modality's neutral baseline and the replay
engine of its blocks (:class:`mmlens.core.replay.BlockReplay`): a :class:`Setup`. Rows that share a
layout are prepared from one batched forward (:func:`prepare_rows`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mmlens.core.edits import replace
from mmlens.core.plan import RunResult
from mmlens.core.replay import BlockReplay
from mmlens.core.spans import ModalitySpans
from mmlens.core.wrapper import HookedModel
from mmlens.methods.patching import Metric


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
    baseline, explained = baseline_of(hooked, inputs, spans, embeds, mode)
    return Setup(point, embeds, baseline, explained, spans, logits, metric, metric(logits).detach(), replay)


def baseline_of(
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


def with_embeds(
    hooked: HookedModel, inputs: dict, point: str, embeds: Tensor, metric: Metric, grad: bool = False
) -> Tensor:
    """The metric Float[n] of runs of one input row whose LM-input embeddings (at ``point``) are
    ``embeds`` Float[n, seq, d] (the other inputs repeated to n rows)."""
    batch = hooked.repeat(inputs, embeds.shape[0])
    run = hooked.run(batch, edits=[replace(point, embeds)], grad=grad)
    return metric(hooked.readout_logits(run.logits, batch))


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


__all__ = [
    "baseline_of",
    "BATCHED_SETUPS_AGREE",
    "embedding_point",
    "predicted_prob",
    "prediction_metric",
    "PREDICTION_METRICS",
    "prepare",
    "prepare_rows",
    "Setup",
    "variant_setup",
    "with_embeds",
]
