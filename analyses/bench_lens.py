"""Logit-lens speed on prompts that share a prefix: recorded once (``shared_prefix=True``) vs one plain forward.

    python -m mmlens.analyses.bench_lens [--quick] [--prompts 100] [--cells 5] [--repeats 2]

Workload: the TEA-GLM reproduction's node-classification prompts without graph tokens (chat header,
instruction with the class list, the node's title, the question, the answer cue;
:class:`mmlens.training.tea_glm.NodePrompts`) for the first ``--prompts`` Cora nodes, on
SmolLM2-135M-Instruct (``--quick``: TinyStories-656K, 6 prompts). Both sides decode the same cells
(the first ``--cells`` positions of each prompt's own part, after the shared instruction; the
TEA-GLM lens decodes 5 per node) under the normed and the raw lens
(:func:`mmlens.methods.lens.logit_lens_variants`), and the recording alone
(:func:`mmlens.core.replay.record_points`) is timed too. Runs are interleaved, the order rotating;
medians are reported. Agreement: the largest |difference| of
the top-1 probability and of the KL to the final layer at decoded cells (relative to the plain
run's largest value), and of the recorded residual stream at real positions (relative likewise).
The last line is ``speedup=<plain lens time / shared-prefix lens time> record_speedup=<...>
max_rel_diff=<...>``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

import mmlens
from mmlens.core.replay import record_points
from mmlens.core.wrapper import HookedModel
from mmlens.data.graphs import default_graph_token_id, load_text_attributed_graph
from mmlens.data.loading import load_model
from mmlens.methods.lens import logit_lens_variants, residual_points
from mmlens.training.tea_glm import NodePrompts

TOLERANCE = 1e-4  # relative: the fast path's documented bound


def workload(llm: str, n_prompts: int, per_prompt: int) -> tuple[HookedModel, dict, Tensor, int]:
    """The wrapped LLM, ``n_prompts`` right-padded text-only node prompts, the decoded cells Bool[b, seq]
    (the first ``per_prompt`` of each prompt's own positions) and the length of the shared instruction prefix."""
    loaded = load_model(llm)
    hooked = mmlens.wrap(loaded.model.eval(), tokenizer=loaded.tokenizer)
    graph = load_text_attributed_graph("cora", None, seed=0)
    prompts = NodePrompts(loaded.tokenizer, graph.class_words, default_graph_token_id(loaded.tokenizer))
    inputs = prompts.batch(graph.titles[:n_prompts], with_graph=False)
    prefix = len(prompts.prefix_ids(with_graph=False))
    cells = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
    cells[:, prefix : prefix + per_prompt] = True
    return hooked, inputs, cells & inputs["attention_mask"].bool(), prefix


def _median_times(runs: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Each run's median wall time over ``repeats`` interleaved rounds and its last result."""
    results: dict[str, object] = {}
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            start = time.perf_counter()
            results[name] = runs[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, results


def _relative(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b| over finite entries of ``b``."""
    keep = b.isfinite()
    return float((a[keep] - b[keep]).abs().max() / b[keep].abs().max().clamp_min(1e-30))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="seconds, for tests: TinyStories-656K, 6 prompts, 1 repeat"
    )
    parser.add_argument("--prompts", type=int, default=None, help="prompts in the batch (default 100; quick 6)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 2; quick 1)")
    parser.add_argument(
        "--cells", type=int, default=5, help="decoded positions per prompt, after the prefix (default 5, as TEA-GLM)"
    )
    args = parser.parse_args(argv)
    llm = "tinystories-656k" if args.quick else "smollm2-135m-instruct"
    n_prompts = args.prompts or (6 if args.quick else 100)
    repeats = args.repeats or (1 if args.quick else 2)
    hooked, inputs, cells, prefix = workload(llm, n_prompts, args.cells)
    names = residual_points(hooked)
    print(
        f"{llm}: {n_prompts} prompts x {inputs['input_ids'].shape[1]} positions (instruction prefix {prefix}), "
        f"{int(cells.sum())} decoded cells x {len(names)} layers; torch threads {torch.get_num_threads()}"
    )
    runs: dict[str, Callable[[], object]] = {
        "record shared": lambda: record_points(hooked, inputs, names),
        "record plain": lambda: record_points(hooked, inputs, names, shared_prefix=False),
        "lens shared": lambda: logit_lens_variants(hooked, inputs, (True, False), k=1, positions=cells),
        "lens plain": lambda: logit_lens_variants(
            hooked, inputs, (True, False), k=1, positions=cells, shared_prefix=False
        ),
    }
    with torch.no_grad():
        times, results = _median_times(runs, repeats)
    (fast_cache, method), (plain_cache, _) = results["record shared"], results["record plain"]
    valid = hooked.spans(inputs).valid
    diffs = [_relative(fast_cache[n][valid], plain_cache[n][valid]) for n in names]
    for variant in (True, False):
        fast, plain = results["lens shared"][variant], results["lens plain"][variant]
        diffs += [
            _relative(fast.top_probs[..., 0], plain.top_probs[..., 0]),
            _relative(fast.kl_to_final, plain.kl_to_final),
        ]
    print(f"  shared-prefix recording: {method}")
    for name, seconds in times.items():
        print(f"  {name:<14} {seconds:8.2f} s")
    speedup = times["lens plain"] / times["lens shared"]
    record_speedup = times["record plain"] / times["record shared"]
    worst = max(diffs)
    print(f"speedup={speedup:.2f} record_speedup={record_speedup:.2f} max_rel_diff={worst:.2e}")
    return {
        "speedup": speedup,
        "record_speedup": record_speedup,
        "max_rel_diff": worst,
        "method": method,
        "agree": worst <= TOLERANCE,
    }


if __name__ == "__main__":
    raise SystemExit(0 if main()["agree"] else 1)
