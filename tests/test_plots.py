"""Plots: the lens grid shows the right tokens, values, orientation and modality marks; evolution
curves the right data; save_figure writes real PNG and SVG files."""

from __future__ import annotations

import io
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.colors import to_hex, to_rgba
from matplotlib.figure import Figure
from PIL import Image

from mmlens.plots import modality_colors, plot_evolution, plot_lens_grid, save_figure

VOCAB = ["the", " cat", "\n", "  two", "averyverylongtoken", "$x$", "", "tab\t", "中"]
N_LAYER, BATCH, POS, K = 4, 2, 7, 3
TOKENS = ["<graph>", "<graph>", " Title", "\n", "$x$", "  on", "<pad>"]
MODALITIES = ["graph", "graph", "text", "text", "text", "text", "pad"]


@pytest.fixture(autouse=True)
def _close_new_figures():
    """The plots open pyplot figures; close the ones each test opened (and only those)."""
    before = set(plt.get_fignums())
    yield
    for num in set(plt.get_fignums()) - before:
        plt.close(num)


def _result(**overrides) -> SimpleNamespace:
    """A stand-in lens result: [layer, batch, pos, k] tensors; row 0's top-1 ids are fixed per layer."""
    g = torch.Generator().manual_seed(0)
    top_ids = torch.randint(0, len(VOCAB), (N_LAYER, BATCH, POS, K), generator=g)
    top_ids[:, 0, :, 0] = torch.tensor([1, 2, 4, 3])[:, None]  # " cat", "\n", long token, "  two"
    top_probs = torch.rand(N_LAYER, BATCH, POS, K, generator=g).sort(-1, descending=True).values
    top_probs[0, 0, 0, 0], top_probs[-1, 0, 0, 0] = 0.0, 1.0
    fields = dict(
        layers=["embed", "0", "1", "2"],
        top_ids=top_ids,
        top_probs=top_probs,
        entropy=torch.rand(N_LAYER, BATCH, POS, generator=g) * 3,
        kl_to_final=torch.rand(N_LAYER, BATCH, POS, generator=g),
        tokens=[TOKENS] * BATCH,
        modalities=[MODALITIES] * BATCH,
        decode=lambda ids: [VOCAB[i] for i in ids],
        lens="logit",
    )
    return SimpleNamespace(**(fields | overrides))


def _grid(fig: Figure):
    ax = fig.axes[0]
    cells = {(round(t.get_position()[0]), round(t.get_position()[1])): t for t in ax.texts}
    return ax, ax.images[0], cells


def _render(fig: Figure) -> None:
    fig.savefig(io.BytesIO(), format="png")  # draws every artist; warnings (missing glyphs) are errors


def test_grid_cells_show_escaped_top1_tokens_over_probabilities():
    result = _result()
    fig = plot_lens_grid(result, row=0)
    ax, image, cells = _grid(fig)
    assert len(ax.texts) == N_LAYER * 6 and len(cells) == N_LAYER * 6  # one per cell, pad column left out
    assert [cells[(col, 0)].get_text() for col in range(6)] == ["␣cat"] * 6  # leading space made visible
    assert cells[(3, 1)].get_text() == "\\n"
    assert cells[(0, 2)].get_text() == "averyve…"  # max_chars=8 with the ellipsis
    assert cells[(5, 3)].get_text() == "␣␣two"
    np.testing.assert_allclose(image.get_array(), result.top_probs[:, 0, :6, 0].double().numpy())
    assert image.origin == "lower" and not ax.yaxis_inverted()  # data row 0 (embed) at the bottom
    assert [t.get_text() for t in ax.get_yticklabels()] == result.layers
    assert list(ax.get_yticks()) == [0, 1, 2, 3]
    assert cells[(0, 0)].get_color() == "black" and cells[(0, 3)].get_color() == "white"  # p=0 light, p=1 dark
    assert "probability" in fig.axes[1].get_ylabel()  # the colorbar
    _render(fig)


def test_grid_axes_mark_input_tokens_and_modalities():
    fig = plot_lens_grid(_result(), row=1)
    ax, _, _ = _grid(fig)
    labels = ax.get_xticklabels()
    assert [t.get_text() for t in labels] == ["<graph>", "<graph>", "␣Title", "\\n", "$x$", "␣␣on"]
    assert not any(t.get_parse_math() for t in labels)  # "$x$" stays literal
    colors = modality_colors(["graph", "text"])
    assert [to_hex(t.get_color()) for t in labels] == [colors["graph"]] * 2 + [colors["text"]] * 4
    strip = [(p.get_gid(), p.get_x() + 0.5, p.get_facecolor()) for p in ax.patches]
    assert [(gid, round(x)) for gid, x, _ in strip] == [("modality:graph", 0), ("modality:graph", 1)] + [
        ("modality:text", c) for c in range(2, 6)
    ]
    assert all(face == to_rgba(colors[gid.split(":")[1]]) for gid, _, face in strip)
    boundaries = [line for line in ax.get_lines() if line.get_gid() == "modality-boundary"]
    assert [tuple(line.get_xdata()) for line in boundaries] == [(1.5, 1.5)]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["graph", "text"]
    _render(fig)


