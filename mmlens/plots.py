"""Plots of lens results: the logit-lens grid, layer-wise evolution curves, and saving figures.

Functions return a :class:`matplotlib.figure.Figure`. Without ``ax`` they open a new pyplot figure
(shown by ``plt.show()`` or a notebook's inline backend; close it with ``plt.close(fig)`` when
drawing many); with ``ax`` they draw into that axes' figure.

The plotted objects are duck-typed:

- a lens result has ``layers`` (list[str]), ``top_ids`` / ``top_probs`` ``[layer, batch, pos, k]``,
  ``entropy`` ``[layer, batch, pos]`` (nats), ``tokens`` / ``modalities`` (list[list[str]],
  ``[batch][pos]``, modality ``"pad"`` for padding), ``decode(ids) -> list[str]``, ``lens`` (str) and
  optionally ``decoded`` (Bool ``[batch, pos]``, the positions the lens decoded; others hold id -1);
- an evolution result has ``curves``: a DataFrame with columns
  ``modality, metric, layer, layer_label, mean, low, high``.
"""

from __future__ import annotations

import operator
import zlib
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib import colors as mcolors
from matplotlib import font_manager
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ft2font import FT2Font
from matplotlib.image import AxesImage
from matplotlib.patches import Patch, Rectangle

from mmlens.store import atomic_path

__all__ = [
    "modality_colors",
    "plot_edges",
    "plot_evolution",
    "plot_faithfulness",
    "plot_granger",
    "plot_lens_grid",
    "plot_patching",
    "plot_stability",
    "save_figure",
]

_FIXED_COLORS = {"text": "tab:blue", "graph": "tab:orange", "image": "tab:green", "audio": "tab:red", "pad": "#b0b0b0"}
_OTHER_COLORS = (
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
    "#393b79",
    "#e7ba52",
    "#843c39",
    "#7b4173",
    "#637939",
)
_VALUES = {"prob": ("top-1 probability", "Blues"), "entropy": ("entropy (nats)", "YlOrRd")}
_METRIC_LABELS = {
    "top1_change": "top-1 changed (fraction of positions)",
    "kl_to_final": "KL to final layer (nats)",
    "cosine_to_previous": "cosine to previous layer",
    "final_top1_prob": "prob. of final top-1 token",
    "entropy": "entropy (nats)",
}
_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
_SPACE = "␣"
_ELLIPSIS = "…"
_EMPTY = "∅"
_TICK_CHARS = 16
_CELL_FONTSIZE = 8
_MAX_XTICKS = 9


def modality_colors(names: Sequence[str]) -> dict[str, str]:
    """Colour (hex) of each modality name, the same in every plot.

    ``text``, ``graph``, ``image``, ``audio`` and ``pad`` have fixed colours; other names get one
    of ten further colours chosen by a stable hash of the name, moved on to the next free one when
    an earlier name in ``names`` holds it (so up to ten other names are told apart in one plot).
    """
    out: dict[str, str] = {}
    for name in names:
        if name in _FIXED_COLORS:
            out[name] = mcolors.to_hex(_FIXED_COLORS[name])
            continue
        start = zlib.crc32(name.encode()) % len(_OTHER_COLORS)
        cycle = [mcolors.to_hex(_OTHER_COLORS[(start + i) % len(_OTHER_COLORS)]) for i in range(len(_OTHER_COLORS))]
        out[name] = next((c for c in cycle if c not in out.values()), cycle[0])
    return out


@lru_cache(maxsize=8)
def _charmap(font_path: str) -> frozenset[int]:
    return frozenset(FT2Font(font_path).get_charmap())


