"""The synthetic benchmark's quick run: Granger influence finds the ground-truth modalities and the
interaction measures separate the synergistic task from the additive ones."""

from __future__ import annotations

import json

import pytest

from mmlens.analyses import synthetic_benchmark as sb


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic_benchmark")
    report = sb.main(["--quick", "--out", str(out), "--no-progress"])
    return out, report


def _score(report, task, method, score):
    values = [
        r["value"] for r in report["scores"] if r["task"] == task and r["method"] == method and r["score"] == score
    ]
    assert len(values) == 1, (task, method, score)
    return values[0]


def test_it_writes_the_report_with_every_model_and_explainer(run):
    out, report = run
    on_disk = json.loads((out / "benchmark.json").read_text())
    assert on_disk["claims"] == json.loads(json.dumps(report["claims"], default=float))
    tasks = {m["task"] for m in report["models"]}
    assert tasks == set(sb.TASK_NAMES) | {"vqa"}
    assert all(m["learned"] and m["accuracy"] >= 0.9 for m in report["models"])
    scored = {(r["task"], r["method"], r["mode"]) for r in report["scores"] if r["score"] == "truth_match"}
    assert scored == {(t, m, mode) for t in tasks for m in sb.EXPLAINERS for mode in ("joint", "unimodal")}
    assert {c["claim"][:3] for c in report["claims"]} == {"(a)", "(b)", "(c)"}
    assert all(isinstance(c["supported"], bool) for c in report["claims"])
    for name in (
        "scores.csv",
        "influence.csv",
        "interaction.csv",
        "models.csv",
        "truth_match.png",
        "influence_and_interaction.png",
    ):
        assert (out / name).is_file(), name


@pytest.mark.parametrize(
    "task, relevant, other",
    [
        ("image_only", "image", "text"),
        ("text_only", "text", "image"),
        ("shortcut", "text", "image"),
        ("graph_only", "graph", "text"),
    ],
)
def test_granger_influence_identifies_the_ground_truth_modality(run, task, relevant, other):
    _, report = run
    assert _score(report, task, "granger", f"delta_js_{relevant}") >= sb.LARGE
    assert _score(report, task, "granger", f"delta_js_{other}") < sb.SMALL
    assert _score(report, task, "granger", "identifies_truth") == 1


@pytest.mark.parametrize(
    "task, modalities", [("synergistic", ("image", "text")), ("graph_text_synergy", ("graph", "text"))]
)
def test_granger_finds_both_modalities_in_the_xor_tasks(run, task, modalities):
    _, report = run
    assert min(_score(report, task, "granger", f"delta_js_{m}") for m in modalities) >= sb.LARGE


def test_the_interaction_separates_the_synergistic_task_from_the_additive_ones(run):
    _, report = run
    synergy = _score(report, "synergistic", "interaction", "shapley_interaction")
    gap = _score(report, "synergistic", "interaction", "emap_gap")
    assert synergy > 0.1 and gap > 0.2
    for task in ("image_only", "text_only", "shortcut", "graph_only"):
        assert abs(_score(report, task, "interaction", "shapley_interaction")) < synergy / 4, task
        assert abs(_score(report, task, "interaction", "emap_gap")) < 0.05, task
    for score in ("shapley_interaction", "emap_gap"):  # the graph XOR interacts, its additive twin does not
        assert (
            _score(report, "graph_text_synergy", "interaction", score)
            > _score(report, "graph_only", "interaction", score) + 0.05
        ), score
    assert _score(report, "redundant", "interaction", "shapley_interaction") < 0  # redundancy: either suffices


def test_a_rerun_resumes_from_the_saved_parts(run, capsys):
    out, report = run
    again = sb.main(["--quick", "--out", str(out), "--no-progress"])
    assert "resumed from" in capsys.readouterr().out
    assert again["scores"] == report["scores"]
