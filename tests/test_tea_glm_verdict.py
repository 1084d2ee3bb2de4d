"""The TEA-GLM verdict logic: per-metric verdicts with TOST, per-layer Holm tests, and matched controls."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mmlens.methods.evolution import METRICS
from mmlens.metrics.lens_verdicts import MARGINS, against_controls, per_layer_tests, verdicts

N = 40


def _per_input(spans: dict[str, dict[str, np.ndarray]]) -> pd.DataFrame:
    """A tidy per-input table from {span: {metric: Float[N]}}."""
    return pd.DataFrame(
        [
            {"input": i, "modality": span, "metric": metric, "value": float(v)}
            for span, metrics in spans.items()
            for metric, values in metrics.items()
            for i, v in enumerate(values)
        ]
    )


def _values(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "top1_change": rng.uniform(0.3, 0.6, N),
        "kl_to_final": scale * rng.uniform(5, 10, N),
        "cosine_to_previous": rng.uniform(0.8, 0.9, N),
        "first_final_top1_layer": rng.uniform(10, 20, N),
    }


def _shifted(values: dict[str, np.ndarray], less: bool = True) -> dict[str, np.ndarray]:
    """The same values moved well beyond every margin in the 'evolves less' direction (or more)."""
    sign = 1 if less else -1
    return {
        m: v - sign * 10 * MARGINS[m] if METRICS[m] == "lower" else v + sign * 10 * MARGINS[m]
        for m, v in values.items()
    }


def test_identical_inputs_read_equivalent():
    base = _values(0)
    table = verdicts(_per_input({"graph": base, "text": base}), "graph", "text")
    assert table.verdict.tolist() == ["equivalent"] * len(METRICS)
    assert (table["diff"] == 0).all()


def test_a_known_difference_reads_less_and_its_mirror_more():
    base = _values(1)
    noisy = {m: v + np.random.default_rng(2).normal(0, MARGINS[m], N) for m, v in base.items()}
    table = verdicts(_per_input({"graph": _shifted(noisy), "text": base}), "graph", "text").set_index("metric")
    assert (table.verdict == "less").all(), table
    assert (table.loc[["top1_change", "kl_to_final"], "high"] < 0).all()
    assert table.loc["cosine_to_previous", "low"] > 0
    mirror = verdicts(_per_input({"graph": _shifted(noisy, less=False), "text": base}), "graph", "text")
    assert (mirror.verdict == "more").all()


def test_a_small_noisy_sample_is_inconclusive():
    rng = np.random.default_rng(3)
    base = {m: rng.normal(0, 1, 6) for m in METRICS}
    other = {m: v + rng.normal(0, 30 * MARGINS[m], 6) for m, v in base.items()}
    table = pd.DataFrame(
        [
            {"input": i, "modality": s, "metric": m, "value": float(v[i])}
            for s, d in (("graph", base), ("text", other))
            for m, v in d.items()
            for i in range(6)
        ]
    )
    assert "inconclusive" in verdicts(table, "graph", "text").verdict.tolist()


def test_text_in_slot_beating_text_is_not_reported_as_graph_evolving_less():
    """Graph tokens that behave exactly like text tokens put in the same slots "evolve less" than
    text at other positions (a slot effect): the combined verdict must not read "less"."""
    text = _values(4)
    slot = _shifted(text)  # any content in the slots evolves less than later text
    graph = {m: v + np.random.default_rng(5).normal(0, MARGINS[m] / 20, N) for m, v in slot.items()}
    per_input = _per_input({"graph": graph, "text": text, "text-in-slot": slot})
    vs_text = verdicts(per_input, "graph", "text")
    assert (vs_text.verdict == "less").all()
    combined = against_controls(vs_text, {"text-in-slot": verdicts(per_input, "graph", "text-in-slot")}, "text")
    assert "less" not in combined.verdict.tolist()
    assert (combined.deciding == "text-in-slot").all() and (combined.verdict == "equivalent").all()
    # the same graph values, now also beyond the slot control: "less", decided by the last comparison
    beyond = _per_input({"graph": _shifted(slot), "text": text, "text-in-slot": slot})
    combined = against_controls(
        verdicts(beyond, "graph", "text"), {"text-in-slot": verdicts(beyond, "graph", "text-in-slot")}, "text"
    )
    assert (combined.verdict == "less").all() and (combined.deciding == "text-in-slot").all()


def test_per_layer_tests_find_the_layers_that_differ_after_holm():
    rng = np.random.default_rng(6)
    rows = []
    for i in range(20):
        for layer in range(6):
            for span, shift in (("graph", -0.5 if layer >= 3 else 0.0), ("text", 0.0)):
                value = rng.normal(0, 0.1) + shift + (0.0 if span == "text" else rng.normal(0, 0.01))
                rows.append({"input": i, "modality": span, "metric": "kl_to_final", "layer": layer, "value": value})
    table = per_layer_tests(pd.DataFrame(rows), "graph", "text", n_resamples=999)
    assert table.layer.tolist() == list(range(6))
    assert table.a_evolves_less.tolist() == [False] * 3 + [True] * 3
    assert (table.p_holm >= table.p_value).all()
    with pytest.raises(KeyError, match="image"):
        per_layer_tests(pd.DataFrame(rows), "graph", "image")


def test_holm_matches_the_shared_statistics_module():
    from mmlens.metrics import stats
    from mmlens.metrics.lens_verdicts import holm

    p = [0.01, 0.04, 0.03, 0.2, 0.001, 0.04]
    reject, adjusted = holm(p)
    expected_reject, expected = stats.holm(p)
    np.testing.assert_allclose(adjusted, expected)
    assert reject.tolist() == expected_reject.tolist()


def test_layer_bands_need_the_same_significant_direction_against_every_comparison():
    from mmlens.metrics.lens_verdicts import layer_bands

    def tests(less: list[int], more: list[int]) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {
                    "metric": "kl_to_final",
                    "layer": layer,
                    "significant": layer in less + more,
                    "a_evolves_less": layer in less,
                }
                for layer in range(6)
            ]
        )

    bands = layer_bands({"text": tests([1, 2], [4, 5]), "text_title": tests([2, 3], [5])})
    assert list(zip(bands.layer, bands.band)) == [(2, "less"), (5, "more")]
    assert layer_bands({"text": tests([], [])}).empty
    assert layer_bands({}).empty