def _display_units(text: str) -> list[str]:
    """Display form of each character: edge spaces as "␣", control characters and characters the
    default font lacks as escapes (nothing renders blank, no missing-glyph warning); "" as "∅"."""
    if not text:
        return [_EMPTY]
    glyphs = _charmap(font_manager.findfont(font_manager.FontProperties()))
    core = text.strip(" ")
    lead = len(text) - len(text.lstrip(" "))
    trail = len(text) - lead - len(core) if core else 0
    units = [_SPACE] * lead
    for ch in core:
        if ch in _ESCAPES:
            units.append(_ESCAPES[ch])
        elif not ch.isprintable() or ord(ch) not in glyphs:
            units.append(
                f"\\x{ord(ch):02x}"
                if ord(ch) < 0x100
                else f"\\u{ord(ch):04x}"
                if ord(ch) < 0x10000
                else f"\\U{ord(ch):08x}"
            )
        else:
            units.append(ch)
    return units + [_SPACE] * trail


def _escape(text: str, max_chars: int) -> str:
    """Visible, single-line form of a token, at most ``max_chars`` characters (escapes are never cut)."""
    units = _display_units(text)
    if sum(map(len, units)) <= max_chars:
        return "".join(units)
    out, used = [], 0
    for unit in units:
        if used + len(unit) > max_chars - 1:
            break
        out.append(unit)
        used += len(unit)
    return "".join(out) + _ELLIPSIS


def _numpy(x, dtype=torch.float64) -> np.ndarray:
    return torch.as_tensor(x).detach().to("cpu", dtype).numpy()


def _select_positions(result, row: int, positions) -> list[int]:
    n_batch, n_pos = result.top_ids.shape[1], result.top_ids.shape[2]
    if not -n_batch <= row < n_batch:
        raise IndexError(f"row {row} is out of range: the batch has rows 0..{n_batch - 1}")
    if positions is None:
        decoded = getattr(result, "decoded", None)
        shown = decoded[row].tolist() if decoded is not None else [True] * n_pos
        picked = [p for p, m in enumerate(result.modalities[row][:n_pos]) if m != "pad" and shown[p]]
        if not picked:
            raise ValueError(f"row {row} has no non-pad position; pass positions explicitly")
        return picked
    picked = []
    for p in positions:
        p = operator.index(p)
        if not -n_pos <= p < n_pos:
            raise IndexError(f"position {p} is out of range: valid positions are 0..{n_pos - 1} (or -{n_pos}..-1)")
        picked.append(p % n_pos)
    if not picked:
        raise ValueError("positions is empty")
    return picked


def _new_figure(figsize: tuple[float, float]) -> Figure:
    """A pyplot figure with constrained layout; pyplot is imported only here, so that importing
    this module leaves the backend choice to the user."""
    import matplotlib.pyplot as plt

    return plt.figure(figsize=figsize, layout="constrained")


def _text_color(rgba) -> str:
    r, g, b = rgba[:3]
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"


def _grid_cells(
    result, row: int, positions: Sequence[int] | None, value: str, max_chars: int
) -> tuple[int, list[int], np.ndarray, np.ndarray, dict[int, str]]:
    """The batch row (non-negative), the shown positions, top-1 ids and values ``[layer, col]``, and
    the text of each id (escaped; "" for -1, not decoded)."""
    if value not in _VALUES:
        raise ValueError(f"value must be one of {', '.join(map(repr, _VALUES))}; got {value!r}")
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1; got {max_chars}")
    cols = _select_positions(result, row, positions)
    row = row % result.top_ids.shape[1]
    ids = _numpy(result.top_ids[:, row, cols, 0], torch.long)
    data = _numpy(result.top_probs[:, row, cols, 0] if value == "prob" else result.entropy[:, row, cols])
    if len(result.layers) != data.shape[0]:
        raise ValueError(f"result.layers has {len(result.layers)} labels but the tensors have {data.shape[0]} layers")
    unique = sorted({int(i) for i in ids.ravel() if i >= 0})
    decoded = result.decode(unique) if unique else []
    if len(decoded) != len(unique):
        raise ValueError(f"result.decode returned {len(decoded)} strings for {len(unique)} ids")
    cell_text = {i: _escape(s, max_chars) for i, s in zip(unique, decoded)}
    cell_text.update({int(i): "" for i in ids.ravel() if i < 0})
    return row, cols, ids, data, cell_text


