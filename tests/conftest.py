"""Shared fixtures: tiny models from the registry and the shared data/models folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
_SHARED = Path(__file__).resolve().parents[2] / "shared"
os.environ.setdefault("MMLENS_DATA", str(_SHARED / "data"))
os.environ.setdefault("MMLENS_MODELS", str(_SHARED / "models"))

import mmlens  # noqa: E402
from mmlens.data.loading import load_model  # noqa: E402


@pytest.fixture(scope="session")
def models_dir() -> Path:
    path = Path(os.environ["MMLENS_MODELS"])
    assert path.is_dir(), f"shared models folder missing at {path}: set MMLENS_MODELS"
    return path


@pytest.fixture(scope="session")
def loaded():
    """load_model with a per-session memo, so each registry model is built once."""
    memo: dict[str, object] = {}

    def get(name: str):
        if name not in memo:
            memo[name] = load_model(name)
        return memo[name]

    return get


@pytest.fixture(scope="session")
def tinystories(loaded):
    """The real TinyStories-656K LM (Llama, 2 layers, d=128, 8 heads) wrapped, with a text batch."""
    lm = loaded("tinystories-656k")
    return mmlens.HookedModel(lm.model, tokenizer=lm.tokenizer), text_batch(lm.model.config.vocab_size)


@pytest.fixture(scope="session")
def llava(loaded):
    """Tiny random LLaVA wrapped, with its example batch."""
    lm = loaded("tiny-random-llava")
    return mmlens.HookedModel(lm.model), lm.example_inputs()


def text_batch(vocab: int, batch: int = 2, seq: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