def test_grid_entropy_positions_and_wide_layout():
    result = _result()
    fig = plot_lens_grid(result, row=1, positions=[6, 0, -3], value="entropy", max_chars=3, title="custom")
    ax, image, cells = _grid(fig)
    np.testing.assert_allclose(image.get_array(), result.entropy[:, 1, [6, 0, 4]].double().numpy())
    assert fig.axes[1].get_ylabel() == "entropy (nats)" and image.norm.vmin == 0
    assert {p.get_gid() for p in ax.patches} == {"modality:pad", "modality:graph", "modality:text"}
    assert len([line for line in ax.get_lines() if line.get_gid() == "modality-boundary"]) == 2
    assert all(len(t.get_text()) <= 3 for t in cells.values()) and ax.get_title(loc="left") == "custom"
    wide = plot_lens_grid(_result(), row=1, positions=list(range(7)) * 3)
    assert wide.get_figwidth() > fig.get_figwidth()
    _render(fig)


def test_grid_default_columns_follow_decoded_and_undecoded_cells_are_blank():
    result = _result()
    decoded = torch.ones(BATCH, POS, dtype=torch.bool)
    decoded[0, 2] = False
    result.decoded = decoded
    result.top_ids[:, 0, 2] = -1
    result.top_probs[:, 0, 2] = float("nan")
    ax, image, _ = _grid(plot_lens_grid(result, row=0))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["<graph>", "<graph>", "\\n", "$x$", "␣␣on"]
    ax, image, cells = _grid(plot_lens_grid(result, row=0, positions=[2, 3]))
    assert [cells[(0, layer)].get_text() for layer in range(N_LAYER)] == [""] * N_LAYER
    assert np.ma.getmaskarray(image.get_array())[:, 0].all()  # NaN: drawn in the colormap's 'bad' colour


def test_grid_escapes_empty_control_and_missing_glyph_tokens():
    result = _result()
    result.top_ids[:, 0, 0, 0] = torch.tensor([6, 7, 8, 5])  # "", "tab\t", "中" (no DejaVu glyph), "$x$"
    fig = plot_lens_grid(result, row=0, positions=[0], max_chars=10)
    _, _, cells = _grid(fig)
    assert [cells[(0, layer)].get_text() for layer in range(N_LAYER)] == ["∅", "tab\\t", "\\u4e2d", "$x$"]
    _render(fig)


def test_grid_errors_name_valid_choices():
    result = _result()
    with pytest.raises(ValueError, match="'prob', 'entropy'.*'kl'"):
        plot_lens_grid(result, value="kl")
    with pytest.raises(IndexError, match=r"0\.\.6"):
        plot_lens_grid(result, positions=[7])
    with pytest.raises(IndexError, match=r"rows 0\.\.1"):
        plot_lens_grid(result, row=2)
    with pytest.raises(ValueError, match="4 layers"):
        plot_lens_grid(_result(layers=["embed", "0"]))


def test_grid_opens_a_pyplot_figure_or_draws_into_a_given_axes():
    assert plot_lens_grid(_result()).number in plt.get_fignums()
    opened = plt.get_fignums()
    fig = Figure()
    ax = fig.add_subplot()
    assert plot_lens_grid(_result(), ax=ax) is fig and plt.get_fignums() == opened
    assert ax.images and len(ax.texts) == N_LAYER * 6


def _curves(n_layers: int = 4) -> pd.DataFrame:
    rows = []
    for modality, base in (("graph", 0.2), ("text", 0.6)):
        for metric in ("top1_change", "kl_to_final", "cosine_to_previous"):
            for layer in range(n_layers):
                mean = np.nan if metric == "top1_change" and layer == 0 else base + 0.05 * layer
                rows.append(
                    {
                        "modality": modality,
                        "metric": metric,
                        "layer": layer,
                        "layer_label": "embed" if layer == 0 else str(layer - 1),
                        "mean": mean,
                        "low": mean - 0.1,
                        "high": mean + 0.1,
                    }
                )
    return pd.DataFrame(rows)


