"""The desiderata as numbers: known answers on a hand-built text-only model, and the formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mmlens
from mmlens.core.spans import spans_from_blocks
from mmlens.data.loading import load_model
from mmlens.methods.explainers import EXPLAINERS, Explanation, predicted_prob, prepare, with_embeds
from mmlens.metrics.desiderata import (
    explanation_distance,
    faithfulness,
    granger,
    js_divergence,
    kappa_lambda,
    stability,
)


@pytest.fixture(scope="module")
def text_only():
    """The tiny fusion transformer with its patch embedding zeroed: every image gives the same image
    tokens, so the output depends on the text only."""
    lm = load_model("tiny-fusion")
    with torch.no_grad():
        lm.model.image_encoder.patch_embed.weight.zero_()
    hm = mmlens.wrap(lm.model)
    inputs = lm.example_inputs()
    return hm, inputs


def test_granger_finds_no_influence_of_an_unused_modality(text_only):
    hm, inputs = text_only
    result = granger(hm, inputs, ["gradient_x_input", "occlusion"], n_resamples=99, progress=False)
    image = result.influence[result.influence.modality == "image"]
    text = result.influence[result.influence.modality == "text"]
    assert (image.delta_js == 0).all() and (image.delta_prob == 0).all()  # exactly: the image tokens are identical
    assert (text.delta_js > 0).all()
    assert set(result.explanations.explainer) == {"gradient_x_input", "occlusion"}
    pairs = set(zip(result.explanations.ablated, result.explanations.explained, result.explanations.term))
    assert pairs == {
        ("image", "text", "cross"),
        ("text", "image", "cross"),
        ("image", "image", "self"),
        ("text", "text", "self"),
    }
    # ablating the unused image changes nothing, so no explanation of the text may move
    moved = result.explanations[(result.explanations.ablated == "image") & (result.explanations.term == "cross")]
    assert (moved.delta.abs() < 1e-6).all()
    # the self term of the used text: its explanation loses its mass when the text is neutral
    own = result.explanations[(result.explanations.ablated == "text") & (result.explanations.term == "self")]
    assert (own.delta > 0.1).all()
    assert set(result.summary.columns) >= {"kappa", "lambda", "kappa_all", "lambda_all", "spearman_delta"}
    assert set(result.calibration.term) == {"self", "cross", "all"}


def test_keep_and_remove_behave_as_defined(text_only):
    hm, inputs = text_only
    result = faithfulness(hm, inputs, "occlusion", fractions=(0.0, 0.5, 1.0), random_draws=2, progress=False)
    curves = result.curves
    full, none = curves[curves.k == 1.0], curves[curves.k == 0.0]
    assert (full.sufficiency_gap < 1e-6).all()  # keep everything = the input
    assert (none.necessity_drop.abs() < 1e-6).all()  # remove nothing = the input
    image = curves[curves.scope == "image"]
    assert (image.sufficiency_gap < 1e-6).all() and (image.necessity_drop.abs() < 1e-6).all()  # unused modality
    # removing every text position = running the model on the neutral text
    for i in range(inputs["input_ids"].shape[0]):
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        metric = predicted_prob(hm, one)
        neutral = hm.neutral(one, "text")
        expected = float(metric(hm.readout_logits(hm.run(neutral).logits, neutral))[0])
        row = curves[
            (curves.input == i) & (curves.scope == "text") & (curves.k == 1.0) & (curves.source == "explanation")
        ]
        assert abs(float(row.f_remove.iloc[0]) - expected) < 1e-6
    assert set(result.areas.source) == {"explanation", "random"}
    assert set(result.areas.scope) == {"image", "text", "joint", "global"}
    intervals = result.intervals.set_index(["scope", "measure"])
    assert set(intervals.index) == {
        (s, m) for s in ("image", "text", "joint", "global") for m in ("aoc_sufficiency_gap", "auc_necessity_drop")
    }
    assert (intervals.diff_low <= intervals["diff"]).all() and (intervals["diff"] <= intervals.diff_high).all()
    image_row = intervals.loc[("image", "auc_necessity_drop")]
    assert image_row["diff"] == 0 and not image_row.better  # the unused image: no explanation beats random


def test_keep_masks_select_the_top_positions(text_only):
    hm, inputs = text_only
    one = {k: v[:1] for k, v in inputs.items()}
    metric = predicted_prob(hm, one)
    setup = prepare(hm, one, metric, "joint")
    scores = torch.full(setup.explained.shape, float("nan"))
    text = setup.spans.masks["text"][0]
    scores[0, text] = torch.arange(int(text.sum()), dtype=torch.float)  # the last text positions score highest
    explanation = Explanation(scores, setup.spans, "hand", "joint", setup.value)
    result = faithfulness(hm, one, explanations=[explanation], fractions=(0.5,), random_draws=1, progress=False)
    keep_half = torch.where((text & ~explanation.top_mask("text", 0.5)[0])[None, :, None], setup.baseline, setup.embeds)
    with torch.no_grad():
        expected = float(with_embeds(hm, one, setup.point, keep_half, metric)[0])
    row = result.curves[(result.curves.scope == "text") & (result.curves.source == "explanation")]
    assert abs(float(row.f_keep.iloc[0]) - expected) < 1e-6
    top = explanation.top_mask("text", 0.5)[0].nonzero()[:, 0].tolist()
    text_positions = text.nonzero()[:, 0].tolist()
    assert top == text_positions[len(text_positions) - len(top) :]


def test_kappa_lambda_known_answers():
    delta_out = np.linspace(0, 1, 11)
    kappa, lam = kappa_lambda(delta_out, 2 * delta_out, fraction=1.0, tolerance=0.0)
    assert abs(kappa - 2) < 1e-6 and lam == 0
    kappa, lam = kappa_lambda(delta_out, delta_out - 0.1, fraction=1.0, tolerance=0.1)
    assert abs(kappa - 1) < 1e-6 and abs(lam - 0.1) < 1e-9
    kappa, _ = kappa_lambda(delta_out, np.zeros(11), fraction=0.5, tolerance=0.05)  # unmoved explanation
    assert abs(kappa - 0.1) < 1e-6  # the median Delta is 0.5: 0.5 kappa <= 0.05


def test_distances():
    spans = spans_from_blocks(1, {"a": 2, "b": 2}, {})
    a = Explanation(torch.tensor([[1.0, 0.0, 1.0, 1.0]]), spans, "x", "joint", torch.zeros(1))
    b = Explanation(torch.tensor([[0.0, 2.0, 1.0, 1.0]]), spans, "x", "joint", torch.zeros(1))
    assert float(explanation_distance(a, b, "a", "tv")[0]) == 1.0  # disjoint support
    assert float(explanation_distance(a, b, "b", "tv")[0]) == 0.0
    assert abs(float(explanation_distance(a, b, "a", "relative_l2")[0]) - math.sqrt(5)) < 1e-6
    # mass: mean |change| on a (3 / 2 positions) over mean |a| + mean |b| (3 / 4 + 4 / 4)
    assert abs(float(explanation_distance(a, b, "a")[0]) - 1.5 / 1.75) < 1e-6
    assert float(explanation_distance(a, b, "b")[0]) == 0.0
    tiny = Explanation(torch.tensor([[1e-4, 0.0, 1.0, 1.0]]), spans, "x", "joint", torch.zeros(1))
    gone = Explanation(torch.tensor([[0.0, 1e-4, 1.0, 1.0]]), spans, "x", "joint", torch.zeros(1))
    assert float(explanation_distance(tiny, gone, "a", "tv")[0]) == 1.0  # scale-free: a sliver moves fully
    assert float(explanation_distance(tiny, gone, "a")[0]) < 1e-3  # magnitude-aware: a sliver moves a little
    scaled = [Explanation(e.scores * 7.5, spans, "x", "joint", torch.zeros(1)) for e in (a, b)]
    assert abs(float(explanation_distance(*scaled, "a")[0]) - float(explanation_distance(a, b, "a")[0])) < 1e-6
    with pytest.raises(ValueError, match="'mass', 'tv' or 'relative_l2'"):
        explanation_distance(a, b, "a", "cosine")
    logits = torch.tensor([[50.0, 0.0], [0.0, 50.0]])
    assert float(js_divergence(logits[:1], logits[:1])[0]) == 0.0
    assert abs(float(js_divergence(logits[:1], logits[1:])[0]) - math.log(2)) < 1e-6


def test_stability_ratios_and_the_prediction_criterion(loaded):
    lm = loaded("tiny-random-llava")
    hm = mmlens.wrap(lm.model, processor=lm.processor)
    inputs = lm.example_inputs()
    result = stability(hm, inputs, ["gradient_x_input"], modalities=["image"], n=2, progress=False)
    samples = result.samples
    assert set(samples.perturbed) == {"image"} and set(samples.explained) == {"image", "text"}
    assert (samples.input_distance > 0).all()
    assert np.allclose(samples.ratio, samples.explanation_distance / samples.input_distance)
    summary = result.summary.set_index("explained")
    assert summary.loc["image", "equation"] == "intra (6)" and summary.loc["text", "equation"] == "cross (7)"
    per_target = samples[samples.explained == "image"]
    assert summary.loc["image", "n_dropped"] == (~per_target.kept).sum()
    kept = per_target[per_target.kept]
    sup = kept.groupby("input")[["ratio", "ris", "res"]].max()  # the per-input supremum over draws
    assert summary.loc["image", "n_inputs"] == len(sup)
    assert summary.loc["image", "max"] == sup.ratio.max() and summary.loc["image", "median"] == sup.ratio.median()
    assert summary.loc["image", "ris_max"] == sup.ris.max() and summary.loc["image", "res_median"] == sup.res.median()
    assert np.allclose(samples.ris, samples.explanation_change / samples.input_change.clip(lower=1e-6))
    # recompute one kept sample by hand: the explanation change of the text, over the image change
    from mmlens.methods.explainers import explain
    from mmlens.metrics.perturb import input_distance, perturb

    first = samples[(samples.kept) & (samples.explained == "text")].iloc[0]
    x = {k: v[int(first.input) : int(first.input) + 1] for k, v in inputs.items()}
    p = perturb(hm, x, "image", n=2, seed=int(first.input))[int(first.draw)]  # as stability draws them
    assert p.kind == first.kind
    metric = predicted_prob(hm, x)
    change = (
        explain(hm, x, "gradient_x_input", metric=metric).masked("text")
        - explain(hm, p.inputs, "gradient_x_input", metric=metric).masked("text")
    ).norm()
    assert abs(float(change) / float(input_distance(hm, x, p.inputs, "image")[0]) - first.ratio) < 1e-6
    pixels = (x["pixel_values"] - p.inputs["pixel_values"]).norm() / x["pixel_values"].norm()
    assert abs(first.input_change - float(pixels)) < 1e-6  # the relative change of the image's raw input
    base_text = explain(hm, x, "gradient_x_input", metric=metric).masked("text").norm()
    expected = float(
        change / base_text
    )  # a ratio of small norms: the inputs' batched forward rounds it at ~1e-6 relative
    assert abs(first.explanation_change - expected) < 1e-5 * max(1.0, abs(expected))


def test_stability_on_text_synonyms(loaded):
    lm = loaded("tinystories-656k")
    hm = mmlens.wrap(lm.model, tokenizer=lm.tokenizer)
    inputs = dict(lm.tokenizer(["The little girl was happy and the big dog was quick."], return_tensors="pt"))
    result = stability(hm, inputs, ["occlusion"], n=3, progress=False)
    assert not result.skipped and set(result.samples.kind) <= {"synonym_swap", "punctuation_edit"}
    assert len(result.samples) > 0 and (result.summary.equation == "intra (6)").all()
    with pytest.raises(ValueError, match="not in these inputs"):
        stability(hm, inputs, ["occlusion"], modalities=["image"], progress=False)


def test_circuit_keep_remove_known_answers(loaded):
    from mmlens.methods.circuits import Circuit, components, intervene
    from mmlens.metrics.desiderata import circuit_faithfulness

    lm = loaded("tiny-random-llava")
    hm = mmlens.wrap(lm.model, processor=lm.processor)
    inputs = lm.example_inputs()
    whole = Circuit(tuple(components(hm, ("attn_out", "mlp_out"))), name="whole model")
    table = circuit_faithfulness(hm, inputs, whole, "neutral", random_draws=2, progress=False)
    mine = table[table.source == "circuit"]
    assert (mine.sufficiency_gap == 0).all()  # keeping everything ablates nothing: bit-exact
    for i in range(2):
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        ablated = intervene(hm, one, whole, "remove", "neutral")
        metric = predicted_prob(hm, one)
        expected = float(metric(hm.readout_logits(ablated.logits, one))[0])
        assert float(mine.f_remove.iloc[i]) == expected  # removing the whole model = the fully ablated run
    assert (mine.necessity_drop.abs() > 0).any()
    assert set(table.source) == {"circuit", "random"}


def test_an_unused_modality_has_no_interaction_and_no_emap_gap(text_only):
    from mmlens.metrics.desiderata import interaction

    hm, inputs = text_only
    result = interaction(hm, inputs, progress=False)
    assert result.modalities == ("image", "text")
    rows = result.per_input
    # the image tokens do not depend on the image: equal up to batched-vs-single float rounding
    assert (rows.shapley_interaction.abs() < 1e-6).all()
    assert ((rows.v_ab - rows.v_b).abs() < 1e-6).all() and ((rows.v_a - rows.v_none).abs() < 1e-6).all()
    expected = {"accuracy": 1.0, "emap_accuracy": 1.0, "gap": 0.0, "n": 2, "labels": "model predictions"}
    assert {k: result.emap[k] for k in expected} == expected
    assert (rows.shapley_interaction_logodds.abs() < 1e-4).all()


def test_interaction_terms_equal_runs_on_neutral_and_swapped_inputs(loaded):
    from mmlens.metrics.desiderata import examples, interaction

    lm = loaded("tiny-fusion")
    hm = mmlens.wrap(lm.model)
    inputs = lm.example_inputs()
    result = interaction(hm, inputs, ("image", "text"), labels=[0, 1], progress=False)
    items = examples(hm, inputs)
    for i, x in enumerate(items):
        metric = predicted_prob(hm, x)

        def f(batch, metric=metric):
            return float(metric(hm.readout_logits(hm.run(batch).logits, batch))[0])

        both = hm.neutral(hm.neutral(x, "image"), "text")
        expected = {"v_ab": f(x), "v_a": f(hm.neutral(x, "text")), "v_b": f(hm.neutral(x, "image")), "v_none": f(both)}
        for key, value in expected.items():
            assert math.isclose(result.per_input[key][i], value, abs_tol=1e-6), key
    # EMAP from real runs with the image of input j and the text of input i
    logits = torch.stack(
        [torch.stack([hm.run({**x, "pixel_values": y["pixel_values"]}).logits[0] for y in items]) for x in items]
    )
    projection = logits.mean(1) + logits.mean(0) - logits.mean((0, 1))
    own = torch.diagonal(logits).T.argmax(-1)
    assert result.emap["accuracy"] == float((own == torch.tensor([0, 1])).float().mean())
    assert result.emap["emap_accuracy"] == float((projection.argmax(-1) == torch.tensor([0, 1])).float().mean())
    assert result.emap["labels"] == "given"
    with pytest.raises(ValueError, match="two modalities"):
        interaction(hm, inputs, ("image",), progress=False)


def _additive_fusion():
    """The tiny fusion transformer with its joint blocks switched off: each position's embedding is
    normalised on its own, mean-pooled and read out linearly, so the logits are a sum of an image
    term and a text term (additive in logits by construction)."""
    model = load_model("tiny-fusion").model
    with torch.no_grad():
        for block in model.joint_blocks:
            for linear in (block.attn.out_proj, [m for m in block.mlp.modules() if isinstance(m, torch.nn.Linear)][-1]):
                linear.weight.zero_()
                linear.bias.zero_()
    g = torch.Generator().manual_seed(0)
    n = 16
    inputs = {
        "pixel_values": torch.randn(n, 3, 16, 16, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 3,
        "input_ids": torch.randint(1, 47, (n, 8), generator=g),
        "attention_mask": torch.ones(n, 8, dtype=torch.long),
    }
    return mmlens.wrap(model), inputs


def test_gradient_x_input_passes_two_sided_calibration_on_a_logit_additive_model():
    hm, inputs = _additive_fusion()
    swapped = dict(inputs, pixel_values=inputs["pixel_values"].roll(1, 0))
    with torch.no_grad():  # additive: the logit change of swapping the images does not depend on the text
        a, b = hm.run(inputs).logits, hm.run(swapped).logits
        c = hm.run(dict(inputs, input_ids=inputs["input_ids"].roll(1, 0))).logits
        d = hm.run(dict(swapped, input_ids=inputs["input_ids"].roll(1, 0))).logits
    assert torch.allclose(a - b, c - d, atol=1e-5)
    result = granger(hm, inputs, ["gradient_x_input", "constant"], n_resamples=299, progress=False)
    cal = result.calibration.set_index(["explainer", "term"])
    assert cal.loc[("gradient_x_input", "self"), "calibrated"]  # the rank interval excludes 0
    assert cal.loc[("gradient_x_input", "self"), "rank_low"] > 0.2
    assert not cal.loc[("constant", "self"), "calibrated"]  # an explanation that never moves tracks nothing
    # the one-sided kappa at all inputs and at the quantile are both reported
    self_rows = result.summary[result.summary.term == "self"]
    assert (self_rows.kappa_all <= self_rows.kappa + 1e-12).all()


@pytest.fixture(scope="module")
def trained():
    from mmlens.training.fusion import train_fusion

    def load(task: str):
        t = train_fusion(task, n_train=4000, seed=0)
        return mmlens.wrap(t.model), t.batch(range(24))

    return load


@pytest.mark.parametrize("task", ["image_only", "synergistic"])
def test_random_control_is_significantly_worse_than_occlusion_under_granger(trained, task):
    hm, inputs = trained(task)
    result = granger(hm, inputs, ["occlusion", "random"], n_resamples=499, progress=False)
    cal = result.calibration.set_index(["explainer", "term"])
    occlusion = cal.loc[("occlusion", "self")]
    assert occlusion.rank_minus_random_low > 0  # the paired bootstrap interval over inputs excludes 0
    assert occlusion.beats_random and occlusion.calibrated
    assert not cal.loc[("random", "self")].calibrated


def test_granger_accepts_a_user_explainer_and_other_references(text_only):
    hm, inputs = text_only

    def by_norm(hooked, x, metric, setup):
        return (setup.embeds - setup.baseline).norm(dim=-1)

    by_norm.embeds_only = True  # it reads the input only through its setup

    items = [{k: v[:1] for k, v in inputs.items()}] * 3
    result = granger(hm, items, [by_norm], references=("neutral", "resample", "mean"), n_resamples=99, progress=False)
    assert set(result.explanations.explainer) == {"by_norm"}
    assert set(result.influence.reference) == {"neutral", "resample", "mean"}
    same = result.influence[result.influence.reference != "neutral"]  # every input is the same row
    assert (same.delta_js.abs() < 1e-6).all()
    with pytest.raises(ValueError, match="cannot explain an embedding-level variant"):
        granger(hm, items, ["attention"], references=("mean",), progress=False)


def test_relative_stability_is_scale_invariant():
    lm = load_model("tiny-fusion")
    hm, inputs = mmlens.wrap(lm.model), lm.example_inputs()
    mmlens.register_explainer(
        "occlusion_x7",
        lambda hooked, x, metric, setup: 7.5 * EXPLAINERS["occlusion"](hooked, x, metric, setup),
        embeds_only=True,
        overwrite=True,
    )
    one = {k: v[:1] for k, v in inputs.items()}
    result = stability(
        hm,
        one,
        ["occlusion", "occlusion_x7"],
        n=2,
        epsilons=(0.01, 0.05),
        random_draws=2,
        search_steps=1,
        progress=False,
    )
    s = result.samples
    a, b = s[s.explainer == "occlusion"], s[s.explainer == "occlusion_x7"]
    assert len(a) and set(a.source) >= {"input", "random"}
    for column in ("explanation_change", "ris", "res"):
        left = a[a.source != "adversarial"][column].to_numpy()
        right = b[b.source != "adversarial"][column].to_numpy()
        np.testing.assert_allclose(left, right, rtol=1e-5)
    raw_a, raw_b = (e[e.source != "adversarial"].explanation_distance.to_numpy() for e in (a, b))
    assert not np.allclose(raw_a, raw_b)  # the raw L2 ratio is not scale-invariant
    summary = result.summary
    assert set(summary.equation) == {"intra (6)", "cross (7)"} and set(summary.perturbed) == {"image", "text"}
    curve = summary[(summary.explainer == "occlusion") & (summary.source == "random")]
    assert set(curve.epsilon) == {0.01, 0.05}
    assert (summary.res_max >= summary.res_median).all()
    assert summary[summary.source == "input"].ris_max.notna().all()  # raw-input denominators for input draws


def test_global_top_k_crosses_modalities_and_metrics_do_not_saturate(text_only):
    hm, inputs = text_only
    one = {k: v[:1] for k, v in inputs.items()}
    setup = prepare(hm, one, None, "joint")
    scores = torch.full(setup.explained.shape, float("nan"))
    text, image = setup.spans.masks["text"][0], setup.spans.masks["image"][0]
    scores[0, text] = 1.0 + torch.arange(int(text.sum()), dtype=torch.float)  # every text position above the image
    scores[0, image] = 0.0
    explanation = Explanation(scores, setup.spans, "hand", "joint", setup.value)
    n_text, n_all = int(text.sum()), int((text | image).sum())
    k = n_text / n_all  # the global top-k is exactly the text
    result = faithfulness(
        hm,
        one,
        explanations=[explanation],
        fractions=(0.0, k, 1.0),
        random_draws=1,
        metric="logit_diff",
        progress=False,
    )
    row = result.curves[
        (result.curves.scope == "global") & (result.curves.source == "explanation") & (result.curves.k == k)
    ]
    keep_text = torch.where(image[None, :, None], setup.baseline, setup.embeds)  # image at its reference, text kept
    with torch.no_grad():
        logits = hm.readout_logits(with_embeds(hm, one, setup.point, keep_text, lambda out: out), one)
    target = int(setup.logits[0].argmax())
    others = torch.cat([logits[0, :target], logits[0, target + 1 :]])
    assert abs(float(row.f_keep.iloc[0]) - float(logits[0, target] - others.max())) < 1e-5
    assert result.metric == "logit_diff" and float(row.f.iloc[0]) > 0  # the prediction's margin
    with pytest.raises(ValueError, match="metric must be one of"):
        faithfulness(hm, one, explanations=[explanation], metric="accuracy", progress=False)


def test_interaction_in_log_odds_and_emap_with_intervals():
    from mmlens.metrics.desiderata import interaction

    hm, inputs = _additive_fusion()
    result = interaction(hm, inputs, n_resamples=199, progress=False)
    # additive in logits: EMAP's additive projection is the model itself, so the gap is 0 in every resample
    assert result.emap["gap"] == 0 and result.emap["gap_low"] == 0 and result.emap["gap_high"] == 0
    x = {k: v[:1] for k, v in inputs.items()}
    logits = {
        name: hm.readout_logits(hm.run(batch).logits, batch)
        for name, batch in (
            ("ab", x),
            ("a", hm.neutral(x, "text")),
            ("b", hm.neutral(x, "image")),
            ("none", hm.neutral(hm.neutral(x, "image"), "text")),
        )
    }
    target = int(logits["ab"][0].argmax())

    def odds(z):
        z = z[0].double()
        return float(z[target] - torch.cat([z[:target], z[target + 1 :]]).logsumexp(0))

    expected = odds(logits["ab"]) - odds(logits["a"]) - odds(logits["b"]) + odds(logits["none"])
    assert abs(result.per_input.shapley_interaction_logodds[0] - expected) < 1e-4
    for r in result.intervals.itertuples():
        assert r.low <= r.mean <= r.high and r.n_inputs == 16
    assert set(result.intervals.space) == {"prob", "logodds"}


def test_cluster_bootstrap_statistics_equal_scipy_on_the_repeated_sample():
    from scipy import stats

    from mmlens.metrics.intervals import cluster_bootstrap, weighted_fit, weighted_spearman

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 12).astype(float), rng.normal(size=12)  # ties in x
    counts = rng.integers(0, 3, (4, 12))
    for w in counts:
        xr, yr = np.repeat(x, w), np.repeat(y, w)
        assert abs(weighted_spearman(x, y, w[None])[0] - stats.spearmanr(xr, yr).statistic) < 1e-12
        assert abs(weighted_fit(x, y, w[None])[0][0] - np.polyfit(xr, yr, 1)[0]) < 1e-9
    assert weighted_spearman(x, np.ones(12), counts[:1])[0] == 0  # a constant explanation change tracks nothing
    estimate, low, high = cluster_bootstrap(range(12), lambda c: weighted_spearman(x, y, c), n_resamples=199)
    assert low <= estimate <= high


def test_controls_come_out_worst_under_faithfulness(trained):
    hm, inputs = trained("image_only")
    inputs = {k: v[:12] for k, v in inputs.items()}
    necessity = {}
    for name in ("occlusion", "inverted"):
        result = faithfulness(
            hm, inputs, name, fractions=(0.0, 0.25, 0.5), random_draws=2, n_resamples=499, progress=False
        )
        necessity[name] = result.intervals.set_index(["scope", "measure"]).loc[("global", "auc_necessity_drop")]
    assert necessity["occlusion"].better  # removing occlusion's top positions hurts more than random ones
    assert necessity["inverted"].diff_high < 0  # removing the least helpful first hurts less than random
    assert necessity["occlusion"]["diff"] > 0 > necessity["inverted"]["diff"]
