"""The logit-lens benchmark in its --quick form: shared-prefix recording equals the plain forward."""

from __future__ import annotations

import re

from mmlens.analyses import bench_lens


def test_quick_lens_benchmark_records_the_prefix_once_and_agrees(capsys):
    result = bench_lens.main(["--quick"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"speedup=\d+\.\d{2} record_speedup=\d+\.\d{2} max_rel_diff=\S+", lines[-1]), lines[-1]
    assert result["method"].startswith("shared prefix: positions 0.."), result["method"]
    assert result["agree"] and result["max_rel_diff"] <= bench_lens.TOLERANCE
    assert result["speedup"] > 0 and result["record_speedup"] > 0
