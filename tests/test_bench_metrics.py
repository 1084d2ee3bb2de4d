"""The metrics benchmark in its --quick form: mmlens's batched estimates equal the one-sample-at-a-time reference."""

from __future__ import annotations

import math
import re

import torch

from mmlens.analyses import bench_metrics


def test_quick_benchmark_estimates_agree(capsys):
    threads = torch.get_num_threads()
    try:
        result = bench_metrics.main(["--quick", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"speedup=\d+\.\d{2} max_abs_diff=\d\.\d{2}e[+-]\d{2}", lines[-1]), lines[-1]
    assert lines[-2].startswith("llava_faithfulness_speedup=") and " llava_stability_speedup=" in lines[-2]
    assert " llava_granger_speedup=" in lines[-2]

    assert result["agree"] and result["max_abs_diff"] <= 1e-4
    assert set(result) >= {"llava", "speedup", "max_abs_diff", "agree"} and "smollm2" not in result
    llava = result["llava"]
    for metric in ("faithfulness", "stability", "granger"):
        assert llava[f"{metric}_max_abs_diff"] <= 1e-4
        assert llava[f"{metric}_speedup"] > 0 and math.isfinite(llava[f"{metric}_speedup"])
        assert llava["times"][f"{metric}_mmlens"] > 0 and llava["times"][f"{metric}_reference"] > 0
    assert math.isclose(result["speedup"], llava["reference_s"] / llava["mmlens_s"])
    assert float(lines[-1].split()[0].split("=")[1]) == round(result["speedup"], 2)


def test_agreement_is_absolute_for_small_numbers_and_relative_for_large_ones():
    import pandas as pd

    reference = pd.DataFrame({"key": [0, 1], "value": [0.001, 100.0]})

    def units(small: float, large: float) -> float:
        mine = pd.DataFrame({"key": [0, 1], "value": [0.001 + small, 100.0 + large]})
        return bench_metrics.difference(mine, reference, ["key"], ["value"])[1]

    assert units(0.0, 0.0) == 0
    assert units(5e-6, 0.05) <= 1  # within 1e-5 + 1e-3 * |reference| at both
    assert units(5e-5, 0.0) > 1  # 5e-5 on 0.001: over the absolute part
    assert units(0.0, 0.5) > 1  # 0.5 on 100: over the relative part
    assert bench_metrics.difference(reference.iloc[:1], reference, ["key"], ["value"]) == (math.inf, math.inf)
