"""Resume you can trust: a changed local checkpoint is never mixed in, the same folder spelled two
ways resumes, and a second run into a busy folder stops with a clear message."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmlens.data.paths import models_dir
from mmlens.runs.config import ConfigError
from mmlens.runs.patch import PatchConfig, run_patch
from mmlens.runs.record import ResumeError
from mmlens.store import FolderBusyError, output_lock

CONFIG = """
seed = 0
[model]
name = "{model}"
[[inputs.pairs]]
clean = "Tom had a red ball. He gave it to"
corrupted = "Sue had a red ball. She gave it to"
[patch]
hook = "resid_post"
batch_size = 8
[metric]
kind = "kl"
[output]
dir = "{out}"
"""


def _config(tmp_path, model: str, out: str) -> PatchConfig:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(model=model, out=out))
    return PatchConfig.from_file(path)


@pytest.fixture
def local_model(tmp_path):
    folder = tmp_path / "my-checkpoint"
    shutil.copytree(models_dir() / "tinystories-656k", folder)
    return folder


def test_changed_local_weights_are_never_reused(tmp_path, local_model):
    out = tmp_path / "run"
    first = run_patch(_config(tmp_path, str(local_model), str(out)), progress=False)
    assert first.computed > 0
    weights = load_file(local_model / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 0.01 * torch.ones_like(weights[name])
    save_file(weights, local_model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ResumeError, match="model_identity"):
        run_patch(_config(tmp_path, str(local_model), str(out)), progress=False)
    again = run_patch(_config(tmp_path, str(local_model), str(out)), overwrite=True, progress=False)
    assert again.reused == 0 and not again.result.table["value"].equals(first.result.table["value"])


def test_the_same_folder_spelled_two_ways_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = run_patch(_config(tmp_path, "tinystories-656k", "./run"), progress=False)
    second = run_patch(_config(tmp_path, "tinystories-656k", str(tmp_path / "sub" / ".." / "run")), progress=False)
    assert second.computed == 0 and second.reused == first.computed
    assert second.result.table.equals(first.result.table)


def test_a_second_run_into_a_busy_folder_stops_clearly(tmp_path):
    out = tmp_path / "run"
    with output_lock(out):
        with pytest.raises(FolderBusyError, match=r"another mmlens run \(pid \d+.*is writing to .*run"):
            run_patch(_config(tmp_path, "tinystories-656k", str(out)), progress=False)
    assert run_patch(_config(tmp_path, "tinystories-656k", str(out)), progress=False).computed > 0


def test_tilde_in_the_output_folder_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = _config(tmp_path, "tinystories-656k", "~/x")
    assert config.output.dir == str(tmp_path / "x")


def test_an_output_folder_under_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OSError, match="cannot use .*a-file/run as the output folder"):
        run_patch(_config(tmp_path, "tinystories-656k", str(tmp_path / "a-file" / "run")), progress=False)
    assert ConfigError  # the config itself was valid: the folder is what is refused


EVALUATE = {
    "seed": 0,
    "model": {"name": "tiny-fusion"},
    "inputs": {"example": [0]},
    "explainers": {"methods": ["gradient_x_input", "occlusion"]},
    "granger": {},
    "output": {"dir": "unused"},
}


def test_evaluate_overwrite_leaves_no_stale_tables_and_a_busy_folder_stops(tmp_path):
    from mmlens.runs.evaluate import EvaluationConfig, run_evaluation

    out = tmp_path / "run"
    run_evaluation(EvaluationConfig.from_dict(EVALUATE, out=out), progress=False)
    stale = out / "leftover_from_an_old_explainer.csv"
    stale.write_text("x\n1\n")
    fewer = EvaluationConfig.from_dict({**EVALUATE, "explainers": {"methods": ["occlusion"]}}, out=out)
    run_evaluation(fewer, overwrite=True, progress=False)
    assert not stale.exists()
    assert "gradient_x_input" not in (out / "granger_summary.csv").read_text()
    with output_lock(out), pytest.raises(FolderBusyError, match="another mmlens run"):
        run_evaluation(fewer, progress=False)
