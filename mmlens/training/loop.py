"""The one training loop and the one cache of trained weights, used by every trainer in mmlens.

:func:`fit` owns the optimiser (Adam or AdamW), the one learning-rate schedule
(:func:`warmup_cosine`, or constant), gradient clipping, the stop rule (mean loss of the last
``window`` steps below a target), the seeded data order (:class:`RowOrder`), checkpoint/resume
(:class:`Checkpoint`: a resumed run ends exactly as an uninterrupted one on a CPU) and the tqdm
progress bar. A trainer supplies only ``step(rows, index) -> loss``.

:func:`train_or_load` keeps trained weights in the :class:`~mmlens.store.ArtefactStore` under
``$MMLENS_CACHE`` (default ``~/.cache/mmlens``): ``<cache>/<kind>/<name>-<hash>/weights.safetensors``
plus the store's ``manifest.json``, the hash being :func:`~mmlens.store.config_hash` of the identity
the trainer passes (its configuration and code version).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from mmlens.data.paths import cache_dir
from mmlens.store import ArtefactStore, atomic_path, canonical

WEIGHTS = "weights.safetensors"
"""File name of the weights in an artefact folder."""
Loss = Tensor | Mapping[str, Tensor]
"""What a step returns: the scalar loss, or named scalars of which ``"loss"`` is optimised."""


def warmup_cosine(step: int, steps: int) -> float:
    """The one schedule: learning-rate factor at 0-based ``step`` of ``steps``, a linear warm-up over
    the first 5% of the steps (at least one) times a cosine decay from 1 at step 0 to 0 at ``steps``."""
    warmup = max(1, steps // 20)
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


class RowOrder:
    """Seeded batches of ``batch_size`` row indices into ``range(n)``: consecutive slices of a stream
    of permutations (every row once per epoch), or with ``replacement`` uniform draws.

    ``generator`` may be shared with the step (e.g. for input dropout): draws stay in call order.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, replacement: bool = False):
        self.n, self.batch_size, self.generator, self.replacement = n, batch_size, generator, replacement
        self.pending = torch.empty(0, dtype=torch.long)

    def next(self) -> Tensor:
        """Long[batch_size]: the rows of the next batch."""
        if self.replacement:
            return torch.randint(self.n, (self.batch_size,), generator=self.generator)
        while len(self.pending) < self.batch_size:
            self.pending = torch.cat([self.pending, torch.randperm(self.n, generator=self.generator)])
        rows, self.pending = self.pending[: self.batch_size], self.pending[self.batch_size :]
        return rows

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state(), "pending": self.pending}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self.pending = state["pending"]


class StratifiedRowOrder(RowOrder):
    """Seeded batches drawn with replacement, ``batch_size // n_groups`` rows from every group of
    ``groups`` Long[n] (the remainder from the first groups): each step sees every group equally,
    however unequal their sizes (e.g. 5 graph positions per prompt against 30 text positions)."""

    def __init__(self, groups: Tensor, batch_size: int, generator: torch.Generator):
        super().__init__(len(groups), batch_size, generator, replacement=True)
        self.members = [(groups == g).nonzero().flatten() for g in groups.unique().tolist()]
        if batch_size < len(self.members):
            raise ValueError(f"batch_size={batch_size} is smaller than the {len(self.members)} groups; raise it")

    def next(self) -> Tensor:
        counts = [self.batch_size // len(self.members)] * len(self.members)
        for i in range(self.batch_size - sum(counts)):
            counts[i] += 1
        return torch.cat(
            [rows[torch.randint(len(rows), (c,), generator=self.generator)] for rows, c in zip(self.members, counts)]
        )


@dataclass
class Checkpoint:
    """Where and what :func:`fit` checkpoints: the state dicts of ``modules``, the optimiser, the
    schedule, the row order, the CPU RNG state, the step and the history, written atomically every
    ``every`` steps and at the end. If ``path`` exists, training resumes from it; a checkpoint whose
    ``identity`` (what must not change across a resumption, e.g. the configuration less the step
    count) differs is refused. The warm-up + cosine schedule spans the run's ``steps``: resuming
    with another step count is exact only with a constant learning rate."""

    path: str | Path
    modules: Mapping[str, nn.Module]
    identity: Any = None
    every: int = 10

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"checkpoint_every must be at least 1, got {self.every}")


