"""mmlens.training.loop: the one fit loop (schedule, seeded order, stop rule, checkpoint/resume) and
the artefact-store cache of trained weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmlens.training.loop import Checkpoint, RowOrder, fit, is_cached, train_or_load, warmup_cosine

X = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
Y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.1


def _run(
    steps: int, checkpoint=None, net: nn.Linear | None = None, crash: int | None = None, **options
) -> tuple[nn.Linear, list[float]]:
    torch.manual_seed(0)
    net = net or nn.Linear(3, 1)
    order = RowOrder(len(X), 8, torch.Generator().manual_seed(1))

    def step(rows, index):
        if index == crash:
            raise KeyboardInterrupt
        noise = torch.randn(len(rows)) * 0.01  # draws from the global RNG: must be checkpointed
        return ((net(X[rows]).squeeze(1) + noise - Y[rows]) ** 2).mean()

    saved = None if checkpoint is None else Checkpoint(checkpoint, {"net": net}, identity={"lr": 0.05}, every=2)
    result = fit(
        step,
        net.parameters(),
        steps=steps,
        lr=0.05,
        optimizer="adamw",
        schedule="warmup_cosine",
        clip=1.0,
        order=order,
        checkpoint=saved,
        **options,
    )
    return net, result.history["loss"]


def test_schedule_and_row_order():
    assert warmup_cosine(0, 100) == pytest.approx(0.2 * 1.0) and warmup_cosine(100, 100) == 0.0
    assert warmup_cosine(4, 100) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 4 / 100)).item()))
    order = RowOrder(10, 4, torch.Generator().manual_seed(0))
    first = torch.cat([order.next() for _ in range(5)])  # two epochs of 10 rows
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    draws = RowOrder(10, 4, torch.Generator().manual_seed(0), replacement=True).next()
    assert draws.shape == (4,) and draws.max() < 10


def test_resumed_fit_equals_uninterrupted_and_leaves_the_rng_alone(tmp_path):
    rng = torch.get_rng_state()
    straight, losses = _run(9)
    torch.set_rng_state(rng)
    assert torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(KeyboardInterrupt):
        _run(9, tmp_path / "ckpt.pt", crash=5)  # checkpoints after steps 2 and 4
    resumed, resumed_losses = _run(9, tmp_path / "ckpt.pt")
    assert resumed_losses == losses and len(losses) == 9
    assert torch.equal(resumed.weight, straight.weight) and torch.equal(resumed.bias, straight.bias)
    with pytest.raises(ValueError, match="delete it or pass another checkpoint"):
        net = nn.Linear(3, 1)
        fit(
            lambda rows, i: net(X).sum(),
            net.parameters(),
            steps=9,
            lr=0.1,
            checkpoint=Checkpoint(tmp_path / "ckpt.pt", {"net": net}, identity={"lr": 0.1}),
        )


def test_stop_rule_and_history():
    _, losses = _run(200, target_loss=1.0, window=3)
    assert len(losses) < 200 and sum(losses[-3:]) / 3 < 1.0


def test_train_or_load_trains_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MMLENS_CACHE", str(tmp_path))
    net = nn.Linear(3, 1)
    assert not is_cached("toy", {"a": 1})
    first = train_or_load("toy", {"a": 1}, net, lambda: {"trained": True, "w": float(net.weight.detach().sum())})
    assert not first.from_cache and first.path.is_file() and is_cached("toy", {"a": 1})
    again = nn.Linear(3, 1)
    hit = train_or_load("toy", {"a": 1}, again, lambda: pytest.fail("a cache hit must not train"))
    assert hit.from_cache and hit.meta["trained"] and torch.equal(again.weight, net.weight)
    assert not train_or_load("toy", {"a": 2}, nn.Linear(3, 1), dict, cache=False).path
