"""Plots: the lens grid shows the right tokens and values, evolution curves the right data, files are written."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D

from mmlens.plots import modality_colors, plot_evolution, plot_lens_grid, save_figure

VOCAB = ["the", " cat", "\n", " sat", "averyverylongtoken", "  on"]


def _result(n_layer: int = 4, batch: int = 2, pos: int = 5, k: int = 2) -> SimpleNamespace:
    g = torch.Generator().manual_seed(0)
    top_ids = torch.randint(0, len(VOCAB), (n_layer, batch, pos, k), generator=g)
    probs = torch.rand(n_layer, batch, pos, k, generator=g).sort(-1, descending=True).values
    return SimpleNamespace(
        layers=["embed"] + [str(i) for i in range(n_layer - 1)], top_ids=top_ids, top_probs=probs,
        entropy=torch.rand(n_layer, batch, pos, generator=g) * 3, kl_to_final=torch.rand(n_layer, batch, pos, generator=g),
        tokens=[["<graph>", "<graph>", "Title", ":", "x"]] * batch,
        modalities=[["graph", "graph", "text", "text", "pad"]] * batch,
        decode=lambda ids: [VOCAB[i] for i in ids], lens="logit")


def test_grid_cells_show_top1_tokens_over_probabilities():
    result = _result()
    fig = plot_lens_grid(result, row=1, max_chars=6)
    ax = fig.axes[0]
    image = next(a for a in ax.get_children() if isinstance(a, AxesImage))
    expected = result.top_probs[:, 1, :4, 0].double().numpy()
    np.testing.assert_allclose(np.asarray(image.get_array()), expected)
    assert image.origin == "lower"  # final layer on top
    texts = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text() for t in ax.texts}
    assert len(texts) == 4 * 4  # pad column left out
    for layer in range(4):
        for col in range(4):
            token = VOCAB[int(result.top_ids[layer, 1, col, 0])]
            shown = {"\n": "\\n", "averyverylongtoken": "avery…", " cat": "␣cat", " sat": "␣sat", "  on": "␣␣on"}.get(token, token)
            assert texts[(col, layer)] == shown
    assert [t.get_text() for t in ax.get_xticklabels()] == ["<graph>", "<graph>", "Title", ":"]
    assert {p.get_gid() for p in ax.patches} == {"modality:graph", "modality:text"}
    assert [t.get_color() for t in ax.get_xticklabels()][:3] == [modality_colors(["graph"])["graph"]] * 2 + [
        modality_colors(["text"])["text"]]


def test_grid_entropy_and_errors():
    result = _result()
    fig = plot_lens_grid(result, row=0, positions=[0, 2, -2], value="entropy")
    image = next(a for a in fig.axes[0].get_children() if isinstance(a, AxesImage))
    np.testing.assert_allclose(np.asarray(image.get_array()), result.entropy[:, 0, [0, 2, 3]].double().numpy())
    with pytest.raises(ValueError, match="prob"):
        plot_lens_grid(result, value="kl")
    with pytest.raises(IndexError, match="0..4"):
        plot_lens_grid(result, positions=[9])


def test_evolution_draws_one_line_per_modality_and_metric():
    rows = [{"modality": m, "metric": metric, "layer": layer, "layer_label": str(layer), "mean": v, "low": v - 0.1,
             "high": v + 0.1}
            for m, base in (("graph", 0.2), ("text", 0.6)) for metric in ("top1_change", "kl_to_final")
            for layer, v in enumerate(base + 0.05 * np.arange(4))]
    fig = plot_evolution(SimpleNamespace(curves=pd.DataFrame(rows)))
    assert len(fig.axes) == 2
    for ax in fig.axes:
        lines = [line for line in ax.get_lines() if isinstance(line, Line2D) and line.get_label() in ("graph", "text")]
        assert sorted(line.get_label() for line in lines) == ["graph", "text"]
        text_line = next(line for line in lines if line.get_label() == "text")
        np.testing.assert_allclose(text_line.get_ydata(), 0.6 + 0.05 * np.arange(4))
    with pytest.raises(ValueError, match="unknown"):
        plot_evolution(SimpleNamespace(curves=pd.DataFrame(rows)), metrics=["nope"])


def test_save_figure_writes_png_and_svg(tmp_path):
    paths = save_figure(plot_lens_grid(_result()), tmp_path / "sub" / "grid")
    assert [p.suffix for p in paths] == [".png", ".svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in paths[1].read_text()
    with pytest.raises(ValueError, match="unsupported"):
        save_figure(plot_lens_grid(_result()), tmp_path / "x", formats=["doc"])