def _draw_cells(ax: Axes, data: np.ndarray, ids: np.ndarray, cell_text: dict[int, str], value: str, cmap) -> AxesImage:
    """Colour ``data`` ``[layer, col]`` by ``value`` and write each cell's top-1 token; returns the image."""
    _, default_cmap = _VALUES[value]
    finite = data[np.isfinite(data)]
    vmax = 1.0 if value == "prob" else (float(finite.max()) if finite.size and finite.max() > 0 else 1.0)
    image = ax.imshow(
        data, origin="lower", aspect="auto", cmap=cmap or default_cmap, vmin=0.0, vmax=vmax, interpolation="nearest"
    )
    for (layer, col), v in np.ndenumerate(data):
        color = _text_color(image.cmap(image.norm(v))) if np.isfinite(v) else "black"
        ax.text(
            col,
            layer,
            cell_text[int(ids[layer, col])],
            ha="center",
            va="center",
            fontsize=_CELL_FONTSIZE,
            color=color,
            parse_math=False,
        )
    return image


def _draw_modality_strip(ax: Axes, modalities: list[str], colors: dict[str, str], n_layers: int) -> None:
    """A strip under the grid coloured by each column's modality, lines at modality boundaries, and the limits."""
    n_cols = len(modalities)
    strip_low, strip_high = -0.5 - 0.45, -0.5 - 0.1
    for col, modality in enumerate(modalities):
        ax.add_patch(
            Rectangle(
                (col - 0.5, strip_low),
                1.0,
                strip_high - strip_low,
                facecolor=colors[modality],
                edgecolor="none",
                gid=f"modality:{modality}",
            )
        )
    for col in range(1, n_cols):
        if modalities[col] != modalities[col - 1]:
            ax.plot(
                [col - 0.5, col - 0.5],
                [strip_low, n_layers - 0.5],
                color="black",
                linewidth=1.5,
                gid="modality-boundary",
            )
    ax.set_xlim(-0.5, n_cols - 0.5)
    ax.set_ylim(strip_low, n_layers - 0.5)


def _label_grid(ax: Axes, tokens: list[str], modalities: list[str], colors: dict[str, str], layers: list[str]) -> None:
    """Token tick labels in modality colours, layer tick labels and axis labels."""
    ax.set_xticks(range(len(tokens)), [_escape(t, _TICK_CHARS) for t in tokens], rotation=90)
    for tick_label, modality in zip(ax.get_xticklabels(), modalities):
        tick_label.set_parse_math(False)
        tick_label.set_color(colors[modality])
    ax.tick_params(axis="x", length=0)
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("input token")
    ax.set_ylabel("layer")


def _modality_legend(ax: Axes, colors: dict[str, str]) -> None:
    """One legend entry per modality, in a row above the axes."""
    ax.legend(
        handles=[Patch(facecolor=c, label=m) for m, c in colors.items()],
        loc="lower left",
        bbox_to_anchor=(0.0, 1.0),
        ncol=len(colors),
        frameon=False,
        fontsize="small",
        borderaxespad=0.2,
        handlelength=1.0,
        columnspacing=1.0,
    )


