"""The patching benchmark in its --quick form: TransformerLens, nnsight and mmlens give the same grids."""

from __future__ import annotations

import numpy as np
import torch

from mmlens.analyses import bench_patching


def test_quick_benchmark_grids_agree(capsys):
    threads = torch.get_num_threads()
    try:
        result = bench_patching.main(["--quick", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[-1].startswith("speedup=") and " max_abs_diff=" in lines[-1]
    assert lines[-2].startswith("all_cells_speedup=")
    assert lines[-3].startswith("llava_speedup=") and " llava_max_abs_diff=" in lines[-3]
    assert lines[-4].startswith("bidir_speedup=") and " bidir_method=replay (no kv reuse" in lines[-4]
    assert result["agree"]

    smol = result["smollm2"]
    assert smol["max_abs_diff"] <= bench_patching.TOLERANCE
    grids = smol["grids"]
    assert set(grids) == {"transformerlens", "nnsight", "mmlens_all_cells", "mmlens"}
    assert all(g.shape == (2, 14) for g in grids.values())  # layers 0 and 20 x 14 tokens
    for g in grids.values():
        np.testing.assert_allclose(g, grids["mmlens"], atol=bench_patching.TOLERANCE, rtol=0)
    # layer 0: patching the one position where the prompts differ gives the clean run; any other is a no-op
    row = grids["mmlens"][0]
    changed = np.flatnonzero(np.abs(row - smol["corrupted"]) > 1e-4)
    assert len(changed) == 1 and abs(row[changed[0]] - smol["clean"]) < 1e-4
    assert smol["clean"] > 0 > smol["corrupted"]  # " Mary" wins on the clean prompt, " John" on the corrupted

    llava = result["llava"]
    assert llava["tl_booted"], "TransformerLens should boot the tiny LLaVA with the stand-in processor"
    assert llava["max_abs_diff"] <= bench_patching.TOLERANCE
    assert all(g.shape == (2, 24) for g in llava["grids"].values())
    assert result["speedup"] > 0 and np.isfinite(result["speedup"])

    bidir = result["bidir"]  # a VLM with bidirectional image attention: replay without key/value reuse
    assert bidir["method"].startswith("replay (no kv reuse") and bidir["max_abs_diff"] <= bench_patching.TOLERANCE
    assert set(bidir["grids"]) == {"full", "mmlens_all_cells", "mmlens"}
