"""Overhead of the hook layer: plain HF forward vs wrapped forward vs caching the residual stream.

    python -m mmlens.analyses.bench_overhead [--model smollm2-135m-instruct] [--batch 8] [--seq 64]

All three run in one process on the same inputs, interleaved round by round so that machine noise
hits each alike; the median of ``--repeats`` rounds is reported. The last line is machine-readable:
``wrapped_over_plain=<x> cache_over_plain=<y>`` (targets: <= 1.05 and <= 1.25).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmlens.core.wrapper import HookedModel
from mmlens.data.loading import load_model

RESIDUAL_STREAM = ["lm.blocks.*.resid_pre", "lm.blocks.*.resid_mid", "lm.blocks.*.resid_post"]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)

    loaded = load_model(args.model)
    model = loaded.model
    hm = HookedModel(model, name=loaded.name)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def plain():
        with torch.no_grad():
            return model(**inputs).logits

    variants = {
        "plain HF forward": plain,
        "mmlens wrapped (no cache)": lambda: hm.run(inputs).logits,
        "mmlens caching residual stream": lambda: hm.run(inputs, cache=RESIDUAL_STREAM).logits,
    }
    reference = plain()
    for name, fn in variants.items():
        if not torch.equal(fn(), reference):
            raise AssertionError(f"{name} changed the logits")
    n_cached = len(hm.run(inputs, cache=RESIDUAL_STREAM).cache)

    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.warmup + args.repeats):
        order = list(variants)[round_ % 3 :] + list(variants)[: round_ % 3]
        for name in order:
            start = time.perf_counter()
            variants[name]()
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - start)

    medians = {name: statistics.median(ts) for name, ts in times.items()}
    base = medians["plain HF forward"]
    print(
        f"{loaded.name}, batch {args.batch} x {args.seq} tokens, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} interleaved rounds; all variants give bit-identical logits"
    )
    for name, t in medians.items():
        print(f"  {name:<34} {t * 1000:8.1f} ms   x{t / base:.3f}")
    print(f"  (residual stream = {n_cached} hook points: resid_pre/mid/post of every block)")
    result = {
        "wrapped_over_plain": medians["mmlens wrapped (no cache)"] / base,
        "cache_over_plain": medians["mmlens caching residual stream"] / base,
    }
    print(f"wrapped_over_plain={result['wrapped_over_plain']:.3f} cache_over_plain={result['cache_over_plain']:.3f}")
    return result


if __name__ == "__main__":
    main()
