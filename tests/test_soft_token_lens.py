"""mmlens.analyses.soft_token_lens: the TEA-GLM lens metrics and slot controls on the synthetic VLM's
image tokens. A barely trained VLM (a few steps, ~3 s) in a temporary cache: the code path, not the
numbers, is under test here; the full comparison is run by the main job."""

from __future__ import annotations

import functools
import json

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

import mmlens
from mmlens.analyses import soft_token_lens
from mmlens.analyses.soft_token_lens import (
    SLOT_CONTROLS,
    TINY_VLM,
    plot_soft_token_comparison,
    slot_controls,
    soft_span,
    soft_token_comparison,
    soft_tokens,
    vlm_comparison,
)
from mmlens.methods.evolution import METRICS
from mmlens.metrics.lens_verdicts import span_verdict
from mmlens.training.vlm import make_scenes, train_vlm

matplotlib.use("Agg")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model: one torch thread avoids the OpenMP stalls of two threads on busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("mmlens-cache")
        mp.setenv("MMLENS_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def record(cache):
    return vlm_comparison(quick=True, progress=False, vlm_options=TINY_VLM)


@pytest.fixture(scope="module")
def vlm(cache):
    trained = train_vlm(**TINY_VLM)
    hooked = mmlens.wrap(trained.model, tokenizer=trained.tokenizer, processor=trained.processor)
    inputs = trained.processor.questions(make_scenes(6, seed=3), ["color", "shape"] * 3)
    return hooked, inputs


def test_the_record_has_every_condition_variant_and_verdict(record):
    assert set(record["lens_variants"]) == {"normed/all_layers", "normed/no_embedding_row"}
    assert record["span"] == "image" and record["n_slots"] == 16 and record["n_inputs"] == 8
    for name, v in record["lens_variants"].items():
        assert set(v["metrics"]) == {"image", "text", *SLOT_CONTROLS}, name
        assert list(v["comparisons"]) == ["text", *SLOT_CONTROLS]
        assert [r["metric"] for r in v["verdict"]] == list(METRICS)
        assert all(r["verdict"] in ("less", "more", "equivalent", "inconclusive") for r in v["verdict"])
        assert v["deciding_comparison"].startswith("image vs ")
        assert set(v["per_layer_tests"]) == {"text", *SLOT_CONTROLS}
        assert {c["modality"] for c in v["curves"]} == {"image", "text", *SLOT_CONTROLS}
    rows = record["lens_variants"]["normed/no_embedding_row"]
    assert "embed" not in {c["layer_label"] for c in rows["curves"]}
    assert "embed" in {c["layer_label"] for c in record["lens_variants"]["normed/all_layers"]["curves"]}
    assert set(record["accuracy"]["lens_inputs"]) == {"color", "shape"}
    json.dumps(record, allow_nan=False)


def test_slot_controls_are_what_they_claim(vlm):
    hooked, inputs = vlm
    span = soft_span(hooked, inputs)
    tokens = soft_tokens(hooked, inputs, span)
    assert span == "image" and tokens.shape == (6, 16, 128)
    slots = slot_controls(hooked, tokens, [" a red circle"] * 6, " once upon a time", seed=0)
    assert torch.allclose(slots["random_norm"].norm(dim=-1), tokens.norm(dim=-1), rtol=1e-4)
    weight = hooked.model.get_input_embeddings().weight
    ids = hooked.tokenizer(" a red circle", add_special_tokens=False)["input_ids"]
    assert torch.equal(slots["text_caption"][0, : len(ids)], weight[ids]) and len(ids) < 16
    assert torch.equal(slots["text_caption"][0, len(ids)], weight[ids[0]])  # cycled to fill the slots
    assert torch.allclose(slots["mean_embedding"][2, 5], weight.mean(0))
    with pytest.raises(ValueError, match="own_texts has 2 texts for 6 inputs"):
        slot_controls(hooked, tokens, ["a", "b"], " x", seed=0)


def test_an_identical_condition_reads_equivalent_and_never_less(vlm):
    hooked, inputs = vlm
    tokens = soft_tokens(hooked, inputs, "image")
    noise = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(0))
    slots = {
        "same": tokens.clone(),
        "shuffled": noise * tokens.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True),
    }
    out = soft_token_comparison(hooked, inputs, slots, ["normed"], seed=0, n_resamples=199)
    for name, v in out.items():
        same = v["comparisons"]["same"]
        assert [r["verdict"] for r in same] == ["equivalent"] * len(METRICS), name
        assert all(r["diff"] == 0 for r in same)
        assert all(r["verdict"] != "less" for r in v["verdict"])
        assert v["metrics"]["same"] == v["metrics"]["image"]
        assert not v["claim_reproduced"]
        assert any(r["diff"] != 0 for r in v["comparisons"]["shuffled"])  # other contents do change the numbers


