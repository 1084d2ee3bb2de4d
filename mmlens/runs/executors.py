"""Where the chunks of a run are computed: in this process, or on a Ray cluster.

A run (``mmlens patch``, ``mmlens evaluate``) splits its work into chunks with stable keys and adds each finished chunk
to its resumable :class:`mmlens.runs.record.Record`. An executor only decides where
``compute(prepared, chunk)`` runs:

- :class:`SerialExecutor`: one after another in this process (the default).
- :class:`RayExecutor`: on Ray (``pip install 'mmlens[ray]'``), either a local cluster started for
  the run or an existing one (``address="ray://head:10001"`` or ``"auto"``). Each worker is an actor
  that rebuilds the run once (loads one model, from the same config and seed) and then computes
  the chunks it is sent; results come back to this process, which records them as they finish, so
  an interrupted distributed run resumes like a serial one and gives the same numbers.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from mmlens.runs.record import Record

Compute = Callable[[Any, Any], dict[str, Any]]
"""``(prepared, chunk) -> record entry``; a module-level function, so workers can import it."""


class Executor(Protocol):
    """Computes chunks; yields each chunk's record entry as it finishes (in any order)."""

    def describe(self) -> str: ...

    def map(self, prepared: Any, chunks: Sequence[Any], compute: Compute) -> Iterator[dict[str, Any]]: ...


class SerialExecutor:
    """Every chunk in this process, in order."""

    def describe(self) -> str:
        return "serial"

    def map(self, prepared: Any, chunks: Sequence[Any], compute: Compute) -> Iterator[dict[str, Any]]:
        for chunk in chunks:
            yield compute(prepared, chunk)


class RayExecutor:
    """Chunks as tasks on Ray actors, one model per actor.

    Args:
        rebuild: ``() -> prepared`` run once in each worker (picklable: a module-level function or a
            ``functools.partial`` of one, e.g. loading the model from the run's config).
        address: an existing cluster (``"auto"``, ``"ray://host:10001"``); ``None`` starts a local one
            for the run and stops it afterwards.
        workers: number of actors (default: the cluster's CPU count, at most the number of chunks).
        cpus_per_worker / gpus_per_worker: Ray resources each actor reserves (one GPU per worker on
            a multi-GPU node puts one model on each GPU).
    """

    def __init__(
        self,
        rebuild: Callable[[], Any],
        *,
        address: str | None = None,
        workers: int | None = None,
        cpus_per_worker: float = 1,
        gpus_per_worker: float = 0,
    ):
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.rebuild, self.address, self.workers = rebuild, address, workers
        self.resources = {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker}

    def describe(self) -> str:
        where = self.address or "local cluster"
        return f"ray, {self.workers or 'auto'} workers, {where}"

    def map(self, prepared: Any, chunks: Sequence[Any], compute: Compute) -> Iterator[dict[str, Any]]:
        if not chunks:
            return
        ray = _import_ray()
        started = not ray.is_initialized()
        if started:
            _start(ray, self.address, self.workers)
        try:
            n = min(len(chunks), self.workers or int(ray.cluster_resources().get("CPU", 1)))
            worker = ray.remote(**self.resources)(_ChunkWorker)
            threads = torch.get_num_threads()  # the driver's: the same float reduction order, the same numbers
            actors = [worker.remote(self.rebuild, compute, threads) for _ in range(n)]
            pool = ray.util.ActorPool(actors)
            yield from pool.map_unordered(lambda actor, chunk: actor.compute.remote(chunk), list(chunks))
        finally:
            if started:
                ray.shutdown()


class _ChunkWorker:
    """A Ray actor: rebuilds the run once, then computes chunks."""

    def __init__(self, rebuild: Callable[[], Any], compute: Compute, threads: int):
        torch.set_num_threads(threads)  # Ray starts workers with one thread; kernels then sum in another order
        self.prepared, self.compute_chunk = rebuild(), compute

    def compute(self, chunk: Any) -> dict[str, Any]:
        return self.compute_chunk(self.prepared, chunk)


def _import_ray() -> Any:
    try:
        import ray
        import ray.util
    except ImportError:
        raise ImportError(
            "the ray executor needs Ray: pip install 'mmlens[ray]' (or pip install ray), or use the serial executor"
        ) from None
    return ray


def _start(ray: Any, address: str | None, workers: int | None) -> None:
    """Connect to ``address``, or start a local cluster with ``workers`` CPUs (default: all)."""
    if address is not None:
        ray.init(address=address, log_to_driver=False)
        return
    ray.init(
        num_cpus=workers or os.cpu_count() or 1,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith(("MMLENS_", "HF_"))}},
    )


def compute_missing(
    executor: Executor,
    prepared: Any,
    chunks: Sequence[Any],
    compute: Compute,
    record: Record,
    *,
    desc: str,
    unit: str,
    progress: bool,
) -> list[dict[str, Any]]:
    """Compute on ``executor`` every chunk (each with a ``key``) that ``record`` lacks, adding each
    entry to the record as it finishes; a progress bar counts the chunks already recorded as done.
    Returns the new entries, in the order they finished."""
    todo = [c for c in chunks if record.get(c.key) is None]
    bar = tqdm(
        total=len(chunks),
        initial=len(chunks) - len(todo),
        desc=f"{desc} ({executor.describe()})",
        unit=unit,
        disable=not progress,
        file=sys.stderr,
    )
    done = []
    try:
        for entry in executor.map(prepared, todo, compute):
            record.add(entry)
            done.append(entry)
            bar.set_postfix_str(entry["key"])
            bar.update(1)
    finally:
        bar.close()
    return done
