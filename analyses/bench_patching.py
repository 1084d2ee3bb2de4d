"""Activation-patching speed: the full residual-stream (layer x position) denoising grid, three ways.

    python -m mmlens.analyses.bench_patching [--prompt-tokens 40] [--repeats 1] [--batch-size 32]
                                             [--llava-repeats 5] [--layers 0,15,29] [--quick] [--profile]

One process computes the same grid with (a) TransformerLens 4.x (a ``TransformerBridge`` booted
around the HF model, ``transformer_lens.patching.get_act_patch_resid_pre``), (b) a plain nnsight
loop (one trace per cell, writing the clean value into ``layers[l].input[:, p]``) and (c)
``mmlens.methods.patching.sweep``. Each implementation runs on its own copy of the model (booting the bridge
rewires the HF model in place), all under ``torch.no_grad`` with the same threads and with eager
attention (the bridge forces it; the other copies are switched so all three compute the same
function). Cell (l, p): run the corrupted prompt with the residual stream entering block l
(``resid_pre``) at position p replaced by the clean run's; metric = logit difference between the
two answers at the final position.

Timing is end to end per implementation, clean/corrupted baseline runs included (model loading,
bridge boot and wrapping are setup, reported apart); repeats are interleaved round by round and the
median is reported. Peak memory is the largest RSS increase above the RSS at the start of the
implementation's run, sampled every 5 ms by a background thread (after ``gc`` and ``malloc_trim``).

Three sections: SmolLM2-135M-Instruct on an IOI-style prompt (" Mary" vs " John"), then the tiny
random LLaVA with the image replaced by a zero image (TransformerLens is booted with a stand-in
processor; if it cannot boot, mmlens is compared with nnsight only), then a VLM whose image tokens
attend to each other both ways (the first registered of ``BIDIRECTIONAL``, else the tiny LLaVA
wrapped with ``causal=False`` as a stand-in, and the output says so): keys and values cannot be
reused there, so the sweep falls back to plain replay; it is timed against one full forward per
cell, so the fallback's cost is visible. The output ends with
``bidir_speedup=<x> bidir_method=<sweep method> bidir_max_abs_diff=<y>``,
``llava_speedup=<x> llava_max_abs_diff=<y>`` and, as the last line,
``speedup=<mmlens vs the faster competitor> max_abs_diff=<largest cell difference>`` for SmolLM2.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import ctypes
import dataclasses
import gc
import io
import os
import platform
import pstats
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import pandas as pd
import torch
from typing_extensions import Self

import mmlens
from mmlens.data.loading import LoadedModel, load_model, registry_names
from mmlens.data.paths import cache_dir
from mmlens.methods.patching import logit_diff, sweep

T = TypeVar("T")

TOLERANCE = 1e-4
STORY = (
    "Last summer the whole family spent a long weekend at the old cabin by the lake. The weather was warm and "
    "bright, the children swam in the cold water every morning, and in the evenings everyone sat together "
    "around the fire, telling stories and laughing until late at night. On the last day the house was quiet, "
    "the bags were packed, and the fridge was nearly empty."
)
IOI_CLEAN = " When Mary and John went to the store, John gave a drink to"
IOI_CORRUPTED = " When Mary and John went to the store, Mary gave a drink to"
ANSWER, WRONG = " Mary", " John"


# -- measurement ------------------------------------------------------------------------------------


def _rss() -> int:
    """Resident set size of this process in bytes."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read this process's RSS")


class RssSampler:
    """Peak RSS increase over the RSS at entry, sampled by a background thread every ``interval`` s."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self.start = self.peak = _rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def _release_memory() -> None:
    """Collect garbage and hand free heap pages back to the OS, so each RSS peak starts level."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class Grid:
    """One implementation's result: ``values`` Float[layers, positions], plus the unpatched metrics."""

    values: np.ndarray
    clean: float
    corrupted: float


@dataclass
class Measured:
    name: str
    run: Callable[[], Grid]
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    peaks: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)
    grid: Grid | None = None

    @property
    def time(self) -> float:
        return statistics.median(self.times)

    @property
    def peak(self) -> float:
        return max(self.peaks)


def warm_up(runs: list[Callable[[], Grid]]) -> None:
    """One small untimed run of each implementation (lazy imports, first-call caches, allocator)."""
    for run in runs:
        with torch.no_grad():
            run()


