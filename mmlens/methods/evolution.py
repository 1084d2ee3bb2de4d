"""How much each modality's decoded predictions evolve across layers, with bootstrap intervals.

Four metrics, computed per input row over the positions of one modality span, then summarised
over inputs with percentile-bootstrap confidence intervals (inputs are the resampled unit):

- ``top1_change``: fraction of (layer transition, position) pairs whose top-1 token differs from
  the previous layer's. Lower = evolves less.
- ``kl_to_final``: mean KL(final || layer) over the non-final layers, in nats. Lower = closer to
  the final prediction throughout.
- ``cosine_to_previous``: mean cosine similarity of a position's residual vector with the previous
  layer's. Higher = changes less.
- ``first_final_top1_layer``: the earliest layer row (0 = embeddings) whose top-1 equals the final
  layer's, averaged over positions. Lower = the final answer appears earlier.

By default each row's first real position is left out: it is an attention sink (BOS or the first
template token) whose residual behaves unlike any other. ``layers=`` restricts every metric to a
contiguous run of layer rows, e.g. ``result.layers[1:]`` to leave out the embedding row (whose
decoding is the input token itself and dominates KL and cosine): transitions, KL and first
appearance then count only those rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from mmlens.core.edits import replace as replace_edit
from mmlens.core.wrapper import HookedModel
from mmlens.methods.lens import FinalNorm, LensResult, logit_lens_variants, modality_mask

METRICS: dict[str, str] = {
    "top1_change": "lower",
    "kl_to_final": "lower",
    "cosine_to_previous": "higher",
    "first_final_top1_layer": "lower",
}
"""Each metric and the direction in which a span "evolves less"."""


def bootstrap_ci(values: Tensor, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``values`` Float[n] and its percentile-bootstrap interval ``(mean, low, high)``."""
    values = values.double()
    if values.numel() == 0:
        return float("nan"), float("nan"), float("nan")
    g = torch.Generator().manual_seed(seed)
    means = values[torch.randint(values.numel(), (n_boot, values.numel()), generator=g)].mean(1)
    alpha = (1 - ci) / 2
    low, high = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return float(values.mean()), low, high


@dataclass
class Evolution:
    """What :func:`evolution` returns.

    Attributes:
        layers: layer labels (as in the :class:`LensResult`).
        per_input: one row per (input, modality, metric): ``value`` is that input's summary.
        per_layer: one row per (input, modality, metric, layer) for the per-layer metrics.
        curves: ``modality, metric, layer, layer_label, mean, low, high``: per-layer means over inputs.
        summary: ``modality, metric, mean, low, high, n_inputs``: the per-input values' mean and interval.
        n_boot, ci, seed: the bootstrap settings.
    """

    layers: list[str]
    per_input: pd.DataFrame
    per_layer: pd.DataFrame
    curves: pd.DataFrame
    summary: pd.DataFrame
    n_boot: int
    ci: float
    seed: int

    def compare(self, a: str, b: str) -> pd.DataFrame:
        """Paired comparison of modality ``a`` against ``b`` over the inputs that have both.

        Returns one row per metric: ``metric, mean_a, mean_b, diff`` (a - b) with its bootstrap
        interval ``low, high``, ``direction`` (which way "evolves less" points) and
        ``a_evolves_less``: True when the whole interval lies on that side of zero.
        """
        rows = []
        for metric, direction in METRICS.items():
            table = self.per_input[self.per_input.metric == metric].pivot(
                index="input", columns="modality", values="value"
            )
            if a not in table or b not in table:
                raise KeyError(f"modalities {a!r} and {b!r} must both be present; have {sorted(table.columns)}")
            pair = table[[a, b]].dropna()
            diff = torch.tensor((pair[a] - pair[b]).to_numpy())
            mean, low, high = bootstrap_ci(diff, self.n_boot, self.ci, self.seed)
            less = high < 0 if direction == "lower" else low > 0
            rows.append(
                {
                    "metric": metric,
                    "mean_a": float(pair[a].mean()),
                    "mean_b": float(pair[b].mean()),
                    "diff": mean,
                    "low": low,
                    "high": high,
                    "direction": direction,
                    "a_evolves_less": bool(less),
                    "n_inputs": len(pair),
                }
            )
        return pd.DataFrame(rows)