@dataclass
class Fit:
    """What :func:`fit` did: ``steps`` taken (all, resumed ones included) and per-step ``history``
    of every value the step returned (``"loss"`` first; nats unless the step says otherwise)."""

    steps: int
    history: dict[str, list[float]] = field(default_factory=dict)


def fit(
    step: Callable[[Tensor | None, int], Loss],
    parameters: Iterable[nn.Parameter],
    *,
    steps: int,
    lr: float,
    optimizer: Literal["adam", "adamw"] = "adam",
    weight_decay: float = 0.0,
    schedule: Literal["constant", "warmup_cosine"] = "constant",
    clip: float | None = None,
    target_loss: float | None = None,
    window: int = 20,
    order: RowOrder | None = None,
    checkpoint: Checkpoint | None = None,
    progress: bool = False,
    desc: str = "train",
) -> Fit:
    """Minimise ``step(rows, index)`` for ``steps`` steps: ``rows`` = ``order.next()`` (None without
    an order), ``index`` the 0-based step number (e.g. to seed per-step augmentations).

    Args:
        parameters: what the optimiser updates (Adam, or AdamW with decoupled ``weight_decay``).
        schedule: ``"warmup_cosine"`` (:func:`warmup_cosine`) or a constant ``lr``.
        clip: gradient-norm clipping threshold (none when None).
        target_loss: stop once the mean ``"loss"`` of the last ``window`` steps is below it (nats).
        checkpoint: see :class:`Checkpoint`.
        progress: show a tqdm bar named ``desc`` with the current loss.

    Runs with gradients enabled and leaves the caller's CPU RNG state as it was (the step may draw
    from it: dropout; the draws are checkpointed). Module train/eval modes are the caller's.
    """
    params = list(parameters)
    opt_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    opt = opt_class(params, lr=lr, weight_decay=weight_decay)
    factor = (lambda s: warmup_cosine(s, steps)) if schedule == "warmup_cosine" else (lambda s: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    state = {"optimizer": opt, "schedule": sched, **({"order": order} if order is not None else {})}
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        done, history = _resume(checkpoint, state, steps) if checkpoint is not None else (0, {})
        end = done if _stopped(history.get("loss", []), target_loss, window) else steps  # a resumed stopped run
        bar = tqdm(range(done, end), total=steps, initial=done, desc=desc, disable=not progress)
        for index in bar:
            values = step(order.next() if order is not None else None, index)
            values = {"loss": values} if isinstance(values, Tensor) else dict(values)
            opt.zero_grad(set_to_none=True)
            values["loss"].backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            sched.step()
            for key, value in values.items():
                history.setdefault(key, []).append(value.item())
            bar.set_postfix(loss=f"{history['loss'][-1]:.4f}", refresh=False)
            done += 1
            stop = _stopped(history["loss"], target_loss, window)
            if checkpoint is not None and (done % checkpoint.every == 0 or done == steps or stop):
                _save(checkpoint, state, done, history)
            if stop:
                break
        bar.close()
    return Fit(done, history)


def _stopped(losses: list[float], target_loss: float | None, window: int) -> bool:
    """The stop rule: the mean of the last ``window`` losses is below ``target_loss``."""
    return target_loss is not None and len(losses) >= window and sum(losses[-window:]) / window < target_loss


def _save(checkpoint: Checkpoint, state: Mapping[str, Any], done: int, history: dict[str, list[float]]) -> None:
    blob = {
        "modules": {k: m.state_dict() for k, m in checkpoint.modules.items()},
        **{k: v.state_dict() for k, v in state.items()},
        "rng_state": torch.get_rng_state(),
        "step": done,
        "history": history,
        "identity": canonical(checkpoint.identity),
    }
    with atomic_path(checkpoint.path) as tmp:
        torch.save(blob, tmp)


def _resume(checkpoint: Checkpoint, state: Mapping[str, Any], steps: int) -> tuple[int, dict[str, list[float]]]:
    """Load ``checkpoint.path`` into the modules and ``state`` when it exists: (steps done, history)."""
    path = Path(checkpoint.path)
    if not path.exists():
        return 0, {}
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob["identity"] != canonical(checkpoint.identity):
        raise ValueError(
            f"checkpoint {path} was trained with {blob['identity']}, not "
            f"{canonical(checkpoint.identity)}; delete it or pass another checkpoint path"
        )
    if blob["step"] > steps:
        raise ValueError(
            f"checkpoint {path} has {blob['step']} steps, more than the {steps} asked for; "
            "raise the step count or use another checkpoint path"
        )
    for key, module in checkpoint.modules.items():
        module.load_state_dict(blob["modules"][key])
    for key, value in state.items():
        value.load_state_dict(blob[key])
    torch.set_rng_state(blob["rng_state"])
    return blob["step"], blob["history"]


@dataclass
class Cached:
    """Where :func:`train_or_load` found or put the weights: the train function's metadata (as the
    manifest recorded it on a hit), the weights file (None when not cached), whether it was a hit."""

    meta: dict[str, Any]
    path: Path | None
    from_cache: bool


def is_cached(kind: str, identity: Any, name: str = "") -> bool:
    """Whether :func:`train_or_load` with these arguments would load rather than train."""
    store = ArtefactStore(cache_dir())
    folder = store.folder(kind, identity, name)
    return store.complete(folder) and (folder / WEIGHTS).is_file()


def train_or_load(
    kind: str,
    identity: Any,
    module: nn.Module,
    train: Callable[[], Mapping[str, Any]],
    *,
    name: str = "",
    parts: tuple[str, ...] | None = None,
    cache: bool = True,
) -> Cached:
    """Load ``module``'s weights from the artefact store, or run ``train()`` (which trains ``module``
    in place and returns JSON metadata) and store them.

    Args:
        kind, name: the store's folder ``<cache>/<kind>/<name>-<hash>``.
        identity: what identifies the trained weights (configuration, code version, digests of
            frozen weights); hashed by :func:`~mmlens.store.config_hash`.
        parts: state-dict key prefixes of the trained tensors, when only those are stored (the
            rest, e.g. a frozen pretrained LM, is rebuilt by the caller); all tensors when None.
        cache: read and write the store; False trains and stores nothing.
    """
    if not cache:
        return Cached(dict(train()), None, False)
    store = ArtefactStore(cache_dir())
    folder = store.folder(kind, identity, name)
    path = folder / WEIGHTS
    state = {k: v for k, v in module.state_dict().items() if parts is None or k.startswith(parts)}
    if store.complete(folder) and path.is_file():
        weights = load_file(path)
        if set(weights) != set(state):
            raise ValueError(f"{path} does not hold this model's trained tensors; delete {folder} to retrain")
        module.load_state_dict(weights, strict=parts is None)
        return Cached(store.manifest(folder), path, True)
    meta = dict(train())
    state = {k: v.contiguous() for k, v in module.state_dict().items() if parts is None or k.startswith(parts)}
    with atomic_path(path) as tmp:
        save_file(state, tmp)
    store.finish(folder, meta)
    return Cached(canonical(meta), path, False)


__all__ = [
    "WEIGHTS",
    "Cached",
    "Checkpoint",
    "Fit",
    "Loss",
    "RowOrder",
    "StratifiedRowOrder",
    "fit",
    "is_cached",
    "train_or_load",
    "warmup_cosine",
]
