"""mmlens evaluate: config checks, the files written, resume, and the example configs' validity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmlens.runs.cli import main
from mmlens.runs.config import ConfigError
from mmlens.runs.evaluate import EvaluationConfig, run_evaluation
from mmlens.runs.record import ResumeError

CONFIGS = Path(__file__).resolve().parents[1] / "analyses" / "configs"

SMALL = {
    "seed": 0,
    "model": {"name": "tiny-fusion"},
    "inputs": {"example": [0, 1]},
    "explainers": {"methods": ["gradient_x_input", "occlusion"]},
    "granger": {},
    "faithfulness": {"fractions": [0.0, 0.5, 1.0], "random_draws": 1},
    "stability": {"n": 1, "modalities": ["image"]},
    "output": {"dir": "unused"},
}


def test_evaluate_writes_every_file_and_resumes(tmp_path):
    config = EvaluationConfig.from_dict(SMALL, out=tmp_path / "run")
    first = run_evaluation(config, progress=False)
    names = {p.name for p in first.files}
    assert {
        "metrics.json",
        "summary.txt",
        "summary.csv",
        "granger_summary.csv",
        "stability_summary.csv",
        "faithfulness.png",
        "granger.svg",
        "stability.png",
    } <= names
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["config_hash"] == config.hash() and set(metrics["versions"]) >= {"mmlens", "torch"}
    assert {"granger_influence", "faithfulness_areas_occlusion", "stability_samples"} <= set(metrics["tables"])
    summary = first.summary()
    assert list(summary.explainer) == ["gradient_x_input", "occlusion"]
    assert {"granger_kappa_min", "necessity_auc", "stability_intra_p95"} <= set(summary.columns)
    parts = (tmp_path / "run" / "parts.jsonl").read_text().splitlines()
    assert len(parts) == 1 + 6  # the header, then 3 metrics x 2 explainers, saved as they finished
    again = run_evaluation(config, progress=False)  # every part is reused: nothing is recomputed
    assert not any(k.startswith(("granger_", "faithfulness_", "stability_")) for k in again.seconds)
    assert again.summary().equals(summary)
    other = EvaluationConfig.from_dict({**SMALL, "seed": 1}, out=tmp_path / "run")
    with pytest.raises(ResumeError, match="different config"):
        run_evaluation(other, progress=False)


def test_a_circuit_section_reports_keep_and_remove(tmp_path):
    import mmlens
    from mmlens.data.loading import load_model
    from mmlens.methods.circuits import components

    hm = mmlens.wrap(load_model("tiny-fusion").model)
    circuit = mmlens.Circuit(tuple(components(hm, ("attn_out", "mlp_out"))), name="whole joint transformer")
    circuit.save(tmp_path / "circuit.json")
    raw = {**SMALL, "circuit": {"file": str(tmp_path / "circuit.json"), "ablation": "zero", "random_draws": 1}}
    for key in ("granger", "faithfulness", "stability"):
        raw.pop(key)
    evaluation = run_evaluation(EvaluationConfig.from_dict(raw, out=tmp_path / "run"), progress=False)
    table = evaluation.circuit
    assert list(table.source.unique()) == ["circuit", "random"]
    assert (table[table.source == "circuit"].sufficiency_gap == 0).all()
    assert (tmp_path / "run" / "circuit_faithfulness.csv").is_file()
    with pytest.raises(ConfigError, match="circuit.file: no circuit JSON"):
        EvaluationConfig.from_dict({**raw, "circuit": {"file": str(tmp_path / "missing.json")}})


def test_cli_and_config_errors(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(
        '[model]\nname = "tiny-fusion"\n[inputs]\nexample = [0]\n[explainers]\nmethods = ["saliency"]\n'
        '[granger]\n[output]\ndir = "x"\n'
    )
    assert main(["evaluate", str(path)]) == 2
    assert "explainers.methods[0]: expected one of" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no metric section"):
        EvaluationConfig.from_dict(
            {k: v for k, v in SMALL.items() if k not in ("granger", "faithfulness", "stability")}
        )
    with pytest.raises(ConfigError, match="faithfulness.fractions"):
        EvaluationConfig.from_dict({**SMALL, "faithfulness": {"fractions": [0.5]}})
    with pytest.raises(ConfigError, match="inputs.example: rows \\[7\\] do not exist"):
        run_evaluation(
            EvaluationConfig.from_dict({**SMALL, "inputs": {"example": [7]}}, out=tmp_path / "r"), progress=False
        )


@pytest.mark.parametrize("name", ["evaluate_llava.toml", "evaluate_tea_glm.yaml"])
def test_example_configs_run_offline(name, tmp_path, capsys):
    config = EvaluationConfig.from_file(CONFIGS / name)
    assert config.granger and config.faithfulness and config.stability and config.explainers.methods
    out = tmp_path / "run"
    assert main(["evaluate", str(CONFIGS / name), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert all(m in printed for m in config.explainers.methods) and "metrics.json" in printed
    for file in ("metrics.json", "summary.txt", "faithfulness.png", "granger.png", "stability.png"):
        assert (out / file).is_file(), file
    metrics = json.loads((out / "metrics.json").read_text())
    influence = metrics["tables"]["granger_influence"]
    assert {row["modality"] for row in influence} == ({"text", "image"} if "llava" in name else {"text", "graph"})


def test_an_interrupted_evaluate_leaves_no_partial_files_and_resumes(tmp_path, monkeypatch, capsys):
    import mmlens.runs.evaluate as evaluate_cmd

    raw = {**SMALL, "inputs": {"example": [0]}, "faithfulness": None, "stability": None}
    config = tmp_path / "config.json"
    config.write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))
    out = tmp_path / "run"
    real, computed = evaluate_cmd._part, []

    def interrupted(*args):
        if computed:
            raise KeyboardInterrupt  # Ctrl-C during the second part
        computed.append(args[4])
        return real(*args)

    monkeypatch.setattr(evaluate_cmd, "_part", interrupted)
    assert main(["evaluate", str(config), "--out", str(out), "--no-progress"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [".mmlens.lock", "parts.jsonl"]  # no temporary or half files
    assert [json.loads(line)["key"] for line in (out / "parts.jsonl").read_text().splitlines()[1:]] == [
        "granger_gradient_x_input"
    ]
    computed.clear()
    monkeypatch.setattr(evaluate_cmd, "_part", lambda *args: computed.append(args[4]) or real(*args))
    assert main(["evaluate", str(config), "--out", str(out), "--no-progress"]) == 0
    assert computed == ["occlusion"]  # the finished part is reused
    assert (out / "granger_summary.csv").is_file()
