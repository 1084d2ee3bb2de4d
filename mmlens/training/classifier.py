"""Small classifiers trained on the synthetic tasks: the one trained-model record and the one
train-or-load path shared by :mod:`mmlens.training.fusion` (image + text) and
:mod:`mmlens.training.graph_text` (graph + text).

Training: AdamW on batches in a seeded order (:class:`~mmlens.training.loop.RowOrder`, reshuffled
each epoch), warm-up + cosine schedule, gradients clipped at norm 1, stopping when the mean loss of
the last 20 batches is below the target (:func:`~mmlens.training.loop.fit`). Weights are cached in
the artefact store (:func:`~mmlens.training.loop.train_or_load`) under the hash of the full
configuration.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmlens.core.adapter import Adapter
from mmlens.data.tasks import SyntheticTask
from mmlens.training.loop import RowOrder, fit, train_or_load

LEARNED_THRESHOLD = 0.9
"""Test accuracy below which a model counts as not learned."""


@dataclass
class TrainedModel:
    """A classifier trained on a synthetic task.

    Attributes:
        model: in eval mode, on the CPU, float32.
        task: the held-out test examples (inputs, labels, ground truth).
        accuracy: fraction of ``task`` classified correctly.
        learned: ``accuracy >= threshold``; a benchmark should skip models that did not learn.
        neutral_accuracy: test accuracy with one modality replaced by the adapter's neutral
            reference, per modality: what the model itself depends on (near chance: it needs it).
        train_seconds: wall-clock seconds of the training run (the original run on a cache hit).
        steps_run: optimisation steps taken (fewer than ``max_steps`` when the loss target was met).
        config: everything the cache key hashes (task, sizes, seed, optimisation, ``model``: the
            model config's fields, ``code_version``).
        cache_path: the ``.safetensors`` file of the weights, ``manifest.json`` beside it (None
            when not cached).
        from_cache: whether the weights were loaded rather than trained.
    """

    model: nn.Module
    task: SyntheticTask
    accuracy: float
    learned: bool
    neutral_accuracy: dict[str, float]
    train_seconds: float
    steps_run: int
    config: dict[str, Any]
    cache_path: Path | None
    from_cache: bool

    def batch(self, index: Iterable[int] | slice | Tensor | None = None) -> dict[str, Tensor]:
        """Model inputs of test rows ``index`` (all when None)."""
        return self.task.batch(index)


@torch.no_grad()
def accuracy(
    net: nn.Module, task: SyntheticTask, adapter: Adapter, neutral: str | None = None, batch_size: int = 500
) -> float:
    """Fraction of ``task``'s examples that ``net`` classifies correctly; with ``neutral`` (a
    modality) that modality replaced by ``adapter``'s neutral reference."""
    net.eval()
    correct = 0
    for start in range(0, len(task), batch_size):
        batch = task.batch(slice(start, start + batch_size))
        if neutral is not None:
            batch = adapter.neutral[neutral](net, batch, None)
        correct += int((net(**batch).logits.argmax(-1) == task.labels[start : start + batch_size]).sum())
    return correct / len(task)


def _dropped(
    net: nn.Module, inputs: dict[str, Tensor], n: int, adapter: Adapter, p: float, generator: torch.Generator
) -> dict[str, Tensor]:
    """Per row of the ``n``, with probability ``p`` one of the adapter's two modalities (evenly) at
    its neutral reference."""
    dropped = torch.rand(n, generator=generator) < p
    first = torch.rand(n, generator=generator) < 0.5
    out = dict(inputs)
    for modality, rows in zip(adapter.neutral, (dropped & first, dropped & ~first)):
        for key, value in adapter.neutral[modality](net, inputs, None).items():
            if value is not inputs[key]:
                out[key] = torch.where(rows.view(-1, *[1] * (value.ndim - 1)), value, inputs[key])
    return out


@dataclass(frozen=True)
class FitSettings:
    """What identifies a classifier's training run besides its task and model config: data sizes,
    seed (data, initialisation and batch order) and the AdamW settings of :func:`train_classifier`."""

    n_train: int
    n_test: int
    seed: int
    max_steps: int
    target_loss: float
    batch_size: int
    lr: float
    weight_decay: float


def build_and_train(
    kind: str,
    make_net: Callable[[Any], nn.Module],
    net_config: Any,
    tasks: tuple[SyntheticTask, SyntheticTask],
    identity: Mapping[str, Any],
    adapter: Adapter,
    *,
    threshold: float = LEARNED_THRESHOLD,
    cache: bool = True,
) -> TrainedModel:
    """``make_net(net_config)`` initialised under ``identity["seed"]``, then :func:`train_classifier` on
    ``tasks`` (train, test) with ``identity`` plus the model config (a dataclass) as the cache identity."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(identity["seed"])
        net = make_net(net_config)
    config = {**identity, "model": asdict(net_config)}
    return train_classifier(kind, net, *tasks, config, adapter, threshold=threshold, cache=cache)


def train_classifier(
    kind: str,
    net: nn.Module,
    train_task: SyntheticTask,
    test_task: SyntheticTask,
    config: Mapping[str, Any],
    adapter: Adapter,
    *,
    threshold: float = LEARNED_THRESHOLD,
    cache: bool = True,
) -> TrainedModel:
    """Train ``net`` on ``train_task`` under ``config`` (keys ``seed``, ``max_steps``, ``target_loss``,
    ``batch_size``, ``lr``, ``weight_decay``, optional ``modality_dropout``: the probability that a
    training row has one modality at its neutral reference), or load it from the artefact store
    folder ``<kind>/<task name>-<hash of config>``; evaluate it on ``test_task``."""

    def train() -> dict[str, Any]:
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(config["seed"])
        p = config.get("modality_dropout", 0.0)

        def step(rows: Tensor, index: int) -> Tensor:
            inputs = train_task.batch(rows)
            if p:
                inputs = _dropped(net, inputs, len(rows), adapter, p, generator)
            return F.cross_entropy(net(**inputs).logits, train_task.labels[rows])

        net.train()
        result = fit(
            step,
            net.parameters(),
            steps=config["max_steps"],
            lr=config["lr"],
            optimizer="adamw",
            weight_decay=config["weight_decay"],
            schedule="warmup_cosine",
            clip=1.0,
            target_loss=config["target_loss"],
            order=RowOrder(len(train_task), config["batch_size"], generator),
        )
        return {
            "config": config,
            "train_seconds": time.perf_counter() - start,
            "steps_run": result.steps,
            "accuracy": accuracy(net, test_task, adapter),
            "neutral_accuracy": {m: accuracy(net, test_task, adapter, m) for m in adapter.neutral},
        }

    cached = train_or_load(kind, config, net, train, name=train_task.name, cache=cache)
    meta = cached.meta
    net.eval()
    return TrainedModel(
        net,
        test_task,
        meta["accuracy"],
        meta["accuracy"] >= threshold,
        meta["neutral_accuracy"],
        meta["train_seconds"],
        meta["steps_run"],
        dict(config),
        cached.path,
        cached.from_cache,
    )


__all__ = ["LEARNED_THRESHOLD", "FitSettings", "TrainedModel", "accuracy", "build_and_train", "train_classifier"]
