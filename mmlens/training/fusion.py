"""Train mmlens's :class:`~mmlens.models.FusionTransformer` on a synthetic task, in process on the CPU,
cached by configuration.

>>> trained = train_fusion("synergistic")   # 2-10 s on one CPU thread the first time, then from the cache
>>> trained.accuracy, trained.learned       # held-out accuracy; False below the threshold: skip the model
>>> hm = mmlens.wrap(trained.model)
>>> mmlens.explain(hm, trained.batch([0]), "integrated_gradients")

The training set is ``make_task(task, n_train, 2 * seed)``, the test set ``make_task(task, n_test,
2 * seed + 1)``. Weights are a function of the configuration (and of torch's CPU kernels: the same
torch build and thread count give identical weights). Cache: ``<cache>/<task>-<key>.safetensors``
with a JSON sidecar, ``<cache>`` = ``$MMLENS_CACHE/synthetic`` (default ``~/.cache/mmlens/synthetic``),
``<key>`` a hash of everything in :attr:`TrainedModel.config`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from mmlens.models import FusionConfig, FusionTransformer
from mmlens.data.paths import cache_dir

from mmlens.data.tasks import IMAGE_SIZE, PATCH_SIZE, TaskData, make_task

CODE_VERSION = 1
"""Part of the cache key: raise it when the tasks or the training change what a configuration yields."""
MODEL_DEFAULTS: dict[str, Any] = dict(d_model=64, n_heads=4, d_mlp=128, n_image_layers=1, n_text_layers=1,
                                      n_joint_layers=2)
"""FusionConfig sizes used unless overridden (the rest follow the task)."""
LEARNED_THRESHOLD = 0.9
"""Test accuracy below which a model counts as not learned."""


@dataclass
class TrainedModel:
    """A FusionTransformer trained on a synthetic task.

    Attributes:
        model: in eval mode, on the CPU, float32.
        task: the held-out test examples (inputs, labels, ground truth).
        accuracy: fraction of ``task`` classified correctly.
        learned: ``accuracy >= threshold``; a benchmark should skip models that did not learn.
        neutral_accuracy: test accuracy with one modality replaced by its neutral reference (the
            adapter's: an all-zero image, every token id 0), per modality: what the model itself
            depends on (near chance: it needs that modality).
        train_seconds: wall-clock seconds of the training run (the original run on a cache hit).
        steps_run: optimisation steps taken (fewer than ``max_steps`` when the loss target was met).
        config: everything the cache key hashes (task, sizes, seed, optimisation, ``model``: the
            FusionConfig fields, ``code_version``).
        cache_path: the ``.safetensors`` file of the weights (None when not cached).
        from_cache: whether the weights were loaded rather than trained.
    """

    model: FusionTransformer
    task: TaskData
    accuracy: float
    learned: bool
    neutral_accuracy: dict[str, float]
    train_seconds: float
    steps_run: int
    config: dict[str, Any]
    cache_path: Path | None
    from_cache: bool

    def batch(self, index: Iterable[int] | slice | Tensor | None = None) -> dict[str, Tensor]:
        """Inputs ``{"pixel_values", "input_ids", "attention_mask"}`` of test rows ``index`` (all when None)."""
        return self.task.batch(index)


def train_fusion(task_name: str, *, n_train: int = 10_000, n_test: int = 1_000, seed: int = 0, max_steps: int = 600,
                 target_loss: float = 0.01, batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 0.01,
                 model: Mapping[str, Any] | None = None, modality_dropout: float | None = None,
                 threshold: float = LEARNED_THRESHOLD, cache: bool = True) -> TrainedModel:
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
    fusion_config = FusionConfig(**{
        "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "vocab_size": len(train_task.vocab),
        "max_text_len": train_task.input_ids.shape[1], "n_classes": train_task.n_classes,
        **MODEL_DEFAULTS, **(model or {}),
    })
    config = {"task": task_name, "n_train": n_train, "n_test": n_test, "seed": seed, "max_steps": max_steps,
              "target_loss": target_loss, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
              "modality_dropout": modality_dropout, "model": asdict(fusion_config), "code_version": CODE_VERSION}
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "synthetic" / f"{task_name}-{key}.safetensors" if cache else None
    sidecar = path.with_suffix(".json") if path else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FusionTransformer(fusion_config)
    if path and path.is_file() and sidecar.is_file():
        net.load_state_dict(load_file(path))
        meta, from_cache = json.loads(sidecar.read_text()), True
    else:
        start = time.perf_counter()
        steps_run = _train(net, train_task, seed, max_steps, target_loss, batch_size, lr, weight_decay, modality_dropout)
        meta = {"config": config, "train_seconds": time.perf_counter() - start, "steps_run": steps_run,
                "accuracy": accuracy(net, test_task),
                "neutral_accuracy": {m: accuracy(net, test_task, neutral=m) for m in ("image", "text")}}
        from_cache = False
        if path:
            _save(net, meta, path, sidecar)
    net.eval()
    return TrainedModel(net, test_task, meta["accuracy"], meta["accuracy"] >= threshold, meta["neutral_accuracy"],
                        meta["train_seconds"], meta["steps_run"], config, path, from_cache)


def _train(net: FusionTransformer, task: TaskData, seed: int, max_steps: int, target_loss: float, batch_size: int,
           lr: float, weight_decay: float, modality_dropout: float = 0.0) -> int:
    """Fit ``net`` to ``task``, batches in an order drawn from ``seed``; returns the steps taken.
    ``modality_dropout``: per example, the probability of one modality (chosen evenly) being neutral."""
    order = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, max_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / max_steps)))
    net.train()
    batches = torch.empty(0, dtype=torch.long)
    losses: list[float] = []
    for step in range(1, max_steps + 1):
        if len(batches) < batch_size:
            batches = torch.cat([batches, torch.randperm(len(task), generator=order)])
        rows, batches = batches[:batch_size], batches[batch_size:]
        inputs = task.batch(rows)
        if modality_dropout:
            dropped = torch.rand(len(rows), generator=order) < modality_dropout
            image = torch.rand(len(rows), generator=order) < 0.5
            inputs["pixel_values"] = torch.where((dropped & image)[:, None, None, None], 0.0, inputs["pixel_values"])
            inputs["input_ids"] = torch.where((dropped & ~image)[:, None], 0, inputs["input_ids"])
        loss = F.cross_entropy(net(**inputs).logits, task.labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if len(losses) >= 20 and sum(losses[-20:]) / 20 < target_loss:
            break
    return step


@torch.no_grad()
def accuracy(net: FusionTransformer, task: TaskData, neutral: str | None = None, batch_size: int = 500) -> float:
    """Fraction of ``task``'s examples that ``net`` classifies correctly; with ``neutral`` ("image" or
    "text") that modality replaced by the neutral reference (all-zero image; token ids 0, mask kept)."""
    net.eval()
    correct = 0
    for start in range(0, len(task), batch_size):
        batch = task.batch(slice(start, start + batch_size))
        if neutral is not None:
            key = {"image": "pixel_values", "text": "input_ids"}[neutral]
            batch[key] = torch.zeros_like(batch[key])
        correct += int((net(**batch).logits.argmax(-1) == task.labels[start:start + batch_size]).sum())
    return correct / len(task)


def _save(net: FusionTransformer, meta: dict, path: Path, sidecar: Path) -> None:
    """Weights, then the sidecar, each written to a temporary file and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, write in ((path, lambda f: save_file(net.state_dict(), f)),
                          (sidecar, lambda f: Path(f).write_text(json.dumps(meta, indent=1) + "\n"))):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{target.name}-")
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


__all__ = ["CODE_VERSION", "LEARNED_THRESHOLD", "MODEL_DEFAULTS", "TrainedModel", "accuracy", "train_fusion"]
