"""The hand-written tables of LLaVA-NeXT, LLaVA-OneVision, SmolVLM, PaliGemma and InternVL: the facts
each encodes (placeholder counts, encoder projection, attention semantics, refused layouts)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import Gemma2Config, PaliGemmaConfig, SiglipVisionConfig

import mmlens
from mmlens.runs.cli import main as cli_main

VLMS = [
    "tiny-random-llava-next",
    "tiny-random-llava-onevision",
    "tiny-random-smolvlm",
    "tiny-random-paligemma",
    "tiny-random-internvl",
]
TABLES = {
    "tiny-random-llava-next": "llava-next",
    "tiny-random-llava-onevision": "llava-onevision",
    "tiny-random-smolvlm": "idefics3",
    "tiny-random-paligemma": "paligemma",
    "tiny-random-internvl": "internvl",
}


def _wrapped(loaded, name):
    lm = loaded(name)
    return mmlens.HookedModel(lm.model), lm.example_inputs()


@pytest.mark.parametrize("name", VLMS)
def test_table_is_chosen_and_the_image_span_holds_every_image_feature(name, loaded):
    hm, inputs = _wrapped(loaded, name)
    assert hm.adapter.name == TABLES[name]
    run = hm.run(inputs, cache=["fusion.embeds", "fusion.projector_out"])
    image = run.spans.masks["image"]
    assert image.sum(1).tolist()[0] == image.sum(1).tolist()[1] > 0
    assert torch.equal(image, inputs["input_ids"] == hm.model.config.image_token_id)
    # the image positions of the fused embeddings are not the placeholder's own embedding
    placeholder = hm.model.get_input_embeddings()(torch.tensor(hm.model.config.image_token_id))
    assert not torch.isclose(run.cache["fusion.embeds"][image], placeholder).all(-1).any()


@pytest.mark.parametrize("name", ["tiny-random-llava-next", "tiny-random-llava-onevision"])
def test_anyres_placeholder_count_per_row_equals_the_models_features(name, loaded):
    """The example's placeholder count (from the processor's helper) is what the model packs for the
    image of each row: tiles, unpadding and newline tokens included."""
    hm, inputs = _wrapped(loaded, name)
    with torch.no_grad():
        features = hm.model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    assert inputs["pixel_values"].shape[1] == 3  # 1 x 2 tiles + the base tile
    lengths = [f.shape[0] for f in features]
    assert lengths == hm.spans(inputs).masks["image"].sum(1).tolist()
    side = hm.model.config.vision_config.image_size // hm.model.config.vision_config.patch_size
    assert lengths[0] < 3 * side * side, "unpadding drops rows of the tiled grid"


@pytest.mark.parametrize("name", VLMS)
def test_project_encoder_reproduces_the_projector_output(name, loaded):
    """project_encoder of the vision layer the model reads == the model's own projector output."""
    hm, inputs = _wrapped(loaded, name)
    last = hm.names("vision.blocks.*")[-1]
    run = hm.run(inputs, cache=[last, "fusion.projector_out"])
    with torch.no_grad():
        projected = hm.adapter.project_encoder(hm.model, inputs, run.cache[last])
    torch.testing.assert_close(projected, run.cache["fusion.projector_out"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", VLMS)
def test_neutral_image_runs_and_changes_only_the_image(name, loaded):
    hm, inputs = _wrapped(loaded, name)
    neutral = hm.neutral(inputs, "image")
    assert all(neutral[k] is v for k, v in inputs.items() if k not in hm.adapter.modality_inputs["image"])
    clean = hm.run(inputs, cache="fusion.embeds")
    run = hm.run(neutral, cache="fusion.embeds")  # the model keeps the neutral image (not dropped as padding)
    text = clean.spans.masks["text"]
    assert torch.equal(run.cache["fusion.embeds"][text], clean.cache["fusion.embeds"][text])
    assert not torch.equal(run.logits, clean.logits)


def test_paligemma_prefix_attends_bidirectionally(loaded):
    """Changing the last prompt token changes the first image position's output: the table must say
    causal=False so that replay never reuses earlier positions' keys and values."""
    hm, inputs = _wrapped(loaded, "tiny-random-paligemma")
    assert hm.adapter.causal is False
    edited = {**inputs, "input_ids": inputs["input_ids"].clone()}
    edited["input_ids"][:, -2] = 7
    clean, other = hm.run(inputs).logits, hm.run(edited).logits
    assert not torch.allclose(clean[:, 0], other[:, 0])
    # with the suffix marked (token_type_ids 1) the last positions are causal again
    suffix = {**inputs, "token_type_ids": inputs["token_type_ids"].clone()}
    suffix["token_type_ids"][:, -2:] = 1
    a = hm.run(suffix).logits
    b = hm.run({**suffix, "input_ids": edited["input_ids"]}).logits
    assert torch.equal(a[:, :-2], b[:, :-2])


def test_paligemma_2_is_refused():
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4),
        text_config=Gemma2Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, head_dim=16),
    )
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="'gemma2'.*post-norms"):
        mmlens.hooks.PALIGEMMA.spans(SimpleNamespace(config=config), {"input_ids": ids})


