"""The TEA-GLM reproduction: prompts, prefix-cached training, caching/resume, and a small end-to-end run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mmlens.analyses import tea_glm_logit_lens as repro
from mmlens.data.graphs import default_graph_token_id
from mmlens.models import GraphSAGEEncoder, TeaGLM
from mmlens.training.tea_glm import (
    NodePrompts,
    PrefixRunner,
    ProjectorTrainConfig,
    classify_nodes,
    suffix_embeddings,
    train_projector,
)

CLASSES = [
    "rule learning",
    "neural networks",
    "case based reasoning",
    "genetic algorithms",
    "theory",
    "reinforcement learning",
    "probabilistic methods",
]
TITLES = ["Learning rules from data", "Backpropagation in deep nets", "A case memory", "Evolving programs"]


@pytest.fixture(scope="module")
def tiny_tea_glm(loaded):
    lm = loaded("tinystories-656k")
    torch.manual_seed(0)
    model = TeaGLM(lm.model, GraphSAGEEncoder(16, 128, 128), default_graph_token_id(lm.tokenizer)).eval()
    prompts = NodePrompts(lm.tokenizer, CLASSES, model.graph_token_id)
    return model, prompts


def test_prompts_have_one_graph_span_and_distinct_answers(tiny_tea_glm):
    model, prompts = tiny_tea_glm
    batch = prompts.batch(TITLES)
    graph = batch["input_ids"] == model.graph_token_id
    assert graph.sum(1).tolist() == [5] * len(TITLES)
    assert len(set(prompts.answer_ids.tolist())) == len(CLASSES)
    text_only = prompts.batch(TITLES, with_graph=False)
    assert not (text_only["input_ids"] == model.graph_token_id).any()
    assert (text_only["attention_mask"].sum(1) < batch["attention_mask"].sum(1)).all()


def test_colliding_class_words_are_refused(tiny_tea_glm, loaded):
    _, prompts = tiny_tea_glm
    with pytest.raises(ValueError, match="different tokens"):
        NodePrompts(prompts.tokenizer, ["theory", "theory of mind"], 0)


def test_prefix_cached_answer_logits_equal_the_full_forward(tiny_tea_glm):
    model, prompts = tiny_tea_glm
    node_repr = torch.randn(len(TITLES), 128)
    embeds, lengths = suffix_embeddings(model, prompts, TITLES, node_repr)
    with torch.no_grad():
        cached = PrefixRunner(model.lm, prompts.prefix_ids()).answer_logits(embeds, lengths)
        batch = prompts.batch(TITLES)
        full = model(**batch, graph_embeds=node_repr).logits
    last = batch["attention_mask"].sum(1) - 1
    torch.testing.assert_close(cached, full[torch.arange(len(TITLES)), last], rtol=1e-4, atol=1e-4)


def test_projector_training_learns_and_resumes_exactly(tiny_tea_glm, tmp_path):
    model, prompts = tiny_tea_glm
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 3, 5] * 4)
    node_repr = torch.randn(16, 128, generator=g) + 3 * torch.nn.functional.one_hot(labels, 128).float()
    titles = ["A paper"] * 16
    config = ProjectorTrainConfig(steps=12, batch_size=8, lr=5e-3, checkpoint_every=4)
    start = {k: v.clone() for k, v in model.projector.state_dict().items()}

    def fresh(steps: int, checkpoint: Path | None) -> tuple[list[float], dict]:
        model.projector.load_state_dict(start)
        losses = train_projector(
            model,
            prompts,
            node_repr,
            titles,
            labels,
            torch.arange(16),
            replace(config, steps=steps),
            checkpoint=checkpoint,
            progress=False,
        )
        return losses, {k: v.clone() for k, v in model.projector.state_dict().items()}

    straight, weights = fresh(12, None)
    assert straight[-1] < straight[0]
    fresh(8, tmp_path / "p.ckpt")
    resumed, resumed_weights = fresh(12, tmp_path / "p.ckpt")
    assert resumed == straight
    assert all(torch.equal(weights[k], resumed_weights[k]) for k in weights)
    scores = classify_nodes(model, prompts, node_repr, titles, torch.arange(16), progress=False)
    assert scores.shape == (16, len(CLASSES))
    torch.testing.assert_close(scores.exp().sum(1), torch.ones(16))


REQUIRED = {
    "llm": str,
    "dataset": str,
    "layers": list,
    "positions": list,
    "top_tokens": list,
    "top_probs": list,
    "evolution": dict,
    "accuracy": float,
    "majority_baseline": float,
    "text_only_accuracy": float,
    "n_nodes": int,
    "seed": int,
    "claim_reproduced": bool,
    "claim_evidence": dict,
    "timings_s": dict,
    "lens_variants": dict,
    "controls": dict,
    "seeds": dict,
    "per_layer_tests": dict,
    "patching": list,
    "claim_reproduced_overall": bool,
    "claim_statement": str,
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMLENS_CACHE", str(cache))
        first = repro.run(repro.quick_config(), out, progress=False)
        second = repro.run(repro.quick_config(), out, progress=False)
    return out, first, second


def test_quick_run_writes_the_documented_outputs(quick_run):
    out, _first, _ = quick_run
    for name in (
        "logit_lens.png",
        "logit_lens.svg",
        "evolution.png",
        "evolution.svg",
        "logit_lens.json",
        "lens_table.csv",
        "evolution_summary.csv",
        "split.json",
        "soft_tokens.csv",
        "gnn_layers.csv",
        "predictions.csv",
        "logit_lens_compact.png",
        "evolution_controls.png",
        "patching.png",
        "tuned_lens_curve.png",
        "evolution_bands.png",
        "soft_tokens.png",
        "tuned_lens_curve.csv",
    ):
        assert (out / name).stat().st_size > 0, name
    record = json.loads((out / "logit_lens.json").read_text())
    for key, kind in REQUIRED.items():
        assert isinstance(record[key], kind), key
    assert record["dataset"] == "cora" and record["majority_baseline"] == pytest.approx(818 / 2708)
    n_layers = len(record["layers"])
    assert len(record["top_tokens"]) == n_layers and len(record["top_tokens"][0]) == len(record["positions"])
    assert {p["modality"] for p in record["positions"]} == {"graph", "text"}
    assert set(record["evolution"]) == {"graph", "text"}
    for metric in ("top1_change", "kl_to_final", "cosine_to_previous", "first_final_top1_layer"):
        cell = record["evolution"]["graph"][metric]
        assert cell["low"] <= cell["mean"] <= cell["high"]
    votes = sum(row["a_evolves_less"] for row in record["claim_evidence"]["comparison"])
    assert record["claim_reproduced"] == (votes >= 3)
    assert record["tuned_lens"]["summary"]["graph"]["mean_kl_tuned_lens"] >= 0
    curve = record["tuned_lens"]["curve"]
    assert set(curve) == {"loss", "kl_graph", "kl_text"} and len(curve["loss"]) == 3
    _check_matched_fields(record)
    text = (out / "report.md").read_text()
    assert all(f"| {name} |" in text for name in record["lens_variants"]) and "Stage timings" in text
    assert f"{record['accuracy']:.3f}" in text and "image tokens" in text.lower()
    split = json.loads((out / "split.json").read_text())
    assert sorted(split["train"] + split["val"] + split["test"]) == list(range(2708))
    assert set(record["lens_nodes"]) <= set(split["test"])


def _check_matched_fields(record: dict) -> None:
    """The matched-control fields: every variant with verdicts against every control, accuracies
    of the projector controls, patching cells, and an overall claim consistent with the variants."""
    variants = record["lens_variants"]
    assert set(variants) == {f"{v}/{r}" for v in ("normed", "raw", "naive") for r in ("all_layers", "no_embedding_row")}
    controls = set(record["controls"])
    assert controls == {
        "text_title",
        "text_neutral",
        "random_norm",
        "mean_embedding",
        "constant_input",
        "no_neighbours",
    }
    for name, variant in variants.items():
        assert set(variant["comparisons"]) == {"text"} | controls, name
        assert set(variant["metrics"]) == {"graph", "text"} | controls
        for row in variant["verdict"]:
            assert row["verdict"] in ("less", "more", "equivalent", "inconclusive")
            assert row["deciding"] in {"text"} | controls
            if row["verdict"] == "less":
                assert all(row[c] == "less" for c in {"text"} | controls)
        n_less = sum(r["verdict"] == "less" for r in variant["verdict"])
        assert variant["claim_reproduced"] == (n_less >= 3 and variant["metrics_more"] == 0)
        assert variant["deciding_comparison"] in record["claim_statement"]
    assert record["claim_reproduced_overall"] == all(
        v["claim_reproduced"] for n, v in variants.items() if n.endswith("no_embedding_row")
    )
    for kind in ("constant_input", "no_neighbours"):
        assert 0 <= record["controls"][kind]["accuracy"]["accuracy"] <= 1
    assert {c["span"] for c in record["patching"]} >= {"graph", "text"}
    assert set(record["seeds"]) == {"0"} and record["seeds"]["0"]["accuracy"] == record["accuracy"]


def test_rerun_loads_from_cache_with_the_same_numbers(quick_run):
    _, first, second = quick_run
    cached = {"GNN (cached)", "projector (cached)", "evaluation (cached)", "controls, lens variants, patching (cached)"}
    assert cached <= set(second.stages.seconds)
    assert "GNN pretraining" in first.stages.seconds
    assert second.evaluation == first.evaluation
    assert torch.equal(second.lens.top_ids, first.lens.top_ids)


def test_synthetic_dataset_says_so_everywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("MMLENS_CACHE", str(tmp_path / "cache"))
    config = repro.quick_config(
        dataset="synthetic", synthetic_nodes=120, tuned_lens_steps=0, lens_variants=("normed",), patching_nodes=1
    )
    repro.run(config, tmp_path / "out", progress=False)
    record = json.loads((tmp_path / "out" / "logit_lens.json").read_text())
    assert record["dataset"] == "synthetic" and "SYNTHETIC" in record["note"]
    assert "SYNTHETIC" in json.loads((tmp_path / "out" / "split.json").read_text())["note"]
    for table in ("lens_table.csv", "predictions.csv", "soft_tokens.csv", "evolution_summary.csv"):
        assert set((tmp_path / "out" / table).read_text().splitlines()[1].split(",")[:1]) == {"synthetic"}
    assert "SYNTHETIC" in (tmp_path / "out" / "logit_lens.svg").read_text()


def test_missing_cora_names_where_it_looked(tmp_path, capsys):
    code = repro.main(["--quick", "--quiet", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere") in err and "--dataset synthetic" in err
