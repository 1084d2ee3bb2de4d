"""Train mmlens's :class:`~mmlens.models.graph_text.GraphTextFusion` on a synthetic graph + text task,
in process on the CPU, cached by configuration.

>>> trained = train_graph_text("graph_text_synergy")   # a few s on one CPU thread, then from the cache
>>> trained.accuracy, trained.learned
>>> hm = mmlens.wrap(trained.model)
>>> mmlens.explain(hm, trained.batch([0]), "integrated_gradients")

The training set is ``make_graph_task(task, n_train, 2 * seed)``, the test set
``make_graph_task(task, n_test, 2 * seed + 1)``: two independent graphs (same community feature
means), so test accuracy measures generalisation to unseen graphs and nodes. Weights are a function
of the configuration (and of torch's CPU kernels: the same torch build and thread count give
identical weights). Cache: as :mod:`mmlens.training.fusion`,
``$MMLENS_CACHE/synthetic/<task>-<key>.safetensors`` with a JSON sidecar.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from mmlens.hooks.graph_text import GRAPH_TEXT
from mmlens.models.graph_text import GraphTextConfig, GraphTextFusion
from mmlens.data.paths import cache_dir

from mmlens.data.graph_tasks import FEATURE_DIM, GraphTaskData, make_graph_task
from mmlens.training.fusion import LEARNED_THRESHOLD, _save, _train

CODE_VERSION = 1
"""Part of the cache key: raise it when the tasks or the training change what a configuration yields."""
MODEL_DEFAULTS: dict[str, Any] = dict(gnn_dim=64, n_gnn_layers=2, n_graph_tokens=2, d_model=64, n_heads=4, d_mlp=128,
                                      n_layers=2)
"""GraphTextConfig sizes used unless overridden (the rest follow the task)."""
MODALITIES = ("graph", "text")


@dataclass
class TrainedGraphModel:
    """A GraphTextFusion trained on a synthetic graph + text task.

    Attributes:
        model: in eval mode, on the CPU, float32.
        task: the held-out test examples (their own graph, inputs, labels, ground truth).
        accuracy: fraction of ``task`` classified correctly.
        learned: ``accuracy >= threshold``; a benchmark should skip models that did not learn.
        neutral_accuracy: test accuracy with one modality replaced by the adapter's neutral reference
            (zero node features; every token id 0), per modality (near chance: the model needs it).
        train_seconds: wall-clock seconds of the training run (the original run on a cache hit).
        steps_run: optimisation steps taken (fewer than ``max_steps`` when the loss target was met).
        config: everything the cache key hashes (task, sizes, seed, optimisation, ``model``: the
            GraphTextConfig fields, ``code_version``).
        cache_path: the ``.safetensors`` file of the weights (None when not cached).
        from_cache: whether the weights were loaded rather than trained.
    """

    model: GraphTextFusion
    task: GraphTaskData
    accuracy: float
    learned: bool
    neutral_accuracy: dict[str, float]
    train_seconds: float
    steps_run: int
    config: dict[str, Any]
    cache_path: Path | None
    from_cache: bool

    def batch(self, index: Iterable[int] | slice | Tensor | None = None) -> dict[str, Tensor]:
        """Inputs of test rows ``index`` (all when None), the test graph included."""
        return self.task.batch(index)


def train_graph_text(task_name: str, *, n_train: int = 4_000, n_test: int = 1_000, seed: int = 0, max_steps: int = 600,
                     target_loss: float = 0.02, batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 0.01,
                     model: Mapping[str, Any] | None = None, threshold: float = LEARNED_THRESHOLD,
                     cache: bool = True) -> TrainedGraphModel:
    """Train (or load from the cache) a GraphTextFusion on ``task_name`` (a key of ``GRAPH_TASKS``).

    Args:
        n_train, n_test: examples in the training and test sets (each set on its own graph).
        seed: seeds the data (see the module docstring), the initialisation and the batch order.
        max_steps, target_loss, batch_size, lr, weight_decay: as
            :func:`mmlens.training.fusion.train_fusion` (AdamW, warm-up + cosine, clipping at norm 1, stop
            when the mean loss of the last 20 batches is below ``target_loss`` nats); every step
            runs the GNN over the whole training graph.
        model: GraphTextConfig fields overriding :data:`MODEL_DEFAULTS` (node_dim, vocab_size,
            max_text_len and n_classes follow the task unless given).
        threshold: the test accuracy below which ``learned`` is False (not part of the cache key).
        cache: read and write the cache.
    """
    train_task = make_graph_task(task_name, n_train, 2 * seed)
    test_task = make_graph_task(task_name, n_test, 2 * seed + 1)
    net_config = GraphTextConfig(**{
        "node_dim": FEATURE_DIM, "vocab_size": len(train_task.vocab), "max_text_len": train_task.input_ids.shape[1],
        "n_classes": train_task.n_classes, **MODEL_DEFAULTS, **(model or {}),
    })
    config = {"task": task_name, "n_train": n_train, "n_test": n_test, "seed": seed, "max_steps": max_steps,
              "target_loss": target_loss, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
              "model": asdict(net_config), "code_version": CODE_VERSION}
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "synthetic" / f"{task_name}-{key}.safetensors" if cache else None
    sidecar = path.with_suffix(".json") if path else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = GraphTextFusion(net_config)
    if path and path.is_file() and sidecar.is_file():
        net.load_state_dict(load_file(path))
        meta, from_cache = json.loads(sidecar.read_text()), True
    else:
        start = time.perf_counter()
        steps_run = _train(net, train_task, seed, max_steps, target_loss, batch_size, lr, weight_decay)
        meta = {"config": config, "train_seconds": time.perf_counter() - start, "steps_run": steps_run,
                "accuracy": accuracy(net, test_task),
                "neutral_accuracy": {m: accuracy(net, test_task, neutral=m) for m in MODALITIES}}
        from_cache = False
        if path:
            _save(net, meta, path, sidecar)
    net.eval()
    return TrainedGraphModel(net, test_task, meta["accuracy"], meta["accuracy"] >= threshold,
                             meta["neutral_accuracy"], meta["train_seconds"], meta["steps_run"], config, path,
                             from_cache)


@torch.no_grad()
def accuracy(net: GraphTextFusion, task: GraphTaskData, neutral: str | None = None, batch_size: int = 500) -> float:
    """Fraction of ``task``'s examples that ``net`` classifies correctly; with ``neutral`` ("graph" or
    "text") that modality replaced by the adapter's neutral reference."""
    net.eval()
    correct = 0
    for start in range(0, len(task), batch_size):
        batch = task.batch(slice(start, start + batch_size))
        if neutral is not None:
            batch = GRAPH_TEXT.neutral[neutral](net, batch, None)
        correct += int((net(**batch).logits.argmax(-1) == task.labels[start:start + batch_size]).sum())
    return correct / len(task)


__all__ = ["CODE_VERSION", "MODEL_DEFAULTS", "TrainedGraphModel", "accuracy", "train_graph_text"]