def plot_lens_grid(
    result,
    row: int = 0,
    positions: Sequence[int] | None = None,
    value: str = "prob",
    max_chars: int = 8,
    ax: Axes | None = None,
    title: str | None = None,
    cmap=None,
) -> Figure:
    """Logit-lens grid of one batch row: the top-1 token of every layer at every position.

    Rows are layers (``result.layers``; the earliest at the bottom, the final layer on top), columns
    are positions (``positions``: ints, negative from the end; default every decoded non-pad
    position of ``row``). Each cell shows the top-1 token (escaped: "␣" for edge spaces, "\\n"
    for newlines, "∅" for an empty text; at most ``max_chars`` characters; blank where the id is
    -1, not decoded) on a colour of ``value``: ``"prob"`` (top-1 probability, 0..1) or
    ``"entropy"`` (of the lens distribution, nats, 0..max shown). X tick labels are the input
    tokens, escaped the same way; a strip under the grid and the tick label colours mark each
    column's modality, with vertical lines at modality boundaries.
    """
    row, cols, ids, data, cell_text = _grid_cells(result, row, positions, value, max_chars)
    n_layers, n_cols = data.shape
    modalities = [result.modalities[row][p] for p in cols]
    colors = modality_colors(list(dict.fromkeys(modalities)))
    if ax is None:
        widest = max(map(len, cell_text.values()))
        fig = _new_figure((2.6 + n_cols * max(0.45, 0.075 * widest + 0.15), 2.4 + 0.3 * n_layers))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    image = _draw_cells(ax, data, ids, cell_text, value, cmap)
    _draw_modality_strip(ax, modalities, colors, n_layers)
    _label_grid(ax, [result.tokens[row][p] for p in cols], modalities, colors, result.layers)
    fig.colorbar(image, ax=ax, label=_VALUES[value][0], fraction=0.05, pad=0.02)
    _modality_legend(ax, colors)
    lens = getattr(result, "lens", "")
    ax.set_title(
        title if title is not None else f"{lens.capitalize() + ' lens' if lens else 'Lens'} · row {row}",
        loc="left",
        pad=22,
    )
    return fig