def measure(impls: list[Measured], repeats: int) -> None:
    """Run every implementation ``repeats`` times, interleaved round by round (the order rotates)."""
    for round_ in range(repeats):
        order = impls[round_ % len(impls) :] + impls[: round_ % len(impls)]
        for impl in order:
            _release_memory()
            with RssSampler() as rss:
                start, cpu = time.perf_counter(), time.process_time()
                with torch.no_grad():
                    grid = impl.run()
                impl.times.append(time.perf_counter() - start)
                impl.cpu.append(time.process_time() - cpu)
            impl.load.append(os.getloadavg()[0])
            impl.peaks.append(rss.extra_mb)
            impl.grid = grid
            del grid


def compare(impls: list[Measured]) -> tuple[float, list[str]]:
    """Largest |difference| over cells (and the unpatched metrics) between any two implementations."""
    worst, lines = 0.0, []
    for i, a in enumerate(impls):
        for b in impls[i + 1 :]:
            cells = float(np.abs(a.grid.values - b.grid.values).max())
            base = max(abs(a.grid.clean - b.grid.clean), abs(a.grid.corrupted - b.grid.corrupted))
            worst = max(worst, cells, base)
            lines.append(f"{a.name} vs {b.name}: cells {cells:.2e}, unpatched clean/corrupted {base:.2e}")
    return worst, lines


def report(title: str, impls: list[Measured], repeats: int) -> dict[str, float]:
    """Print the table; returns speedup (faster competitor / mmlens with its defaults, the last
    implementation), the same for mmlens computing every cell, and max_abs_diff."""
    mine = impls[-1]
    competitors = [impl for impl in impls if not impl.name.startswith("mmlens")]
    all_cells = next((impl for impl in impls if impl.name.startswith("mmlens") and "every cell" in impl.name), mine)
    diff, lines = compare(impls)
    print(f"\n{title}")
    width = max(len(impl.name) for impl in impls)
    print(
        f"  {'implementation':<{width}} {'time (s)':>9} {'x mmlens':>9} {'peak extra RSS (MB)':>20} "
        f"{'CPU/wall':>9} {'load 1m':>8}"
    )
    for impl in impls:
        spread = f"  [{min(impl.times):.3f}-{max(impl.times):.3f}]" if len(impl.times) > 1 else ""
        busy = statistics.median(c / t for c, t in zip(impl.cpu, impl.times))
        print(
            f"  {impl.name:<{width}} {impl.time:9.3f} {impl.time / mine.time:9.2f} {impl.peak:20.1f} {busy:9.2f} "
            f"{max(impl.load):8.2f}{spread}"
        )
    print(
        f"  (median of {repeats} interleaved run(s); time includes each implementation's clean/corrupted runs; "
        f"CPU/wall = process CPU time over wall time, ~threads when the cores are ours; load 1m = 1-minute "
        f"load average at the end of the run, above ~{torch.get_num_threads()} means another process competed)"
    )
    print("  agreement (max |difference|):")
    for line in lines:
        print(f"    {line}")
    status = "OK" if diff <= TOLERANCE else "MISMATCH"
    print(f"  max_abs_diff {diff:.2e} (tolerance {TOLERANCE:.0e}): {status}")
    fastest = min(competitors, key=lambda impl: impl.time)
    speedup = fastest.time / mine.time
    print(
        f"  mmlens is {speedup:.1f}x faster than the faster competitor ({fastest.name}); peak extra RSS "
        f"{mine.peak:.1f} MB vs {fastest.peak:.1f} MB"
    )
    all_cells_speedup = fastest.time / all_cells.time
    if all_cells is not mine:
        print(
            f"  mmlens computing every cell (no-op cells too) is {all_cells_speedup:.1f}x faster; peak extra RSS "
            f"{all_cells.peak:.1f} MB"
        )
    return {
        "speedup": speedup,
        "all_cells_speedup": all_cells_speedup,
        "max_abs_diff": diff,
        "agree": diff <= TOLERANCE,
        "clean": mine.grid.clean,
        "corrupted": mine.grid.corrupted,
        **{f"time_{_key(i.name)}": i.time for i in impls},
        **{f"peak_mb_{_key(i.name)}": i.peak for i in impls},
        "grids": {_key(i.name): i.grid.values for i in impls},
    }


def _key(name: str) -> str:
    return "mmlens_all_cells" if "every cell" in name else name.split()[0].lower()


# -- setup helpers ----------------------------------------------------------------------------------


