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

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from mmlens.core.edits import replace
from mmlens.core.names import nearest_names
from mmlens.core.spans import ModalitySpans
from mmlens.core.wrapper import HookedModel
from mmlens.methods.patching import Corruption, Metric, sweep
from mmlens.methods.setups import (
    PREDICTION_METRICS,
    Setup,
    embedding_point,
    predicted_prob,
    prediction_metric,
    prepare,
    prepare_rows,
    variant_setup,
    with_embeds,
)
from mmlens.methods.variants import CannotRebase, masked_values, masked_values_rows, rebase_rows, rebased_setups


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
