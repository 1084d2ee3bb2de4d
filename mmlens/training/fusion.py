"""Train mmlens's :class:`~mmlens.models.FusionTransformer` on a synthetic task, in process on the CPU,
cached by configuration.

>>> trained = train_fusion("synergistic")   # 2-10 s on one CPU thread the first time, then from the cache
>>> trained.accuracy, trained.learned       # held-out accuracy; False below the threshold: skip the model
>>> hm = mmlens.wrap(trained.model)
>>> mmlens.explain(hm, trained.batch([0]), "integrated_gradients")

The training set is ``make_task(task, n_train, 2 * seed)``, the test set ``make_task(task, n_test,
2 * seed + 1)``. Weights are a function of the configuration (and of torch's CPU kernels: the same
torch build and thread count give identical weights). Cache: the artefact store's folder
``$MMLENS_CACHE/fusion/<task>-<key>/`` (default ``~/.cache/mmlens``), ``<key>`` the
:func:`~mmlens.store.config_hash` of :attr:`TrainedModel.config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from mmlens.data.tasks import IMAGE_SIZE, PATCH_SIZE, make_task
from mmlens.hooks.fusion_transformer import FUSION_TRANSFORMER
from mmlens.models import FusionConfig, FusionTransformer
from mmlens.training.classifier import LEARNED_THRESHOLD, FitSettings, TrainedModel, build_and_train

CODE_VERSION = 1
"""Part of the cache key: raise it when the tasks or the training change what a configuration yields."""
MODEL_DEFAULTS: dict[str, Any] = {
    "d_model": 64,
    "n_heads": 4,
    "d_mlp": 128,
    "n_image_layers": 1,
    "n_text_layers": 1,
    "n_joint_layers": 2,
}
"""FusionConfig sizes used unless overridden (the rest follow the task)."""


def train_fusion(
    task_name: str,
    *,
    n_train: int = 10_000,
    n_test: int = 1_000,
    seed: int = 0,
    max_steps: int = 600,
    target_loss: float = 0.01,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 0.01,
    model: Mapping[str, Any] | None = None,
    modality_dropout: float | None = None,
    threshold: float = LEARNED_THRESHOLD,
    cache: bool = True,
) -> TrainedModel:
    """Train (or load from the cache) a FusionTransformer on ``task_name`` (a key of ``TASKS``).

    Args:
        n_train, n_test: examples in the training and test sets.
        seed: seeds the data (see the module docstring), the initialisation and the batch order.
        max_steps, target_loss, batch_size, lr, weight_decay: AdamW on batches of ``batch_size``
            (reshuffled each epoch) until the mean loss of the last 20 batches is below
            ``target_loss`` (nats) or ``max_steps`` steps; ``lr`` with a linear warm-up over the
            first 5% of ``max_steps`` and a cosine decay to 0 at ``max_steps``; gradients clipped at
            norm 1. The defaults learn every task in 50-250 steps (XOR: 120-210 over 14 seeds).
        model: FusionConfig fields overriding :data:`MODEL_DEFAULTS` (vocab_size, max_text_len,
            n_classes, image_size and patch_size follow the task unless given).
        modality_dropout: the probability that a training example has one modality (image or text,
            equally likely) at its neutral reference. Default: 0.5 for the redundant task, so that the
            model can answer from either modality alone, as the task states; otherwise 0. Without
            it, a model picks one of the two redundant paths and ignores the other.
        threshold: the test accuracy below which ``learned`` is False (not part of the cache key).
        cache: read and write the cache.
    """
    train_task = make_task(task_name, n_train, 2 * seed)
    test_task = make_task(task_name, n_test, 2 * seed + 1)
    if modality_dropout is None:
        modality_dropout = 0.5 if train_task.kind == "redundant" else 0.0
    fusion_config = FusionConfig(
        **{
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "vocab_size": len(train_task.vocab),
            "max_text_len": train_task.input_ids.shape[1],
            "n_classes": train_task.n_classes,
            **MODEL_DEFAULTS,
            **(model or {}),
        }
    )
    settings = FitSettings(n_train, n_test, seed, max_steps, target_loss, batch_size, lr, weight_decay)
    identity = {
        "task": task_name,
        **asdict(settings),
        "modality_dropout": modality_dropout,
        "code_version": CODE_VERSION,
    }
    return build_and_train(
        "fusion",
        FusionTransformer,
        fusion_config,
        (train_task, test_task),
        identity,
        FUSION_TRANSFORMER,
        threshold=threshold,
        cache=cache,
    )


__all__ = ["CODE_VERSION", "LEARNED_THRESHOLD", "MODEL_DEFAULTS", "TrainedModel", "train_fusion"]