def _layer_ticks(labels: dict[int, str]) -> tuple[list[int], list[str]]:
    """About ``_MAX_XTICKS`` evenly spaced layer ticks at most, always with the first and last layer."""
    layers = sorted(labels)
    step = -(-len(layers) // _MAX_XTICKS)
    picked = list(range(0, len(layers), step))
    if picked[-1] != len(layers) - 1:
        if 2 * (len(layers) - 1 - picked[-1]) >= step:
            picked.append(len(layers) - 1)
        else:
            picked[-1] = len(layers) - 1
    return [layers[i] for i in picked], [labels[layers[i]] for i in picked]


def plot_evolution(
    evo,
    metrics: Sequence[str] | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    title: str | None = None,
    bands: pd.DataFrame | None = None,
) -> Figure:
    """Layer-wise curves of ``evo.curves``: one panel per metric (in a row), one line per modality
    (mean over inputs, shaded 95% CI ``low..high``), x = layer labelled by ``layer_label``.

    ``metrics`` picks and orders the panels (default: every metric, in order of appearance);
    ``ax`` is one Axes per metric. Layers where a metric is undefined (NaN mean) are left out.
    ``bands`` (columns ``metric, layer, band`` with ``band`` "less" or "more", e.g. from per-layer
    tests after Holm correction) shades those layers behind the curves: green where the first
    span evolves significantly less, red where it evolves more.
    """
    curves: pd.DataFrame = evo.curves
    missing = {"modality", "metric", "layer", "layer_label", "mean", "low", "high"} - set(curves.columns)
    if missing:
        raise ValueError(f"evo.curves lacks columns {sorted(missing)}")
    available = list(dict.fromkeys(curves["metric"]))
    metrics = available if metrics is None else [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in metrics if m not in available]
    if unknown or not metrics:
        raise ValueError(f"unknown or no metrics {unknown}; evo.curves has {available}")
    if ax is None:
        fig = _new_figure((0.6 + 3.8 * len(metrics), 3.4))
        axes = list(fig.subplots(1, len(metrics), squeeze=False)[0])
    else:
        axes = [ax] if isinstance(ax, Axes) else list(ax)
        if len(axes) != len(metrics):
            raise ValueError(f"got {len(axes)} axes for {len(metrics)} metrics {metrics}")
        fig = axes[0].figure
    colors = modality_colors(list(dict.fromkeys(curves["modality"])))
    labels = dict(zip(curves["layer"].astype(int), curves["layer_label"].astype(str)))
    ticks, tick_labels = _layer_ticks(labels)

    for panel, metric in zip(axes, metrics):
        if bands is not None:
            _shade_layers(panel, bands[bands["metric"] == metric])
        for modality, color in colors.items():
            sub = curves[(curves["metric"] == metric) & (curves["modality"] == modality)].sort_values("layer")
            sub = sub[np.isfinite(sub["mean"].to_numpy(dtype=float))]
            if sub.empty:
                continue
            x = sub["layer"].to_numpy(dtype=int)
            panel.fill_between(
                x,
                sub["low"].to_numpy(dtype=float),
                sub["high"].to_numpy(dtype=float),
                color=color,
                alpha=0.2,
                linewidth=0,
            )
            panel.plot(x, sub["mean"].to_numpy(dtype=float), color=color, marker="o", markersize=3, label=modality)
        panel.set_xticks(ticks, tick_labels)
        panel.set_xlabel("layer")
        panel.set_ylabel(_METRIC_LABELS.get(metric, metric.replace("_", " ")))
        panel.grid(alpha=0.3)
    axes[0].legend(title="modality (95% CI)", fontsize="small", title_fontsize="small")
    if bands is not None:
        fig.supxlabel(_BAND_NOTE, fontsize="x-small", color="0.3")  # constrained layout keeps it clear of the axes
    if title is not None:
        fig.suptitle(title)
    return fig


_BAND_COLORS = {"less": "#2ca02c", "more": "#d62728"}
_BAND_NOTE = "shaded layers: significant after Holm correction (green: evolves less, red: evolves more)"


def _shade_layers(panel: Axes, bands: pd.DataFrame) -> None:
    """Shade each layer of ``bands`` (columns ``layer``, ``band``) in its band's colour."""
    unknown = set(bands["band"]) - set(_BAND_COLORS)
    if unknown:
        raise ValueError(f"bands['band'] must be 'less' or 'more', got {sorted(unknown)}")
    for layer, band in zip(bands["layer"].astype(int), bands["band"]):
        panel.axvspan(layer - 0.5, layer + 0.5, color=_BAND_COLORS[band], alpha=0.12, linewidth=0, zorder=0)


def plot_patching(
    result,
    pair: int = 0,
    value: str = "normalized",
    ax: Axes | None = None,
    title: str | None = None,
    cmap: str = "RdBu_r",
) -> Figure:
    """Heatmap of a patching sweep (:class:`mmlens.methods.patching.SweepResult`) for one input pair.

    Rows are the first swept axis (e.g. layer, earliest at the bottom), columns the second
    (position, span or head). ``value``: ``"normalized"`` (fraction of the clean-corrupted gap
    restored, colour scale symmetric around 0) or ``"value"`` (the raw metric). With a position axis
    the x tick labels are the input tokens, coloured by modality, with lines at modality boundaries.
    """
    table = result.table[result.table["pair"] == pair]
    if table.empty:
        raise IndexError(f"no cells for pair {pair}; pairs are {sorted(result.table['pair'].unique())}")
    if value not in table.columns:
        raise ValueError(
            f"value must be a column of the table ({', '.join(c for c in ('value', 'normalized', 'effect') if c in table)}); got {value!r}"
        )
    axes = list(result.axes)
    rows_axis, cols_axis = (axes[0], axes[1]) if len(axes) >= 2 else (None, axes[0])
    cols = list(dict.fromkeys(table[cols_axis]))
    rows = list(dict.fromkeys(table[rows_axis])) if rows_axis else [None]
    data = np.full((len(rows), len(cols)), np.nan)
    for r in table.itertuples(index=False):
        i = rows.index(getattr(r, rows_axis)) if rows_axis else 0
        data[i, cols.index(getattr(r, cols_axis))] = getattr(r, value)
    if ax is None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(2.5 + 0.32 * len(cols), 1.6 + 0.22 * len(rows)), layout="constrained")
    else:
        fig = ax.figure
    finite = data[np.isfinite(data)]
    bound = float(np.abs(finite).max()) if finite.size else 1.0
    image = ax.imshow(
        data, origin="lower", aspect="auto", cmap=cmap, vmin=-bound or -1.0, vmax=bound or 1.0, interpolation="nearest"
    )
    label = {
        "normalized": "restored fraction of the clean-corrupted gap",
        "value": "metric",
        "effect": "estimated effect",
    }.get(value, value)
    fig.colorbar(image, ax=ax, label=label, fraction=0.05, pad=0.02)
    if cols_axis == "position" and "token" in table.columns:
        first = table.drop_duplicates("position").set_index("position")
        modalities = [first.loc[c, "modality"] for c in cols]
        colors = modality_colors(list(dict.fromkeys(modalities)))
        ax.set_xticks(range(len(cols)), [_escape(str(first.loc[c, "token"]), _TICK_CHARS) for c in cols], rotation=90)
        for tick, m in zip(ax.get_xticklabels(), modalities):
            tick.set_parse_math(False)
            tick.set_color(colors[m])
        for c in range(1, len(cols)):
            if modalities[c] != modalities[c - 1]:
                ax.axvline(c - 0.5, color="black", linewidth=1.5, gid="modality-boundary")
        _modality_legend(ax, colors)
    else:
        ax.set_xticks(range(len(cols)), [str(c) for c in cols], rotation=90 if len(cols) > 12 else 0)
    ax.set_xlabel(cols_axis)
    if rows_axis:
        ax.set_yticks(range(len(rows)), [str(r) for r in rows])
        ax.set_ylabel(rows_axis)
    else:
        ax.set_yticks([])
    ax.set_title(title if title is not None else f"{result.direction} patching at {result.hook}", loc="left", pad=18)
    return fig