@contextlib.contextmanager
def offline_if_cached(name: str) -> Iterator[None]:
    """Load SmolLM2 straight from mmlens's converted copy when there is one: without network each
    load would otherwise spend ~25 s in hub retries first."""
    cached = name == "smollm2-135m-instruct" and (cache_dir() / "models" / name).is_dir()
    old = os.environ.get("HF_HUB_OFFLINE")
    if cached:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if cached:
            if old is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = old


def _load(name: str, attn: str) -> LoadedModel:
    with offline_if_cached(name):
        loaded = load_model(name)
    if attn == "eager":
        loaded.model.set_attn_implementation("eager")
    return loaded


def _warm(model: torch.nn.Module, inputs: dict) -> None:
    with torch.no_grad():
        model(**inputs)


def _environment(args: argparse.Namespace) -> None:
    import nnsight
    import transformer_lens
    import transformers

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "transformer_lens": _version(transformer_lens, "transformer-lens"),
        "nnsight": _version(nnsight, "nnsight"),
        "mmlens": mmlens.__version__,
    }
    print("environment: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(
        f"  torch threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), "
        f"CPU cores {os.cpu_count()}, load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"  attention {args.attn} for all three; mmlens batch_size {args.batch_size}; float32 on CPU")


def _version(module, dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return getattr(module, "__version__", "?")


def _layers(spec: str | None, n_layers: int) -> list[int]:
    if spec is None:
        return list(range(n_layers))
    layers = sorted({int(x) for x in spec.split(",")})
    if layers[0] < 0 or layers[-1] >= n_layers:
        raise SystemExit(f"--layers must lie in 0..{n_layers - 1}, got {layers}")
    return layers


# -- the three implementations ------------------------------------------------------------------------


def tl_grid(
    bridge,
    clean: dict,
    corrupted: dict,
    answer: int,
    wrong: int,
    layers: list[int],
    extra: dict | None = None,
    positions: list[int] | None = None,
) -> Grid:
    """TransformerLens: ``get_act_patch_resid_pre`` (or ``generic_activation_patch`` on a layer
    subset) on the bridge; with ``extra`` forward inputs (pixel values, which TL's patching
    utilities cannot pass) a ``run_with_hooks`` loop instead."""
    import transformer_lens.patching as tlp

    names = {f"blocks.{layer}.hook_resid_pre" for layer in layers}
    clean_ids, corrupt_ids = clean["input_ids"], corrupted["input_ids"]
    kw_clean = {k: v for k, v in clean.items() if k != "input_ids"} if extra is not None else {}
    kw_corrupt = {k: v for k, v in corrupted.items() if k != "input_ids"} if extra is not None else {}
    clean_logits, cache = bridge.run_with_cache(clean_ids, names_filter=lambda n: n in names, **kw_clean)
    corrupt_logits = bridge.run_with_hooks(corrupt_ids, fwd_hooks=[], **kw_corrupt)

    def metric(logits):
        return logits[0, -1, answer] - logits[0, -1, wrong]

    clean_v, corrupt_v = float(metric(clean_logits)), float(metric(corrupt_logits))
    n_pos = corrupt_ids.shape[1]
    positions = list(range(n_pos)) if positions is None else positions
    if extra is None:
        if layers == list(range(bridge.cfg.n_layers)) and len(positions) == n_pos:
            values = tlp.get_act_patch_resid_pre(bridge, corrupt_ids, cache, metric)
        else:
            index = pd.DataFrame([(layer, p) for layer in layers for p in positions], columns=["layer", "pos"])
            values = tlp.generic_activation_patch(
                bridge, corrupt_ids, cache, metric, tlp.layer_pos_patch_setter, "resid_pre", index_df=index
            ).reshape(len(layers), len(positions))
        return Grid(values.cpu().numpy(), clean_v, corrupt_v)
    values = np.zeros((len(layers), len(positions)))
    for i, layer in enumerate(layers):
        name = f"blocks.{layer}.hook_resid_pre"
        source = cache[name]
        for j, p in enumerate(positions):

            def patch(act, hook, p=p, source=source):
                act[:, p] = source[:, p]
                return act

            logits = bridge.run_with_hooks(corrupt_ids, fwd_hooks=[(name, patch)], **kw_corrupt)
            values[i, j] = float(metric(logits))
    return Grid(values, clean_v, corrupt_v)


def nnsight_grid(
    envoy,
    blocks: Callable,
    clean: dict,
    corrupted: dict,
    answer: int,
    wrong: int,
    layers: list[int],
    positions: list[int] | None = None,
) -> Grid:
    """A plain nnsight loop: one clean trace saving every block input, one corrupted baseline trace,
    then one trace per cell writing the clean value into ``blocks(envoy)[l].input[:, p]``."""
    import nnsight

    with envoy.trace(**clean):
        sources = nnsight.save([blocks(envoy)[layer].input for layer in layers])
        clean_last = nnsight.save(envoy.output.logits[0, -1])
    with envoy.trace(**corrupted):
        corrupt_last = nnsight.save(envoy.output.logits[0, -1])
    positions = list(range(corrupted["input_ids"].shape[1])) if positions is None else positions
    values = np.zeros((len(layers), len(positions)))
    for i, layer in enumerate(layers):
        source = sources[i]
        for j, p in enumerate(positions):
            with envoy.trace(**corrupted):
                blocks(envoy)[layer].input[:, p] = source[:, p]
                last = nnsight.save(envoy.output.logits[0, -1])
            values[i, j] = float(last[answer] - last[wrong])
    return Grid(
        values, float(clean_last[answer] - clean_last[wrong]), float(corrupt_last[answer] - corrupt_last[wrong])
    )


def mmlens_grid(
    hm,
    clean: dict,
    corrupted: dict,
    answer: int,
    wrong: int,
    layers: list[int],
    n_layers: int,
    batch_size: int,
    skip_unchanged: bool = True,
    replay: bool = True,
) -> Grid:
    """``mmlens.methods.patching.sweep`` over every layer (one call), or one call per layer of a subset;
    ``skip_unchanged=False`` computes the no-op cells too (positions before the first difference);
    ``replay=False`` runs one full forward per cell."""
    metric = logit_diff(answer, wrong)
    hooks = ["resid_pre"] if layers == list(range(n_layers)) else [f"lm.blocks.{layer}.resid_pre" for layer in layers]
    grids, result = [], None
    for hook in hooks:
        result = sweep(
            hm,
            clean,
            corrupted,
            metric,
            hook=hook,
            axes=("layer", "position"),
            direction="denoise",
            batch_size=batch_size,
            skip_unchanged=skip_unchanged,
            replay=replay,
            progress=False,
        )
        grids.append(result.grid())
    grid = pd.concat(grids).sort_index()
    if list(grid.index) != layers:
        raise AssertionError(f"mmlens grid has rows {list(grid.index)}, expected layers {layers}")
    return Grid(grid.to_numpy(dtype=np.float64), result.clean[0], result.corrupted[0])


@contextlib.contextmanager
def _quiet_tl_progress() -> Iterator[None]:
    """TL's patching loop draws a tqdm bar that cannot be switched off; hide it."""
    import transformer_lens.patching as tlp

    original = tlp.tqdm
    tlp.tqdm = lambda iterable, *a, **k: iterable
    try:
        yield
    finally:
        tlp.tqdm = original


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and its wall time in seconds."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _mmlens_impls(
    hm, clean: dict, corrupted: dict, answer: int, wrong: int, layers: list[int], n_layers: int, batch_size: int
) -> list[Measured]:
    """The two timed mmlens sweeps: every cell computed, then the defaults (no-op cells skipped) last."""
    return [
        Measured(
            f"mmlens sweep, every cell computed (skip_unchanged=False, batch_size {batch_size})",
            lambda: mmlens_grid(hm, clean, corrupted, answer, wrong, layers, n_layers, batch_size, False),
        ),
        Measured(
            f"mmlens sweep (defaults: batch_size {batch_size}, no-op cells skipped)",
            lambda: mmlens_grid(hm, clean, corrupted, answer, wrong, layers, n_layers, batch_size),
        ),
    ]


def _report_grids(title: str, impls: list[Measured], repeats: int) -> dict:
    """:func:`report`, then the unpatched logit differences of the last (mmlens) grid."""
    result = report(title, impls, repeats)
    g = impls[-1].grid
    print(f"  unpatched logit diff: clean {g.clean:+.3f}, corrupted {g.corrupted:+.3f}")
    return result


# -- SmolLM2 ----------------------------------------------------------------------------------------


def ioi_prompts(tokenizer, n_tokens: int) -> tuple[dict, dict, str]:
    """Clean/corrupted inputs [1, n_tokens]: a story prefix (whole words, else cut by tokens) then the
    IOI sentence; the two differ in one token (the repeated name)."""
    core = len(tokenizer(IOI_CLEAN)["input_ids"])
    if n_tokens < core:
        raise SystemExit(f"--prompt-tokens must be at least {core} (the IOI sentence alone)")
    words = (STORY + " ") * (1 + n_tokens // 40)
    words = words.split()
    prefix = None
    for w in range(len(words) + 1):
        n = len(tokenizer(" ".join(words[:w]) + (IOI_CLEAN if w else IOI_CLEAN.lstrip()))["input_ids"])
        if n == n_tokens:
            prefix = " ".join(words[:w])
            break
        if n > n_tokens:
            break
    if prefix is not None:
        texts = [(prefix + s) if prefix else s.lstrip() for s in (IOI_CLEAN, IOI_CORRUPTED)]
        ids = [tokenizer(t, return_tensors="pt")["input_ids"] for t in texts]
    else:  # no whole-word prefix gives exactly n_tokens: cut the story's tokens
        story = tokenizer(" ".join(words))["input_ids"][: n_tokens - core]
        ids = [torch.tensor([story + tokenizer(s)["input_ids"]]) for s in (IOI_CLEAN, IOI_CORRUPTED)]
    clean, corrupted = ({"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids)
    if clean["input_ids"].shape != corrupted["input_ids"].shape or clean["input_ids"].shape[1] != n_tokens:
        raise AssertionError(f"prompts tokenize to {clean['input_ids'].shape} / {corrupted['input_ids'].shape}")
    differ = int((clean["input_ids"] != corrupted["input_ids"]).sum())
    if differ != 1:
        raise AssertionError(f"clean and corrupted prompts differ in {differ} tokens, expected 1")
    return clean, corrupted, tokenizer.decode(clean["input_ids"][0])


def _single_token_ids(tokenizer) -> tuple[int, int]:
    """Token ids of ``ANSWER`` and ``WRONG``; each must be one token."""
    answer_ids = [tokenizer(s)["input_ids"] for s in (ANSWER, WRONG)]
    if any(len(ids) != 1 for ids in answer_ids):
        raise AssertionError(f"answers {ANSWER!r}/{WRONG!r} are not single tokens: {answer_ids}")
    return answer_ids[0][0], answer_ids[1][0]


def _print_smollm2_header(
    text: str, layers: list[int], n_layers: int, n_pos: int, setup_s: tuple[float, float, float, float]
) -> None:
    """The section header: grid size, prompts, setup times (loads, bridge boot, NNsight wrap, mmlens.wrap)."""
    load_s, boot_s, nnsight_s, wrap_s = setup_s
    print(
        f"\n== SmolLM2-135M-Instruct: resid_pre denoising grid, {len(layers)} layers x {n_pos} positions "
        f"= {len(layers) * n_pos} cells =="
    )
    print(f"  clean prompt: {text!r}")
    print(f"  corrupted: the second name is Mary; metric logit({ANSWER!r}) - logit({WRONG!r}) at the final position")
    print(
        f"  setup (not timed): 3 model loads {load_s:.1f} s, bridge boot {boot_s:.2f} s, NNsight wrap "
        f"{nnsight_s:.2f} s, mmlens.wrap {wrap_s:.2f} s"
    )
    if len(layers) < n_layers:
        print(
            "  layer subset: mmlens runs one sweep per layer (each repeats its baseline runs), TL "
            "generic_activation_patch with an index_df; not a speed comparison"
        )


def run_smollm2(args: argparse.Namespace) -> dict:
    from nnsight import NNsight

    from mmlens.core.backends import boot_bridge

    copies, load_s = _timed(lambda: [_load("smollm2-135m-instruct", args.attn) for _ in range(3)])
    tok = copies[0].tokenizer
    answer, wrong = _single_token_ids(tok)
    clean, corrupted, text = ioi_prompts(tok, args.prompt_tokens)
    n_layers = copies[0].model.config.num_hidden_layers
    layers = _layers(args.layers, n_layers)
    n_pos = clean["input_ids"].shape[1]

    bridge, boot_s = _timed(lambda: boot_bridge(copies[0].model, tok))
    envoy, nnsight_s = _timed(lambda: NNsight(copies[1].model))
    hm, wrap_s = _timed(lambda: mmlens.wrap(copies[2].model, tokenizer=tok))
    for loaded in copies:
        _warm(loaded.model, corrupted)
    _print_smollm2_header(text, layers, n_layers, n_pos, (load_s, boot_s, nnsight_s, wrap_s))

    impls = [
        Measured(
            f"TransformerLens {_version(None, 'transformer-lens')} bridge (get_act_patch_resid_pre)",
            lambda: tl_grid(bridge, clean, corrupted, answer, wrong, layers),
        ),
        Measured(
            f"nnsight {_version(None, 'nnsight')} (one trace per cell)",
            lambda: nnsight_grid(envoy, lambda m: m.model.layers, clean, corrupted, answer, wrong, layers),
        ),
        *_mmlens_impls(hm, clean, corrupted, answer, wrong, layers, n_layers, args.batch_size),
    ]
    with _quiet_tl_progress():
        warm_up(
            [
                lambda: tl_grid(bridge, clean, corrupted, answer, wrong, layers[-1:], positions=[0, n_pos - 1]),
                lambda: nnsight_grid(
                    envoy,
                    lambda m: m.model.layers,
                    clean,
                    corrupted,
                    answer,
                    wrong,
                    layers[-1:],
                    positions=[0, n_pos - 1],
                ),
                lambda: mmlens_grid(hm, clean, corrupted, answer, wrong, layers[-1:], n_layers, args.batch_size),
            ]
        )
        measure(impls, args.repeats)
    result = _report_grids(f"SmolLM2 results ({len(layers) * n_pos} cells):", impls, args.repeats)
    if args.profile:
        _profile(lambda: mmlens_grid(hm, clean, corrupted, answer, wrong, layers, n_layers, args.batch_size))
    return result


def _profile(fn: Callable[[], Grid]) -> None:
    profiler = cProfile.Profile()
    with torch.no_grad():
        profiler.runcall(fn)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(18)
    print("\n  cProfile of one mmlens sweep (top functions by own time):")
    print("\n".join("    " + line for line in out.getvalue().splitlines() if line.strip()))


# -- LLaVA ------------------------------------------------------------------------------------------


def _stand_in_processor(tokenizer):
    """A LlavaProcessor for booting the bridge around the tiny random LLaVA, which has no processor of
    its own (TransformerLens loads one for multimodal models). Only the boot uses it: inputs are given
    as ids and pixels, so its vocabulary need not match the model's."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )


def _llava_task(loaded: LoadedModel, image_corruption: str) -> tuple[dict, dict, int, int]:
    """Clean inputs (the example's first row), corrupted inputs (pixels replaced by zeros or seeded
    noise), the answer (clean top-1 at the final position) and the wrong token (corrupted top-1, or the
    clean top-2 when they coincide)."""
    example = loaded.example_inputs()
    clean = {k: v[:1] for k, v in example.items()}
    if image_corruption == "zeros":
        pixels = torch.zeros_like(clean["pixel_values"])
    else:
        pixels = torch.randn(clean["pixel_values"].shape, generator=torch.Generator().manual_seed(1))
    corrupted = {**clean, "pixel_values": pixels}
    with torch.no_grad():
        clean_last = loaded.model(**clean).logits[0, -1]
        corrupt_last = loaded.model(**corrupted).logits[0, -1]
    answer = int(clean_last.argmax())
    wrong = int(corrupt_last.argmax())
    if wrong == answer:
        wrong = int(clean_last.topk(2).indices[1])
    return clean, corrupted, answer, wrong


def _llava_tl(
    model: torch.nn.Module, clean: dict, corrupted: dict, answer: int, wrong: int, layers: list[int]
) -> tuple[Measured | None, str]:
    """The TransformerLens implementation (a bridge booted with a stand-in processor), or None when it
    cannot boot; and the note saying which."""
    from mmlens.core.backends import boot_bridge

    try:
        from transformers import AutoTokenizer

        folder = cache_dir() / "models" / "smollm2-135m-instruct"
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False) if folder.is_dir() else None
        if tok is None:
            raise RuntimeError("no tokenizer to build a stand-in processor from (SmolLM2's converted copy is missing)")
        bridge = boot_bridge(model, processor=_stand_in_processor(tok))
        impl = Measured(
            f"TransformerLens {_version(None, 'transformer-lens')} bridge (run_with_hooks loop)",
            lambda: tl_grid(bridge, clean, corrupted, answer, wrong, layers, extra={}),
        )
        return impl, (
            "  TransformerLens: bridge booted with a stand-in LlavaProcessor (SmolLM2 tokenizer + <image>); "
            "get_act_patch_resid_pre cannot pass pixel_values, so a run_with_hooks loop is used"
        )
    except Exception as err:  # noqa: BLE001 - any boot failure means: compare without TL
        return None, (
            f"  TransformerLens could not boot a bridge for LLaVA ({type(err).__name__}: {err}); "
            "comparing with nnsight only"
        )


def run_llava(args: argparse.Namespace) -> dict:
    from nnsight import NNsight

    copies = [_load("tiny-random-llava", args.attn) for _ in range(3)]
    clean, corrupted, answer, wrong = _llava_task(copies[2], args.image_corruption)
    n_layers = copies[2].model.config.get_text_config().num_hidden_layers
    layers = list(range(n_layers))
    n_pos = clean["input_ids"].shape[1]
    n_image = int((clean["input_ids"] == copies[2].model.config.image_token_id).sum())

    print(
        f"\n== tiny random LLaVA: LM resid_pre denoising grid, {n_layers} layers x {n_pos} positions "
        f"({n_image} image tokens) = {n_layers * n_pos} cells =="
    )
    print(
        f"  corrupted: pixel_values replaced by {'a zero image' if args.image_corruption == 'zeros' else 'noise'}; "
        f"metric logit[{answer}] - logit[{wrong}] (clean vs corrupted top tokens) at the final position"
    )
    tl, tl_note = _llava_tl(copies[0].model, clean, corrupted, answer, wrong, layers)
    print(tl_note)
    envoy = NNsight(copies[1].model)
    hm = mmlens.wrap(copies[2].model)
    for loaded in copies:
        _warm(loaded.model, corrupted)
    impls = [
        *([tl] if tl is not None else []),
        Measured(
            f"nnsight {_version(None, 'nnsight')} (one trace per cell)",
            lambda: nnsight_grid(
                envoy, lambda m: m.model.language_model.layers, clean, corrupted, answer, wrong, layers
            ),
        ),
        *_mmlens_impls(hm, clean, corrupted, answer, wrong, layers, n_layers, args.batch_size),
    ]
    with _quiet_tl_progress():
        warm_up([impl.run for impl in impls])
        measure(impls, args.llava_repeats)
    result = _report_grids(f"LLaVA results ({n_layers * n_pos} cells):", impls, args.llava_repeats)
    result["tl_booted"] = tl is not None
    return result


# -- a VLM with bidirectional image attention (the replay fallback) --------------------------------

BIDIRECTIONAL = ("tiny-random-paligemma", "tiny-random-gemma3")
"""Registry VLMs whose image tokens attend to each other both ways, in order of preference."""


def _bidirectional_model(attn: str) -> tuple[mmlens.HookedModel, LoadedModel, str]:
    """The first registered model of :data:`BIDIRECTIONAL` wrapped, else a stand-in: the tiny LLaVA
    wrapped with its adapter's ``causal=False`` (the same fallback path, on a model that is in fact
    causal); and a line saying which."""
    present = [name for name in BIDIRECTIONAL if name in registry_names()]
    loaded = _load(present[0] if present else "tiny-random-llava", attn)
    hm = mmlens.wrap(loaded.model, tokenizer=loaded.tokenizer, processor=loaded.processor)
    if present:
        return hm, loaded, f"  model: {present[0]} (adapter causal={hm.adapter.causal})"
    stand_in = mmlens.HookedModel(loaded.model, adapter=dataclasses.replace(hm.adapter, causal=False))
    return (
        stand_in,
        loaded,
        (
            f"  model: stand-in, tiny-random-llava wrapped with causal=False (none of {list(BIDIRECTIONAL)} is "
            "registered): keys and values cannot be reused, so replay re-runs every position"
        ),
    )


def _bidirectional_task(hm: mmlens.HookedModel, loaded: LoadedModel) -> tuple[dict, dict, int, int]:
    """Clean inputs (the example's first row), corrupted (the adapter's neutral image), the answer
    (clean top-1 at the readout position) and the wrong token (corrupted top-1, else clean top-2)."""
    clean = hm.rows(loaded.example_inputs(), 0)
    corrupted = hm.neutral(clean, "image")
    with torch.no_grad():
        clean_last = hm.readout_logits(hm.run(clean).logits, clean)[0]
        corrupt_last = hm.readout_logits(hm.run(corrupted).logits, corrupted)[0]
    answer, wrong = int(clean_last.argmax()), int(corrupt_last.argmax())
    if wrong == answer:
        wrong = int(clean_last.topk(2).indices[1])
    return clean, corrupted, answer, wrong


def run_bidirectional(args: argparse.Namespace) -> dict:
    """The LM resid_pre grid of a VLM with bidirectional image attention: mmlens's replay (without
    key/value reuse) against one full forward per cell."""
    hm, loaded, note = _bidirectional_model(args.attn)
    clean, corrupted, answer, wrong = _bidirectional_task(hm, loaded)
    n_layers = len(hm.names("lm.blocks.*.resid_pre"))
    layers = list(range(n_layers))
    n_pos = hm.spans(clean).seq_len
    metric = logit_diff(answer, wrong)
    method = sweep(hm, clean, corrupted, metric, hook="lm.blocks.0.resid_pre", progress=False).method
    print(f"\n== VLM with bidirectional image attention: LM resid_pre grid, {n_layers} x {n_pos} cells ==")
    print(f"{note}\n  mmlens sweep method: {method!r}; corrupted: the adapter's neutral image")
    _warm(loaded.model, corrupted)
    impls = [
        Measured(
            "full forwards (sweep replay=False, one forward per cell)",
            lambda: mmlens_grid(hm, clean, corrupted, answer, wrong, layers, n_layers, args.batch_size, False, False),
        ),
        *_mmlens_impls(hm, clean, corrupted, answer, wrong, layers, n_layers, args.batch_size),
    ]
    warm_up([impl.run for impl in impls])
    measure(impls, args.llava_repeats)
    result = _report_grids(f"Bidirectional VLM results ({n_layers * n_pos} cells):", impls, args.llava_repeats)
    result["method"] = method
    return result


# -- main -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=40, help="SmolLM2 prompt length (>= 14)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per implementation, SmolLM2")
    parser.add_argument("--llava-repeats", type=int, default=5, help="timed runs per implementation, LLaVA")
    parser.add_argument("--batch-size", type=int, default=8, help="mmlens sweep batch_size")
    parser.add_argument("--layers", default=None, help="SmolLM2 layer subset, e.g. 0,15,29 (default: all 30)")
    parser.add_argument(
        "--attn",
        choices=["eager", "sdpa"],
        default="eager",
        help="attention of the nnsight and mmlens copies (the bridge always uses eager)",
    )
    parser.add_argument("--image-corruption", choices=["zeros", "noise"], default="zeros")
    parser.add_argument("--sections", default="smollm2,llava,bidir", help="comma-separated: smollm2, llava, bidir")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="cProfile one extra mmlens sweep (SmolLM2)")
    parser.add_argument(
        "--quick", action="store_true", help="seconds, for tests: 14-token prompt, layers 0,20, one LLaVA repeat"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.prompt_tokens = min(args.prompt_tokens, 14)
        args.layers = args.layers or "0,20"
        args.llava_repeats = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if not sections <= {"smollm2", "llava", "bidir"}:
        raise SystemExit(f"unknown --sections {sorted(sections - {'smollm2', 'llava', 'bidir'})}")

    start = time.perf_counter()
    _environment(args)
    results: dict = {}
    if "smollm2" in sections:
        results["smollm2"] = run_smollm2(args)
        _release_memory()  # the section's three models are gone once it returns
    if "llava" in sections:
        results["llava"] = run_llava(args)
    if "bidir" in sections:
        results["bidir"] = run_bidirectional(args)
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")
    if "bidir" in results:
        r = results["bidir"]
        print(f"bidir_speedup={r['speedup']:.2f} bidir_method={r['method']} bidir_max_abs_diff={r['max_abs_diff']:.2e}")
    if "llava" in results:
        r = results["llava"]
        print(
            f"llava_speedup={r['speedup']:.2f} llava_all_cells_speedup={r['all_cells_speedup']:.2f} "
            f"llava_max_abs_diff={r['max_abs_diff']:.2e}"
        )
    if "smollm2" in results:
        r = results["smollm2"]
        results.update(speedup=r["speedup"], max_abs_diff=r["max_abs_diff"])
        print(f"all_cells_speedup={r['all_cells_speedup']:.2f}")
        print(f"speedup={r['speedup']:.2f} max_abs_diff={r['max_abs_diff']:.2e}")
    results["agree"] = all(r["agree"] for r in results.values() if isinstance(r, dict) and "agree" in r)
    return results


if __name__ == "__main__":
    raise SystemExit(0 if main()["agree"] else 1)