def test_evolution_one_line_per_modality_and_metric():
    fig = plot_evolution(SimpleNamespace(curves=_curves()), title="evo")
    assert len(fig.axes) == 3
    colors = modality_colors(["graph", "text"])
    for ax, metric in zip(fig.axes, ("top1_change", "kl_to_final", "cosine_to_previous")):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert sorted(lines) == ["graph", "text"]
        first = 1 if metric == "top1_change" else 0  # undefined at the first layer: left out
        np.testing.assert_allclose(lines["text"].get_xdata(), np.arange(first, 4))
        np.testing.assert_allclose(lines["text"].get_ydata(), 0.6 + 0.05 * np.arange(first, 4))
        np.testing.assert_allclose(lines["graph"].get_ydata(), 0.2 + 0.05 * np.arange(first, 4))
        assert {m: to_hex(line.get_color()) for m, line in lines.items()} == colors
        assert len(ax.collections) == 2  # one CI band per modality
        assert [t.get_text() for t in ax.get_xticklabels()] == ["embed", "0", "1", "2"]
    assert "nats" in fig.axes[1].get_ylabel()
    assert fig.get_suptitle() == "evo"
    _render(fig)


def test_evolution_bands_shade_exactly_the_significant_layers():
    bands = pd.DataFrame(
        {"metric": ["kl_to_final", "kl_to_final", "top1_change"], "layer": [1, 3, 2], "band": ["less", "more", "less"]}
    )
    fig = plot_evolution(SimpleNamespace(curves=_curves()), bands=bands)
    shaded = {
        ax.get_ylabel(): sorted((round(p.get_x() + 0.5), to_hex(p.get_facecolor())) for p in ax.patches)
        for ax in fig.axes
    }
    kl, top1, cosine = (shaded[ax.get_ylabel()] for ax in fig.axes[1:2] + fig.axes[0:1] + fig.axes[2:3])
    assert kl == [(1, "#2ca02c"), (3, "#d62728")] and top1 == [(2, "#2ca02c")] and cosine == []
    assert "Holm" in " ".join(t.get_text() for t in fig.texts)
    with pytest.raises(ValueError, match="band"):
        plot_evolution(SimpleNamespace(curves=_curves()), bands=bands.assign(band="maybe"))
    _render(fig)


def test_evolution_metric_choice_axes_and_tick_thinning():
    evo = SimpleNamespace(curves=_curves(40))
    fig = plot_evolution(evo, metrics=["kl_to_final"])
    assert len(fig.axes) == 1 and "KL" in fig.axes[0].get_ylabel()
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert len(labels) <= 12 and labels[0] == "embed" and labels[-1] == "38"
    own = Figure()
    axes = own.subplots(1, 2)
    assert plot_evolution(evo, metrics=["cosine_to_previous", "kl_to_final"], ax=axes) is own
    with pytest.raises(ValueError, match="unknown.*'nope'"):
        plot_evolution(evo, metrics=["nope"])
    with pytest.raises(ValueError, match="1 axes for 2 metrics"):
        plot_evolution(evo, metrics=["kl_to_final", "top1_change"], ax=axes[0])


def test_modality_colors_are_fixed_and_stable():
    colors = modality_colors(["text", "graph", "image", "audio", "video"])
    assert colors["text"] != colors["graph"] != colors["image"] != colors["audio"]
    assert modality_colors(["video"]) == {"video": colors["video"]}  # not set by the other names
    assert colors["video"] not in {colors[m] for m in ("text", "graph", "image", "audio")}


def test_save_figure_writes_png_and_svg(tmp_path):
    paths = save_figure(plot_lens_grid(_result()), tmp_path / "sub" / "grid.v1")
    assert paths == [tmp_path / "sub" / "grid.v1.png", tmp_path / "sub" / "grid.v1.svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(paths[0]) as png:
        assert png.info["dpi"] == pytest.approx((150, 150), abs=0.5)
    svg = paths[1].read_text()
    assert svg.startswith("<?xml") and "<svg" in svg
    with pytest.raises(ValueError, match="unsupported.*'doc'"):
        save_figure(plot_lens_grid(_result()), tmp_path / "x", formats=["doc"])


def test_modality_colors_tell_ten_other_names_apart():
    names = ["graph", "text", "text_title", "text_neutral", "random_norm", "mean_embedding"]
    names += ["constant_input", "no_neighbours", "a", "b", "c", "d"]
    colors = modality_colors(names)
    assert len(set(colors.values())) == len(names)  # 2 fixed + 10 others, all distinct
    assert modality_colors(["random_norm"])["random_norm"] == modality_colors(["random_norm", "x"])["random_norm"]
