"""`mmlens patch --executor ray`: the same results as the serial run, through the same record."""

from __future__ import annotations

import json

import pandas as pd
import ray

from mmlens.runs.cli import main
from mmlens.runs.executors import SerialExecutor

CONFIG = """
seed = 0
[model]
name = "tinystories-656k"
[[inputs.pairs]]
clean = "Tom had a red ball. He gave it to"
corrupted = "Sue had a red ball. She gave it to"
[[inputs.pairs]]
clean = "Once upon a time there was a little girl who"
[corruption]
modality = "text"
method = "noise"
noise = 2.0
[patch]
hook = "resid_post"
batch_size = 8
[metric]
kind = "kl"
[output]
dir = "unused"
"""


def test_ray_with_two_workers_gives_the_serial_results(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    assert main(["patch", str(config), "--out", str(tmp_path / "serial"), "--no-progress"]) == 0
    args = [
        "patch",
        str(config),
        "--out",
        str(tmp_path / "ray"),
        "--no-progress",
        "--executor",
        "ray",
        "--workers",
        "2",
    ]
    assert main(args) == 0
    serial = (tmp_path / "serial" / "results.csv").read_bytes()
    assert (tmp_path / "ray" / "results.csv").read_bytes() == serial
    assert len(pd.read_csv(tmp_path / "ray" / "results.csv")) > 0
    assert not ray.is_initialized(), "a local cluster started for the run is stopped after it"


def test_ray_options_without_the_ray_executor_are_refused(tmp_path, capsys):
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    assert main(["patch", str(config), "--workers", "2"]) == 2
    assert "--executor ray" in capsys.readouterr().err


def test_the_serial_executor_computes_in_order():
    assert list(SerialExecutor().map("prepared", [1, 2, 3], lambda p, c: {"key": f"{p}{c}"})) == [
        {"key": "prepared1"},
        {"key": "prepared2"},
        {"key": "prepared3"},
    ]


EVALUATE = """
seed = 0
[model]
name = "tiny-fusion"
[inputs]
example = [0, 1]
[explainers]
methods = ["occlusion", "random"]
[granger]
[faithfulness]
fractions = [0.0, 0.5, 1.0]
random_draws = 2
[stability]
n = 1
modalities = ["image"]
[output]
dir = "unused"
"""


def test_evaluate_on_ray_with_two_workers_gives_the_serial_tables(tmp_path):
    config = tmp_path / "evaluate.toml"
    config.write_text(EVALUATE)
    assert main(["evaluate", str(config), "--out", str(tmp_path / "serial"), "--no-progress"]) == 0
    ray_run = ["evaluate", str(config), "--out", str(tmp_path / "ray"), "--no-progress", "--executor", "ray"]
    assert main([*ray_run, "--workers", "2"]) == 0
    tables = sorted(p.name for p in (tmp_path / "serial").glob("*.csv"))
    assert len(tables) >= 10 and tables == sorted(p.name for p in (tmp_path / "ray").glob("*.csv"))
    for name in [*tables, "summary.txt"]:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "serial" / name).read_bytes(), name
    serial, distributed = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("serial", "ray"))
    assert distributed["tables"] == serial["tables"] and distributed["config_hash"] == serial["config_hash"]
    parts = (tmp_path / "ray" / "parts.jsonl").read_text().splitlines()
    assert len(parts) == 1 + 3 * 2  # the header, then 3 metrics x 2 explainers, recorded by the driver
    assert not ray.is_initialized()
    # the record is the serial one's: a serial rerun into the Ray folder reuses every part
    assert main(["evaluate", str(config), "--out", str(tmp_path / "ray"), "--no-progress"]) == 0
    assert not any(
        k.startswith(("granger_", "stability_"))
        for k in json.loads((tmp_path / "ray" / "metrics.json").read_text())["timings_s"]
    )


def test_evaluate_refuses_ray_options_without_the_ray_executor(tmp_path, capsys):
    config = tmp_path / "evaluate.toml"
    config.write_text(EVALUATE)
    assert main(["evaluate", str(config), "--ray-address", "auto"]) == 2
    assert "--executor ray" in capsys.readouterr().err
