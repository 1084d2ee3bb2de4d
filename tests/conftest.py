"""Shared fixtures: tiny models from the registry and the data/models folders (the bundled copies
unless MMLENS_DATA / MMLENS_MODELS override them)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mmlens  # noqa: E402
from mmlens.data.loading import load_model  # noqa: E402
from mmlens.data.paths import data_dir as resolve_data_dir  # noqa: E402
from mmlens.data.paths import models_dir as resolve_models_dir  # noqa: E402


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return resolve_models_dir()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return resolve_data_dir()


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
