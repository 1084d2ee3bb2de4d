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
identical weights). Cache: as :mod:`mmlens.training.fusion`, the artefact store's folder
``$MMLENS_CACHE/graph_text/<task>-<key>/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from mmlens.data.graph_tasks import FEATURE_DIM, make_graph_task
from mmlens.hooks.graph_text import GRAPH_TEXT
from mmlens.models.graph_text import GraphTextConfig, GraphTextFusion
from mmlens.training.classifier import LEARNED_THRESHOLD, FitSettings, TrainedModel, build_and_train

CODE_VERSION = 1
"""Part of the cache key: raise it when the tasks or the training change what a configuration yields."""
MODEL_DEFAULTS: dict[str, Any] = {
    "gnn_dim": 64,
    "n_gnn_layers": 2,
    "n_graph_tokens": 2,
    "d_model": 64,
    "n_heads": 4,
    "d_mlp": 128,
    "n_layers": 2,
}
"""GraphTextConfig sizes used unless overridden (the rest follow the task)."""


def train_graph_text(
    task_name: str,
    *,
    n_train: int = 4_000,
    n_test: int = 1_000,
    seed: int = 0,
    max_steps: int = 600,
    target_loss: float = 0.02,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 0.01,
    model: Mapping[str, Any] | None = None,
    threshold: float = LEARNED_THRESHOLD,
    cache: bool = True,
) -> TrainedModel:
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
    net_config = GraphTextConfig(
        **{
            "node_dim": FEATURE_DIM,
            "vocab_size": len(train_task.vocab),
            "max_text_len": train_task.input_ids.shape[1],
            "n_classes": train_task.n_classes,
            **MODEL_DEFAULTS,
            **(model or {}),
        }
    )
    settings = FitSettings(n_train, n_test, seed, max_steps, target_loss, batch_size, lr, weight_decay)
    identity = {"task": task_name, **asdict(settings), "code_version": CODE_VERSION}
    return build_and_train(
        "graph_text",
        GraphTextFusion,
        net_config,
        (train_task, test_task),
        identity,
        GRAPH_TEXT,
        threshold=threshold,
        cache=cache,
    )


__all__ = ["CODE_VERSION", "MODEL_DEFAULTS", "train_graph_text"]
