"""Synthetic image + text tasks: determinism, ground-truth properties, and the trained, cached FusionTransformer."""

from __future__ import annotations

import pytest
import torch

import mmlens
from mmlens.data.tasks import COLORS, TASK_KINDS, TASKS, TEXT_LEN, VOCAB, WORD_ID, bayes_accuracy, make_task
from mmlens.models.fusion import Attention
from mmlens.training.fusion import train_fusion


@pytest.fixture(scope="module")
def tasks():
    return {name: make_task(name, 4000, seed=0) for name in TASKS}


def test_generators_are_deterministic():
    for name in TASKS:
        a, b, c = make_task(name, 50, seed=3), make_task(name, 50, seed=3), make_task(name, 50, seed=4)
        for key in ("pixel_values", "input_ids", "attention_mask", "labels", "image_key", "text_key"):
            assert torch.equal(getattr(a, key), getattr(b, key)), (name, key)
        assert not torch.equal(a.pixel_values, c.pixel_values)


def test_shapes_dtypes_and_metadata(tasks):
    for name, task in tasks.items():
        n = len(task)
        assert task.name == name and task.kind in TASK_KINDS and task.depends_on <= {"image", "text"}
        assert task.pixel_values.shape == (n, 3, 16, 16) and task.pixel_values.dtype == torch.float32
        assert 0 <= task.pixel_values.min() and task.pixel_values.max() <= 1
        assert task.input_ids.shape == task.attention_mask.shape == task.text_key.shape == (n, TEXT_LEN)
        assert task.input_ids.dtype == task.labels.dtype == torch.long
        assert task.image_key.shape == (n, 16) and task.image_key.dtype == torch.bool
        assert task.vocab == VOCAB and task.vocab[0] == "<pad>" and int(task.input_ids.max()) < len(VOCAB)
        assert torch.equal(task.input_ids == 0, task.attention_mask == 0)  # padding is id 0, at the end
        assert torch.equal(task.attention_mask, task.attention_mask.sort(1, descending=True).values)
        assert (task.attention_mask.sum(1) >= 4).all() and (task.attention_mask.sum(1) < TEXT_LEN).any()
        assert set(task.labels.unique().tolist()) == set(range(task.n_classes))
        batch = task.batch(range(3))
        assert set(batch) == {"pixel_values", "input_ids", "attention_mask"} and batch["input_ids"].shape[0] == 3
        assert torch.equal(task.subset([5, 1]).labels, task.labels[[5, 1]])


def test_ground_truth_per_task(tasks):
    chance = {name: float(t.labels.bincount().max()) / len(t) for name, t in tasks.items()}
    image_only, text_only, shortcut, redundant, xor = (tasks[k] for k in TASKS)
    assert bayes_accuracy(image_only, "image") == 1.0 and bayes_accuracy(image_only, "text") == chance["image_only"]
    color_ids = torch.tensor([WORD_ID[c] for c in COLORS])
    assert not image_only.text_key.any() and not torch.isin(image_only.input_ids, color_ids).any()
    assert bayes_accuracy(text_only, "text") == 1.0 and bayes_accuracy(text_only, "image") == chance["text_only"]
    assert bayes_accuracy(shortcut, "text") == 1.0 and bayes_accuracy(shortcut, "image") < chance["shortcut"] + 0.05
    assert torch.equal(redundant.image_attrs["color"], redundant.labels)
    assert torch.equal(redundant.text_attrs["color"], redundant.labels)
    # XOR: each modality alone is at chance, both together determine the label
    assert abs(bayes_accuracy(xor, "image") - 0.5) < 0.03 and abs(bayes_accuracy(xor, "text") - 0.5) < 0.03
    assert torch.equal(xor.labels, (xor.image_attrs["color"] == xor.text_attrs["color"]).long())


def test_text_only_images_carry_no_label_information(tasks):
    task = tasks["text_only"]
    assert (task.image_attrs["shape"] == -1).all() and not task.image_key.any()
    overall = task.pixel_values.mean(0)
    for c in range(task.n_classes):
        assert (task.pixel_values[task.labels == c].mean(0) - overall).abs().max() < 0.02


def test_key_positions(tasks):
    for name in ("text_only", "shortcut", "redundant", "synergistic"):
        task = tasks[name]
        assert (task.text_key.sum(1) == 1).all()
        words = task.input_ids[task.text_key]
        assert torch.equal(words, torch.tensor([WORD_ID[c] for c in COLORS])[task.text_attrs["color"]])
    shaped = tasks["image_only"]
    assert (shaped.image_key.sum(1) >= 2).all()  # a shape of size >= 6 px touches 2+ patches


def test_unknown_task_name_suggests():
    with pytest.raises(ValueError, match=r"did you mean \['synergistic'"):
        make_task("synergistc", 10)


def test_attention_weights_match_sdpa():
    torch.manual_seed(0)
    attn = Attention(d_model=16, n_heads=4).eval()
    x, mask = torch.randn(2, 5, 16), torch.tensor([[True] * 5, [True, True, True, False, False]])
    attn.return_weights = True
    out, weights = attn(x, mask)
    attn.return_weights = False
    torch.testing.assert_close(out, attn(x, mask))
    assert weights.shape == (2, 4, 5, 5) and (weights[1, ..., 3:] == 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 5))


def test_train_cache_determinism_and_explainers(tmp_path, monkeypatch):
    monkeypatch.setenv("MMLENS_CACHE", str(tmp_path))
    kwargs = {"n_train": 2000, "n_test": 300, "seed": 1}
    first = train_fusion("text_only", **kwargs)
    assert not first.from_cache and first.learned and first.accuracy >= 0.95
    assert first.cache_path.is_file() and (first.cache_path.parent / "manifest.json").is_file()
    assert first.neutral_accuracy["image"] >= 0.95 and first.neutral_accuracy["text"] < 0.5
    again = train_fusion("text_only", **kwargs)
    assert again.from_cache and again.accuracy == first.accuracy and not again.model.training
    retrained = train_fusion("text_only", cache=False, **kwargs)
    for trained in (again, retrained):
        for (name, a), b in zip(first.model.state_dict().items(), trained.model.state_dict().values()):
            assert torch.equal(a, b), name
    assert train_fusion("text_only", **kwargs, threshold=1.01).learned is False

    hooked = mmlens.wrap(first.model)
    row = first.batch([0])
    for method in ("occlusion", "integrated_gradients", "gradient_x_input", "attention", "attention_rollout"):
        explanation = mmlens.explain(hooked, row, method, **({"steps": 8} if method == "integrated_gradients" else {}))
        assert explanation.scores.shape == (1, 16 + TEXT_LEN)
        assert torch.isfinite(explanation.importance()["text"]).all(), method
    assert not any(m.return_weights for m in first.model.modules() if isinstance(m, Attention))
    assert float(mmlens.explain(hooked, row, "occlusion").importance()["text"][0]) > 0.5