def _table(values: dict[str, dict[str, np.ndarray]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"input": i, "modality": m, "metric": metric, "value": float(x)}
            for m, by_metric in values.items()
            for metric, xs in by_metric.items()
            for i, x in enumerate(xs)
        ]
    )


def test_a_known_difference_reads_less_and_a_failing_control_decides():
    rng = np.random.default_rng(0)
    n = 40
    base = {
        "top1_change": 0.5 + 0.05 * rng.standard_normal(n),
        "kl_to_final": 3 + 0.2 * rng.standard_normal(n),
        "cosine_to_previous": 0.7 + 0.02 * rng.standard_normal(n),
        "first_final_top1_layer": 1.5 + 0.2 * rng.standard_normal(n),
    }
    less = {"top1_change": -0.3, "kl_to_final": -2.0, "cosine_to_previous": 0.2, "first_final_top1_layer": -1.0}
    soft = {m: x + less[m] for m, x in base.items()}
    per_input = _table({"img": soft, "text": base, "ctrl_far": base, "ctrl_same": soft})
    per_layer = per_input.assign(layer=1)
    verdict = span_verdict(per_input, per_layer, "img", ["ctrl_far"], seed=0)
    assert [r["verdict"] for r in verdict["verdict"]] == ["less"] * 4 and verdict["claim_reproduced"]
    verdict = span_verdict(per_input, per_layer, "img", ["ctrl_far", "ctrl_same"], seed=0)
    assert [r["verdict"] for r in verdict["verdict"]] == ["equivalent"] * 4
    assert verdict["deciding_comparison"] == "img vs ctrl_same" and not verdict["claim_reproduced"]


def test_the_cache_is_reused_and_keyed_by_the_settings(record, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the lens ran: the cache was not used")

    monkeypatch.setattr(soft_token_lens, "condition_tables", fail)
    assert vlm_comparison(quick=True, progress=False, vlm_options=TINY_VLM) == record
    with pytest.raises(AssertionError, match="the cache was not used"):
        vlm_comparison(quick=True, seed=1, progress=False, vlm_options=TINY_VLM)


def test_too_many_inputs_raise_naming_the_field(cache):
    with pytest.raises(ValueError, match="n_inputs=99"):
        vlm_comparison(["normed"], n_inputs=99, progress=False, vlm_options=TINY_VLM)


def test_the_figure_reads_a_graph_record_next_to_the_image_record(record):
    def rows(shift: float) -> list[dict]:
        return [
            {"metric": m, "diff": shift, "low": shift - 0.1, "high": shift + 0.1, "verdict": "less"} for m in METRICS
        ]

    graph = {
        "normed/no_embedding_row": {
            "comparisons": {"text": rows(-0.5), "text_title": rows(-0.2), "constant_input": rows(0.0)}
        }
    }
    fig = plot_soft_token_comparison(graph, record)
    axes = fig.axes
    assert len(axes) == len(METRICS)
    labels = [t.get_text() for t in axes[0].get_yticklabels()]
    assert labels[0] == "text tokens (other positions)" and axes[0].yaxis_inverted()  # text on top
    assert "own words in the slots" in labels and "node-agnostic projector" in labels
    assert len(labels) == len(set(labels)) == 1 + len(SLOT_CONTROLS) + 1  # text_title and text_caption share a row
    sources = {t.get_text() for t in axes[0].get_legend().get_texts()}
    assert sources == {"graph tokens", "image tokens"}
    with pytest.raises(KeyError, match="no lens variant 'raw/no_embedding_row'"):
        plot_soft_token_comparison(graph, record, variant="raw/no_embedding_row")


def test_the_command_writes_the_record_and_the_figure(record, tmp_path, monkeypatch):
    monkeypatch.setattr(soft_token_lens, "vlm_comparison", functools.partial(vlm_comparison, vlm_options=TINY_VLM))
    rows = [{"metric": m, "diff": 0.1, "low": 0.0, "high": 0.2, "verdict": "more"} for m in METRICS]
    graph_json = tmp_path / "logit_lens.json"
    graph_json.write_text(json.dumps({"lens_variants": {"normed/no_embedding_row": {"comparisons": {"text": rows}}}}))
    assert soft_token_lens.main(["--quick", "--out", str(tmp_path / "out"), "--graph-json", str(graph_json)]) == 0
    assert json.loads((tmp_path / "out" / "vlm_comparison.json").read_text()) == record
    assert (tmp_path / "out" / "soft_tokens.png").stat().st_size > 0
