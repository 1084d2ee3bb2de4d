"""The synthetic benchmark as a preregistered experiment: position-level truth, distinct explainers
with controls, intervals on every cell, verdicts from named tests, and a null check of claim (c)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import mmlens
from mmlens.analyses import synthetic_benchmark as sb
from mmlens.data.tasks import make_task, truth_mask
from mmlens.metrics.desiderata import RANDOM_TOP_K, faithfulness, necessity_areas
from mmlens.metrics.stats import auc
from mmlens.training.fusion import train_fusion
from mmlens.training.graph_text import train_graph_text

VERDICTS = {"supported", "refuted", "inconclusive"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic_benchmark")
    report = sb.main(["--quick", "--out", str(out), "--no-progress", "--workers", "2"])
    return out, report


def test_truth_masks_follow_the_spans_of_the_fused_sequence():
    trained = train_fusion("image_only", seed=0)
    hm = mmlens.wrap(trained.model)
    for name in ("image_only", "text_only", "shortcut", "synergistic"):
        task = make_task(name, 8, seed=5)
        x = task.batch([3])
        spans = hm.spans(x)
        masks = {m: spans.masks[m][0] for m in spans.modalities}
        truth = truth_mask(task.key_positions(3), masks)
        image = truth[masks["image"]]
        text = truth[masks["text"]]
        if "image" in task.depends_on:
            assert torch.equal(image, task.image_key[3])
        else:  # the shortcut's shape looks relevant and is not key; text_only has no shape
            assert not image.any()
        words = task.attention_mask[3].bool()
        assert torch.equal(text, task.text_key[3][words] if "text" in task.depends_on else torch.zeros_like(text))
        assert text.sum() == ("text" in task.depends_on)
        assert not truth[~spans.valid[0]].any()


def test_truth_mask_refuses_a_layout_that_does_not_match():
    keys = {"image": torch.tensor([True, False, False]), "text": None}
    masks = {"image": torch.tensor([True, True, False, False]), "text": torch.tensor([False, False, True, True])}
    with pytest.raises(ValueError, match="image truth has 3 elements, the spans 2 positions"):
        truth_mask(keys, masks)
    keys["image"] = torch.tensor([False, True])
    assert truth_mask(keys, masks).tolist() == [False, True, True, True]  # None: every text position


def test_duplicates_are_found_and_position_auroc_is_signed():
    a = [torch.tensor([1.0, 2.0, float("nan")]), torch.tensor([0.0, 1.0, 3.0])]
    assert sb.duplicates({"x": a, "y": [t.clone() for t in a], "z": [-t for t in a]}) == [("x", "y")]
    truth = torch.tensor([False, True, True])
    assert sb.position_auroc(torch.tensor([0.0, 1.0, 2.0]), truth) == 1.0
    assert sb.position_auroc(-torch.tensor([0.0, 1.0, 2.0]), truth) == 0.0
    assert sb.position_auroc(torch.tensor([5.0, 1.0, float("nan")]), truth) == 0.0  # NaN: not scored


def test_the_preregistration_hash_is_written_before_any_result(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("stopped before the first part")

    monkeypatch.setattr(sb, "run_parts", fail)
    with pytest.raises(RuntimeError, match="stopped"):
        sb.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    head = json.loads((tmp_path / "benchmark.json").read_text())
    assert head["prereg_sha256"] == hashlib.sha256(sb.PREREG.read_bytes()).hexdigest()
    assert head["status"] == "running" and "claims" not in head


def test_the_report_records_design_verdicts_and_controls(run):
    out, report = run
    on_disk = json.loads((out / "benchmark.json").read_text())
    prereg, sha = sb.load_prereg()
    assert on_disk["prereg_sha256"] == sha and on_disk["status"] == "done"
    assert on_disk["seeds"] == prereg["design"]["seeds_quick"] and len(on_disk["seeds"]) >= 2
    assert on_disk["inputs_per_task"] == len(on_disk["seeds"]) * prereg["design"]["inputs_per_seed_quick"]
    assert all(m["accuracy"] >= prereg["learned_accuracy"] and "skipped" not in m for m in report["models"])
    assert [c["claim"][:3] for c in on_disk["claims"]] == ["(a)", "(b)", "(c)", "(d)", "(e)"]
    assert all(c["verdict"] in VERDICTS and c["test"] for c in on_disk["claims"])
    a, b, c, d, e = on_disk["claims"]
    for comparison in [*d["comparisons"].values(), *e["comparisons"].values()]:
        assert comparison["verdict"] in VERDICTS and comparison["n_models"] == len(report["models"])
        assert comparison["low"] <= comparison["estimate"] <= comparison["high"], comparison
    assert all({"estimate", "low", "high"} <= set(v["difference"]) for v in a["comparisons"].values())
    assert all({"estimate", "low", "high"} <= set(v["difference"]) for v in b["comparisons"].values())
    assert 0 <= c["p_value"] <= 1 and 0 <= c["gate"]["p_value"] <= 1
    assert set(on_disk["controls"]) == {"random", "constant", "inverted"}
    assert set(on_disk["controls"]) <= set(c["per_explainer"]) and set(on_disk["controls"]) <= set(c["chance_tests"])


def test_eight_distinct_explainers_plus_controls_and_every_cell_has_an_interval(run):
    _, report = run
    names = [name for name, _, _ in report["explainers"]]
    assert len(names) == len(set(names)) == 11
    cells = report["cells_position_auroc"]
    assert {(r["task"], r["explainer"]) for r in cells} == {
        (t, n) for t in (*sb.load_prereg()[0]["design"]["tasks"], "all") for n in names
    }
    for r in cells + report["cells_faithfulness_margin"]:
        assert r["low"] <= r["estimate"] <= r["high"] and r["n"] >= 2, r


def test_controls_behave_as_controls(run):
    _, report = run
    pooled = {r["explainer"]: r for r in report["cells_position_auroc"] if r["task"] == "all"}
    assert pooled["constant"]["estimate"] == 0.5  # all ties
    assert pooled["random"]["low"] < 0.5 < pooled["random"]["high"]
    assert pooled["inverted"]["estimate"] < 0.5 < pooled["occlusion"]["estimate"]
    chance = report["claims"][2]["chance_tests"]
    assert not chance["random"]["beats_chance"] and not chance["constant"]["beats_chance"]
    assert chance["occlusion"]["beats_chance"] and chance["integrated_gradients"]["beats_chance"]


def test_claim_a_auroc_is_computed_from_the_models_features(run):
    _, report = run
    models = report["models_features"]
    prereg = sb.load_prereg()[0]["claim_a"]
    pos = [m["interaction"] for m in models if m["task"] in prereg["positive"]]
    neg = [m["interaction"] for m in models if m["task"] in prereg["negative"]]
    assert len(pos) == 2 * len(sb.load_prereg()[0]["design"]["seeds_quick"]) and len(neg) == 5 * len(pos) / 2
    assert report["claims"][0]["interaction"]["estimate"] == auc(pos, neg)


def test_claim_c_is_not_supported_when_every_explainer_is_random(run, tmp_path):
    report = sb.main(["--quick", "--out", str(tmp_path), "--no-progress", "--substitute-random", "--workers", "2"])
    assert {m for _, m, _ in report["explainers"]} == {"random"}
    assert report["claims"][2]["verdict"] != "supported"
    pooled = [r for r in report["cells_position_auroc"] if r["task"] == "all"]
    assert all(abs(r["estimate"] - 0.5) < 0.15 for r in pooled), pooled


def test_a_rerun_resumes_from_the_saved_parts(run):
    out, report = run
    again = sb.main(["--quick", "--out", str(out), "--no-progress"])
    assert again["cells_position_auroc"] == report["cells_position_auroc"]
    assert again["seconds"] < report["seconds"] / 3


def test_graph_tasks_are_scored_against_their_neighbourhood_truth(run):
    _, report = run
    trained = train_graph_text("graph_text_synergy", seed=0)
    hm = mmlens.wrap(trained.model)
    x = trained.task.batch([0])
    spans = hm.spans(x)
    truth = truth_mask(trained.task.key_positions(0), {m: spans.masks[m][0] for m in spans.modalities})
    assert truth[spans.masks["graph"][0]].all()  # every graph token encodes the target's neighbourhood
    assert truth[spans.masks["text"][0]].sum() == 1  # the side word
    pooled = {(r["task"], r["explainer"]): r for r in report["cells_position_auroc"]}
    for task in ("graph_only", "graph_text_synergy"):
        assert pooled[task, "constant"]["estimate"] == 0.5
        assert pooled[task, "inverted"]["estimate"] < 0.5 < pooled[task, "occlusion"]["estimate"]


def test_granger_and_stability_verdicts_include_the_controls(run):
    _, report = run
    d, e = report["claims"][3:]
    ranks = {name: r["estimate"] for name, r in d["per_explainer_rank"].items()}
    assert set(ranks) == {"occlusion", "gradient_x_input", "random"}
    assert ranks["occlusion"] > ranks["random"]
    res = {name: r["res_sup_median"]["estimate"] for name, r in e["per_explainer"].items()}
    assert res["constant"] == 0.0  # perfectly stable and uninformative: why stability is never read alone
    assert res["random"] > 5 * res["occlusion"] and e["verdict"] == "supported"


def test_necessity_areas_are_faithfulness_numbers_for_many_explainers_at_once():
    trained = train_fusion("image_only", seed=0)
    hm = mmlens.wrap(trained.model)
    items = [trained.task.batch([r]) for r in range(2)]
    names = ("occlusion", "inverted", "random")
    explanations = {n: [mmlens.explain(hm, x, n) for x in items] for n in names}
    batched = necessity_areas(hm, items, explanations, fractions=(0, 0.5, 1), random_draws=2)
    mean = batched.groupby("source").auc_necessity_drop.mean()
    for name in names:
        f = faithfulness(hm, items, name, fractions=(0, 0.5, 1), random_draws=2, explanations=explanations[name])
        area = f.areas.set_index(["scope", "source"]).auc_necessity_drop
        assert mean[name] == pytest.approx(area["joint", "explanation"], abs=1e-6)
        assert mean[RANDOM_TOP_K] == pytest.approx(area["joint", "random"], abs=1e-6)
    assert mean["inverted"] < mean[RANDOM_TOP_K] < mean["occlusion"]  # the control must score badly


def test_ray_with_two_workers_gives_the_serial_parts_and_tables(run, tmp_path):
    import ray  # the optional extra that CI installs

    out, _ = run
    tasks = ["image_only", "graph_only"]
    argv = ["--quick", "--no-progress", "--tasks", ",".join(tasks)]
    on_ray = sb.main([*argv, "--out", str(tmp_path), "--executor", "ray", "--workers", "2"])
    assert not ray.is_initialized()
    timing = {"from_cache", "train_seconds", "train_cpu_seconds", "score_seconds", "score_cpu_seconds"}

    def parts(folder):
        (path,) = (folder / "parts").glob("*.jsonl")
        found = [json.loads(line) for line in path.read_text().splitlines()[1:]]
        return {p["key"]: {k: v for k, v in p.items() if k not in timing} for p in found if p.get("task") in tasks}

    def same(a, b) -> bool:  # NaN included
        return json.dumps(a, sort_keys=True, default=float) == json.dumps(b, sort_keys=True, default=float)

    assert same(parts(tmp_path), parts(out)) and len(parts(tmp_path)) == 4
    serial = sb.analyse(list(parts(out).values()), sb.load_prereg()[0])
    assert same(on_ray["cells_position_auroc"], serial["cells_position_auroc"])
    assert same(on_ray["claims"], serial["claims"])


def test_tables_do_not_depend_on_the_order_in_which_units_finished(run):
    out, _ = run
    (path,) = (out / "parts").glob("*.jsonl")
    found = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    prereg = sb.load_prereg()[0]
    forward, backward = sb.analyse(found, prereg), sb.analyse(found[::-1], prereg)
    assert json.dumps(forward, sort_keys=True, default=float) == json.dumps(backward, sort_keys=True, default=float)