def evolution(
    result: LensResult,
    modalities: list[str] | None = None,
    *,
    exclude_first: bool = True,
    layers: Sequence[int | str] | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> Evolution:
    """Evolution metrics (module docstring) per modality span of a :class:`LensResult`.

    Args:
        result: a logit- or tuned-lens result over a batch of inputs.
        modalities: spans to measure (default: all in the inputs).
        exclude_first: leave out each row's first real position (the attention sink).
        layers: the layer rows to measure, as labels (``"embed"``, ``"0"``, ...) or row indices,
            a contiguous run of at least two (default all); ``result.layers[1:]`` drops the
            embedding row. KL stays relative to the result's final layer.
        n_boot, ci, seed: percentile-bootstrap settings.
    """
    modalities = modalities or result.spans.modalities
    rows = layer_rows(result.layers, layers)
    per_input, per_layer = _per_input_and_layer(result, modalities, exclude_first, rows)
    return Evolution(
        layers=list(result.layers),
        per_input=per_input,
        per_layer=per_layer,
        curves=layer_curves(per_layer, result.layers, n_boot, ci, seed),
        summary=_summary(per_input, n_boot, ci, seed),
        n_boot=n_boot,
        ci=ci,
        seed=seed,
    )


def layer_rows(labels: Sequence[str], layers: Sequence[int | str] | None) -> list[int]:
    """Row indices of ``layers`` (labels or indices into ``labels``), checked to be a contiguous
    increasing run of at least two rows; all rows when ``layers`` is None."""
    if layers is None:
        return list(range(len(labels)))
    rows = []
    for layer in layers:
        if isinstance(layer, str):
            if layer not in labels:
                raise ValueError(f"layers: {layer!r} is not a layer label; the labels are {list(labels)}")
            rows.append(list(labels).index(layer))
        else:
            rows.append(int(layer) % len(labels))
    if len(rows) < 2 or rows != list(range(rows[0], rows[0] + len(rows))):
        raise ValueError(
            f"layers must be a contiguous increasing run of at least two layer rows, got {list(layers)}; "
            "pass e.g. result.layers[1:] to drop the embedding row"
        )
    return rows


def _layer_values(result: LensResult, rows: list[int]) -> tuple[dict[str, tuple[Tensor, list[int]]], Tensor]:
    """The per-layer metrics over layer ``rows``, each as (values Float[layer', b, pos], the layer row
    of each entry), and Float[b, pos]: the earliest of ``rows`` whose top-1 equals the final layer's."""
    final = len(result.layers) - 1
    top1 = result.top_ids[rows, ..., 0]
    changed = (top1[1:] != top1[:-1]).float()
    is_final = top1 == result.top_ids[final, ..., 0][None]
    layer_index = torch.tensor(rows)[:, None, None].expand_as(top1)
    first_final = torch.where(is_final, layer_index, final + 1).amin(0).float()
    non_final = [r for r in rows if r != final]
    per_layer_values = {
        "top1_change": (changed, rows[1:]),
        "kl_to_final": (result.kl_to_final[non_final], non_final),
        "cosine_to_previous": (result.cosine_to_previous[rows[1:]], rows[1:]),
    }
    return per_layer_values, first_final


def _per_input_and_layer(
    result: LensResult, modalities: list[str], exclude_first: bool, rows: list[int]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``per_input`` and ``per_layer`` tables of an :class:`Evolution` over layer ``rows``."""
    per_layer_values, first_final = _layer_values(result, rows)
    per_input, per_layer = [], []
    for m in modalities:
        if m not in result.spans.masks:
            raise KeyError(f"span {m!r} is not in these inputs; spans here: {result.spans.modalities}")
        mask = modality_mask(result, m, exclude_first)
        for row in range(mask.shape[0]):
            where = mask[row]
            if not where.any():
                continue
            for metric, (values, index) in per_layer_values.items():
                by_layer = values[:, row, where].mean(-1)
                per_input.append({"input": row, "modality": m, "metric": metric, "value": float(by_layer.mean())})
                per_layer.extend(
                    {"input": row, "modality": m, "metric": metric, "layer": i, "value": float(v)}
                    for i, v in zip(index, by_layer.tolist())
                )
            per_input.append(
                {
                    "input": row,
                    "modality": m,
                    "metric": "first_final_top1_layer",
                    "value": float(first_final[row, where].mean()),
                }
            )
    per_input_df = pd.DataFrame(per_input, columns=["input", "modality", "metric", "value"])
    per_layer_df = pd.DataFrame(per_layer, columns=["input", "modality", "metric", "layer", "value"])
    if per_input_df.empty:
        raise ValueError(
            f"no positions of {modalities} in these inputs (after excluding first positions: {exclude_first})"
        )
    return per_input_df, per_layer_df


def layer_curves(
    per_layer: pd.DataFrame, layers: Sequence[str], n_boot: int = 200, ci: float = 0.95, seed: int = 0
) -> pd.DataFrame:
    """The ``curves`` table of an :class:`Evolution` from a ``per_layer`` table (columns ``modality,
    metric, layer, value``; ``layers`` the layer labels): per modality, metric and layer the mean
    over inputs with its percentile-bootstrap interval."""
    curves = []
    for (m, metric, layer), group in per_layer.groupby(["modality", "metric", "layer"], sort=False):
        mean, low, high = bootstrap_ci(torch.tensor(group.value.to_numpy()), n_boot, ci, seed)
        curves.append(
            {
                "modality": m,
                "metric": metric,
                "layer": int(layer),
                "layer_label": layers[int(layer)],
                "mean": mean,
                "low": low,
                "high": high,
            }
        )
    return pd.DataFrame(curves)


def _summary(per_input: pd.DataFrame, n_boot: int, ci: float, seed: int) -> pd.DataFrame:
    """The ``summary`` table of an :class:`Evolution`: each metric's mean over inputs with its interval."""
    summary = []
    for (m, metric), group in per_input.groupby(["modality", "metric"], sort=False):
        mean, low, high = bootstrap_ci(torch.tensor(group.value.to_numpy()), n_boot, ci, seed)
        summary.append(
            {"modality": m, "metric": metric, "mean": mean, "low": low, "high": high, "n_inputs": len(group)}
        )
    return pd.DataFrame(summary)


ROWS = ("all_layers", "no_embedding_row")
"""The layer rows :func:`condition_tables` measures: every row, and all but the embedding row."""


def condition_tables(
    hooked: HookedModel,
    inputs: Mapping[str, Any],
    span: str,
    name: str,
    *,
    slots: Tensor | None = None,
    variants: Sequence[FinalNorm] = (True,),
    positions: Tensor | None = None,
    with_text: bool = True,
    n_boot: int = 200,
    seed: int = 0,
    progress: bool = False,
) -> dict[FinalNorm, dict[str, tuple[pd.DataFrame, pd.DataFrame]]]:
    """Evolution tables of one condition of a slot-control comparison, under several lens variants
    from ONE recorded forward (:func:`~mmlens.methods.lens.logit_lens_variants`).

    The condition is the model's own inputs (``slots=None``) or ``inputs`` with the input embeddings
    at ``span``'s positions replaced by ``slots`` Float[b, K, d] (at ``fusion.embeds``). The lens
    decodes ``positions`` (Bool[b, seq]; default every real position) and, with
    ``with_text=False``, only the span's positions among them. Returns
    ``{final_norm: {rows: (per_input, per_layer)}}`` for each of :data:`ROWS`, the :func:`evolution`
    tables of ``span`` (renamed ``name`` in their ``modality`` column) and, with text, of ``text``.
    """
    edits = [] if slots is None else [replace_edit("fusion.embeds", slots, at=span)]
    found = hooked.spans(inputs)
    where = found.mask(positions) & (found.valid if with_text else found.masks[span])
    results = logit_lens_variants(hooked, inputs, list(variants), k=1, positions=where, edits=edits, progress=progress)
    spans = [span, "text"] if with_text else [span]
    out: dict[FinalNorm, dict[str, tuple[pd.DataFrame, pd.DataFrame]]] = {}
    for variant, result in results.items():
        out[variant] = {}
        for rows, layers in zip(ROWS, (None, result.layers[1:])):
            evo = evolution(result, spans, layers=layers, n_boot=n_boot, seed=seed)
            rename = {"modality": {span: name}}
            out[variant][rows] = (evo.per_input.replace(rename), evo.per_layer.replace(rename))
    return out