def plot_edges(
    scores,
    pair: int = 0,
    span: str | None = None,
    value: str = "score",
    ax: Axes | None = None,
    title: str | None = None,
    cmap: str = "RdBu_r",
) -> Figure:
    """Heatmap of edge attribution scores (:class:`mmlens.methods.patching.EdgeScores`): senders as rows,
    receivers as columns, blank where no edge exists; ``span`` restricts to sender positions of one
    modality (scores computed with ``by="span"``)."""
    data = scores.matrix(pair, span, value).to_numpy(dtype=float)
    if ax is None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(2.5 + 0.22 * data.shape[1], 1.6 + 0.2 * data.shape[0]), layout="constrained")
    else:
        fig = ax.figure
    finite = data[np.isfinite(data)]
    bound = float(np.abs(finite).max()) if finite.size else 1.0
    image = ax.imshow(
        data, origin="upper", aspect="auto", cmap=cmap, vmin=-bound or -1.0, vmax=bound or 1.0, interpolation="nearest"
    )
    fig.colorbar(
        image,
        ax=ax,
        label={"score": "estimated effect on the metric", "normalized": "fraction of the clean-corrupted gap"}.get(
            value, value
        ),
        fraction=0.05,
        pad=0.02,
    )
    short = [
        n.removeprefix("lm.blocks.")
        .replace(".resid_pre", " input")
        .replace(".attn_out", " attn")
        .replace(".mlp_out", " mlp")
        .replace("lm.final_norm", "logits")
        for n in scores.nodes
    ]
    ax.set_yticks(range(data.shape[0]), short[:-1], fontsize="small")
    ax.set_xticks(range(data.shape[1]), short[1:], rotation=90, fontsize="small")
    ax.set_ylabel("sender")
    ax.set_xlabel("receiver")
    where = f", {span} positions" if span else ""
    ax.set_title(title if title is not None else f"edge attribution patching{where}", loc="left")
    return fig