def test_internvl_refuses_several_tiles_per_prompt(loaded):
    hm, inputs = _wrapped(loaded, "tiny-random-internvl")
    tiles = {**inputs, "pixel_values": inputs["pixel_values"].repeat(2, 1, 1, 1)}
    with pytest.raises(ValueError, match="4 tiles for 2 prompts.*crop_to_patches=False"):
        hm.spans(tiles)


def test_onevision_refuses_video_tokens(loaded):
    hm, inputs = _wrapped(loaded, "tiny-random-llava-onevision")
    ids = inputs["input_ids"].clone()
    ids[:, 1] = hm.model.config.video_token_id
    with pytest.raises(ValueError, match="video tokens"):
        hm.spans({**inputs, "input_ids": ids})


@pytest.mark.parametrize("name", VLMS)
def test_cli_hooks_json_lists_encoder_fusion_and_lm(name, capsys):
    assert cli_main(["hooks", name, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["stage"] for r in rows} == {"encoder", "fusion", "lm"}
    assert {r["modality"] for r in rows if r["stage"] == "encoder"} == {"image"}
    assert {r["modality"] for r in rows if r["stage"] == "lm"} == {"fused"}
    assert all(r["shape"] for r in rows)


def test_llava_refuses_several_images_stacked_for_one_prompt(loaded):
    """Two images for the first prompt on pixel_values' first axis: splitting rows would hand row 1
    the first prompt's second image and run without an error. The spans refuse it, naming the fix."""
    hm, inputs = _wrapped(loaded, "tiny-random-llava")
    pixels = torch.cat([inputs["pixel_values"][:1], inputs["pixel_values"]])
    with pytest.raises(ValueError, match="3 entries on its first axis for 2 prompts.*one image per prompt"):
        hm.spans({**inputs, "pixel_values": pixels})


@pytest.mark.parametrize("name", ["tiny-random-llava-next", "tiny-random-smolvlm"])
def test_vision_points_are_laid_out_by_image_item(name, loaded):
    """A row holds several tiles / sub-images: the vision points' leading axis is those items, a
    position selector picks patches of every item, and sweep refuses them (it patches one row)."""
    from mmlens.methods.patching import logit_diff, sweep

    hm, inputs = _wrapped(loaded, name)
    point = hm.hook_points["vision.blocks.0.resid_post"]
    assert point.axes == hm.hook_points["fusion.projector_out"].axes == ("item", "pos")
    clean = hm.run(inputs, cache=point.name)
    assert clean.cache[point.name].shape[0] == 3 * inputs["input_ids"].shape[0]
    run = hm.run(inputs, edits=[mmlens.ablate(point.name, at=[2])], cache=point.name)
    zeroed = (run.cache[point.name] == 0).all(-1)
    assert zeroed[:, 2].all() and not zeroed[:, :2].any()
    rows = [hm.rows(inputs, 0), hm.rows(inputs, 1)]
    with pytest.raises(ValueError, match="no batch axis.*hooked.run"):
        sweep(hm, *rows, logit_diff(3, 4), hook="vision.resid_post", axes=("layer",), progress=False)


def test_repeated_rows_feed_a_model_that_views_its_pixels(loaded):
    """SmolVLM reshapes pixel_values [batch, images, C, H, W] with .view, which a batch-1 tensor
    expanded to n rows (stride 0) does not allow: hm.repeat must hand it real copies."""
    hm, inputs = _wrapped(loaded, "tiny-random-smolvlm")
    row = hm.rows(inputs, 0)
    run = hm.run(hm.repeat(row, 3))
    assert torch.equal(run.logits[2], run.logits[0])
    torch.testing.assert_close(run.logits[:1], hm.run(row).logits, rtol=0, atol=1e-5)


def test_paligemma_sweeps_never_reuse_earlier_keys_and_values(loaded):
    """With the table's causal=False, a position sweep replays whole rows (no key/value reuse) and
    equals full forwards."""
    from mmlens.methods.patching import logit_diff, sweep

    hm, inputs = _wrapped(loaded, "tiny-random-paligemma")
    clean, corrupted = hm.rows(inputs, 0), hm.rows(inputs, 1)
    options = {"hook": "resid_pre", "axes": ("position",), "layers": [1], "progress": False}
    fast = sweep(hm, clean, corrupted, logit_diff(3, 4), **options)
    slow = sweep(hm, clean, corrupted, logit_diff(3, 4), replay=False, **options)
    assert fast.method.startswith("replay") and fast.method != "replay + kv" and slow.method == "full forwards"
    assert (fast.table.value - slow.table.value).abs().max() < 1e-4
