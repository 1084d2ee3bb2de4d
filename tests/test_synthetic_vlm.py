"""mmlens.training.vlm: LLaVA around the real TinyStories-656K, its vision side trained in-process.

The module's model is trained once here with small settings (~20 s on one thread) in a temporary
cache; the default settings (~45 s) reach colour 1.0 / shape 0.976 held-out.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import mmlens
from mmlens.data.loading import load_model
from mmlens.methods.patching import logit_diff
from mmlens.training import vlm
from mmlens.training.vlm import (
    BACKGROUND,
    COLORS,
    IMAGE_TOKEN_ID,
    QUESTIONS,
    SHAPES,
    Scenes,
    make_scenes,
    render_scene,
    train_vlm,
)

QUICK = {"n_train": 2000, "n_test": 200, "seed": 0, "vision_steps": 300, "steps": 80}
PATCH = 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMLENS_CACHE", str(tmp_path_factory.mktemp("mmlens-cache")))
        yield train_vlm(**QUICK)


@pytest.fixture(scope="module")
def hooked(trained):
    return mmlens.wrap(trained.model, tokenizer=trained.tokenizer, processor=trained.processor)


def shape_patches(scenes: Scenes) -> torch.Tensor:
    """Bool[n, 16]: the 8x8 patches (row-major) that the shape covers."""
    on = np.abs(scenes.pixels - np.array(BACKGROUND)[:, None, None]).max(1) > 0.3  # [n, 32, 32]
    n = len(scenes)
    return torch.from_numpy(on.reshape(n, 4, PATCH, 4, PATCH).any(axis=(2, 4)).reshape(n, 16))


def recolored(scenes: Scenes, row: int) -> tuple[Scenes, Scenes]:
    """Scene ``row`` alone, and the same scene (shape, place, size) in another colour."""
    clean = scenes[[row]]
    other = next(c for c in COLORS if c != clean.colors[0])
    pixels = render_scene(other, clean.shapes[0], tuple(clean.centers[0]), float(clean.radii[0]))
    return clean, Scenes(pixels[None], [other], clean.shapes, clean.centers, clean.radii)


def test_the_frozen_lm_learns_to_answer_from_the_image(trained, models_dir):
    assert trained.accuracy["color"] >= 0.9  # chance 0.25
    assert trained.accuracy["shape"] >= 0.5  # chance 0.33; the default settings reach 0.976
    assert trained.learned == (min(trained.accuracy.values()) >= vlm.LEARNED_THRESHOLD)
    assert trained.train_seconds > 0 and not trained.model.training
    lm = load_file(models_dir / "tinystories-656k" / "model.safetensors")
    state = trained.model.model.language_model.state_dict()
    assert all(torch.equal(state[k.removeprefix("model.")], v.float()) for k, v in lm.items() if k.startswith("model."))
    answers = [trained.processor.answer_id(w, "color") for w in COLORS] + [
        trained.processor.answer_id(w, "shape") for w in SHAPES
    ]
    assert len(set(answers)) == len(answers)
    assert trained.tokenizer.convert_ids_to_tokens(answers[:4]) == ["red▁", "green▁", "blue▁", "yellow▁"]


def test_a_cache_hit_loads_identical_weights_without_training(trained, monkeypatch):
    assert trained.path.exists() and (trained.path.parent / "manifest.json").exists()
    monkeypatch.setattr(vlm, "fit", lambda *a, **k: pytest.fail("a cache hit must not train"))
    again = train_vlm(**QUICK)
    assert again.path == trained.path
    assert again.accuracy == trained.accuracy and again.train_seconds == trained.train_seconds
    assert again.learned == trained.learned
    first, second = trained.model.state_dict(), again.model.state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_the_same_seed_gives_identical_weights_and_leaves_the_global_rng_alone():
    tiny = {"n_train": 64, "n_test": 8, "vision_steps": 3, "steps": 2, "cache": False}
    state = torch.random.get_rng_state()
    a, b, c = (train_vlm(seed=s, **tiny).model.state_dict() for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)
    trained_keys = [k for k in a if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))]
    assert all(torch.equal(a[k], b[k]) for k in trained_keys)
    assert not all(torch.equal(a[k], c[k]) for k in trained_keys)


def test_the_processor_lays_out_image_and_question(trained, hooked):
    processor = trained.processor
    scenes = make_scenes(3, seed=7)
    inputs = processor.questions(scenes, ["color", "shape", "color"])
    ids = inputs["input_ids"]
    assert ids.shape == (3, 29) and inputs["pixel_values"].shape == (3, 3, 32, 32)
    assert (ids[:, 1:17] == IMAGE_TOKEN_ID).all() and not (ids[:, 17:] == IMAGE_TOKEN_ID).any()
    assert bool(inputs["attention_mask"].all())
    uint8 = [(p.transpose(1, 2, 0) * 255).astype(np.uint8) for p in scenes.pixels]
    via_pil = hooked.to_inputs(["<image>" + QUESTIONS["color"]] * 3, images=[Image.fromarray(a) for a in uint8])
    assert torch.equal(via_pil["input_ids"], processor.questions(scenes, "color")["input_ids"])
    assert torch.allclose(via_pil["pixel_values"], inputs["pixel_values"], atol=2 / 255)
    with pytest.raises(ValueError, match="placeholders"):
        processor("<image> <image> hi", images=scenes.pixels[:1])
    with pytest.raises(ValueError, match="reserved"):
        processor("a | b")


def test_wrap_finds_the_llava_adapter_spans_and_runs_exactly(trained, hooked):
    inputs = trained.processor.questions(make_scenes(2, seed=3), ["color", "shape"])
    assert hooked.adapter.name == "llava"
    spans = hooked.spans(inputs)
    image = torch.zeros(2, 29, dtype=torch.bool)
    image[:, 1:17] = True
    assert torch.equal(spans.masks["image"], image) and torch.equal(spans.masks["text"], ~image)
    with torch.no_grad():
        assert torch.equal(hooked.run(inputs).logits, trained.model(**inputs).logits)


def test_logit_lens_reads_the_answer_at_the_last_position(trained, hooked):
    scenes = trained.test_scenes()[:16]
    inputs = trained.processor.questions(scenes, "color")
    answers = trained.processor.answer_ids(scenes, "color")
    lens = mmlens.logit_lens(hooked, inputs, k=1, targets=[trained.processor.answer_id(c) for c in COLORS])
    assert lens.layers == ["embed", "0", "1"]
    with torch.no_grad():
        predicted = trained.model(**inputs).logits[:, -1].argmax(-1)
    assert torch.equal(lens.top_ids[-1, :, -1, 0], predicted)
    assert (predicted == answers).float().mean() >= 0.9
    truth = torch.tensor([list(COLORS).index(c) for c in scenes.colors])
    p_answer = lens.target_probs[:, torch.arange(16), -1, truth]  # [layer, b]
    assert p_answer[0].max() < 0.01 and p_answer[-1].mean() > 0.5


def test_patching_finds_the_colour_in_the_shapes_patches_then_at_the_last_position(trained, hooked):
    """Colour question, clean scene vs the same scene recoloured; denoising the residual stream."""
    scenes, on_shape = trained.test_scenes()[:8], []
    for row in range(8):
        clean, corrupt = recolored(scenes, row)
        answer, wrong = (trained.processor.answer_id(c) for c in (clean.colors[0], corrupt.colors[0]))
        pair = [trained.processor.questions(s, "color") for s in (clean, corrupt)]
        metric = logit_diff(answer, wrong)
        if row < 4:
            spans = mmlens.sweep(hooked, *pair, metric, axes=("layer", "span"), progress=False)
            assert spans.clean[0] > 0 > spans.corrupted[0]
            grid = spans.grid(value="normalized")
            assert grid.loc[0, "image"] > 0.9 and grid.loc[0, "text"] == 0  # block 0's input: all in the image
            assert grid.loc[1, "text"] > 0.5 > grid.loc[1, "image"]  # block 1's input: mostly moved to the text
        positions = mmlens.sweep(hooked, *pair, metric, layers=[0], progress=False).grid()
        on_shape.append(bool(shape_patches(clean)[0, int(positions.loc[0].iloc[1:17].to_numpy().argmax())]))
    assert sum(on_shape) >= 6  # the best single image position is on the shape (chance ~3 of 8)


def test_occlusion_scores_every_position_of_both_modalities(trained, hooked):
    inputs = trained.processor.questions(trained.test_scenes()[:2], "color")
    explanation = mmlens.explain(hooked, inputs, "occlusion")
    assert torch.isfinite(explanation.scores).all()
    importance = explanation.importance()
    assert set(importance) == {"image", "text"} and (importance["image"] > 0.05).all()
    assert torch.allclose(importance["image"] + importance["text"], torch.ones(2))


def test_the_registry_entry_builds_it_with_example_inputs(trained, monkeypatch):
    monkeypatch.setattr(vlm, "train_vlm", lambda **kwargs: trained)
    loaded = load_model("synthetic-vlm")
    inputs = loaded.example_inputs()
    assert inputs["input_ids"].shape == (2, 29) and inputs["pixel_values"].shape == (2, 3, 32, 32)
    assert loaded.processor is trained.processor and loaded.tokenizer is trained.tokenizer
    with torch.no_grad():
        assert loaded.model(**inputs).logits.shape == (2, 29, 2048)