def plot_faithfulness(results: Mapping[str, Any], scope: str | None = None) -> Figure:
    """Sufficiency gap and necessity drop over k, one line per explainer and a dashed line for its
    random baseline (``results``: explainer -> :class:`mmlens.metrics.desiderata.FaithfulnessResult`);
    ``scope``: a modality or ``"joint"`` (default: joint when present)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    for i, (name, result) in enumerate(results.items()):
        curves = result.curves
        chosen = scope or ("joint" if "joint" in set(curves.scope) else curves.scope.iloc[0])
        mean = curves[curves.scope == chosen].groupby(["source", "k"])[["sufficiency_gap", "necessity_drop"]].mean()
        color = f"C{i}"
        for ax, column in zip(axes, ["sufficiency_gap", "necessity_drop"]):
            for source, style in (("explanation", "-"), ("random", "--")):
                if source in mean.index.get_level_values(0):
                    line = mean.loc[source][column]
                    ax.plot(
                        line.index,
                        line.to_numpy(),
                        style,
                        color=color,
                        marker="o",
                        markersize=3,
                        label=f"{name}" if source == "explanation" else f"{name} (random)",
                    )
    axes[0].set_ylabel("sufficiency gap |f(keep) - f(x)|  (lower is better)")
    axes[1].set_ylabel("necessity drop f(x) - f(remove)  (higher is better)")
    for ax in axes:
        ax.set_xlabel("k (fraction of each modality's positions)")
    axes[1].legend(fontsize="small", frameon=False)
    fig.suptitle(f"faithfulness ({scope or 'joint'})", x=0.02, ha="left")
    return fig


def plot_granger(result) -> Figure:
    """Delta_m (output change) against delta_{m->n} (explanation change) per input, one panel per
    ablated modality, one colour per explainer (:class:`mmlens.metrics.desiderata.GrangerResult`)."""
    import matplotlib.pyplot as plt

    table = result.explanations
    ablated = list(dict.fromkeys(table.ablated))
    fig, axes = plt.subplots(1, len(ablated), figsize=(4.2 * len(ablated), 3.4), layout="constrained", squeeze=False)
    for ax, m in zip(axes[0], ablated):
        sub = table[table.ablated == m]
        for i, (name, group) in enumerate(sub.groupby("explainer", sort=False)):
            ax.scatter(group.delta_js, group.delta, s=18, color=f"C{i}", label=name)
        ax.set_xlabel(f"Delta: output change when {m} is neutral (JS, nats)")
        ax.set_ylabel(f"delta: explanation change ({result.distance})")
        ax.set_title(f"ablate {m}", loc="left")
    axes[0][-1].legend(fontsize="small", frameon=False)
    return fig


def plot_stability(result) -> Figure:
    """Distributions of the Lipschitz ratio per (perturbed -> explained modality), one box per
    explainer (:class:`mmlens.metrics.desiderata.StabilityResult`, kept samples only)."""
    import matplotlib.pyplot as plt

    samples = result.samples[result.samples.kept]
    pairs = list(dict.fromkeys(zip(samples.perturbed, samples.explained)))
    names = list(dict.fromkeys(samples.explainer))
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(pairs) * max(1, len(names)) / 2, 3.4), layout="constrained")
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        data = [
            samples[(samples.explainer == name) & (samples.perturbed == m) & (samples.explained == n)].ratio.to_numpy()
            for m, n in pairs
        ]
        positions = [j + (i - (len(names) - 1) / 2) * width for j in range(len(pairs))]
        parts = ax.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True, showfliers=True)
        for box in parts["boxes"]:
            box.set_facecolor(f"C{i}")
            box.set_alpha(0.6)
        ax.plot([], [], color=f"C{i}", linewidth=6, alpha=0.6, label=name)
    ax.set_xticks(range(len(pairs)), [f"{m} -> {n}" for m, n in pairs])
    ax.set_yscale("log")
    ax.set_ylabel("||E(x) - E(x')|| / ||x - x'||")
    ax.set_xlabel("perturbed -> explained modality")
    ax.legend(fontsize="small", frameon=False)
    return fig


def save_figure(fig: Figure, path_stem: str | Path, formats: Sequence[str] | str = ("png", "svg")) -> list[Path]:
    """Save ``fig`` as ``{path_stem}.{format}`` for each format (raster at 150 dpi, svg/pdf as vectors),
    creating parent folders and writing each file atomically; returns the written paths."""
    formats = [formats] if isinstance(formats, str) else list(formats)
    supported = fig.canvas.get_supported_filetypes()
    unknown = [f for f in formats if f not in supported]
    if unknown or not formats:
        raise ValueError(f"unsupported or no formats {unknown}; choose from {sorted(supported)}")
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.parent / f"{stem.name}.{fmt}"
        metadata = {"Date": None} if fmt == "svg" else None
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight", metadata=metadata)
        paths.append(path)
    return paths
