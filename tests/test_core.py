"""The hook layer: reading, writing, spans, cache indexing, cleanup and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mmlens
from mmlens.core.spans import ModalitySpans, spans_from_token_ids

from .conftest import text_batch


def plain_logits(hm, inputs):
    with torch.no_grad():
        return hm.model(**inputs).logits


# -- exactness ------------------------------------------------------------------------------------
def test_caching_everything_leaves_logits_bit_identical(tinystories):
    hm, inputs = tinystories
    run = hm.run(inputs, cache=True)
    assert torch.equal(run.logits, plain_logits(hm, inputs))
    assert set(run.cache) == set(hm.hook_points)


def test_patching_clean_into_clean_at_every_point_is_bit_exact(tinystories):
    hm, inputs = tinystories
    clean = hm.run(inputs, cache=True)
    edits = [mmlens.replace(name, clean.cache[name]) for name in hm.hook_points]
    assert torch.equal(hm.run(inputs, edits=edits).logits, clean.logits)
    spans_edits = [mmlens.replace(name, clean.cache[name], at="last") for name in hm.names("lm.blocks.*")]
    assert torch.equal(hm.run(inputs, edits=spans_edits).logits, clean.logits)


def test_resid_mid_write_reaches_the_block_output(tinystories):
    """Writing resid_mid must be what the block adds its MLP to: out = X + mlp(norm(X))."""
    hm, inputs = tinystories
    other = hm.run(text_batch(hm.model.config.vocab_size, seed=1), cache=True).cache
    run = hm.run(
        inputs,
        edits=[mmlens.replace("lm.blocks.1.resid_mid", other["lm.blocks.1.resid_mid"])],
        cache=["lm.blocks.1.resid_post", "lm.blocks.1.mlp_out"],
    )
    assert torch.equal(run.cache["lm.blocks.1.resid_post"], other["lm.blocks.1.resid_post"])
    assert torch.equal(run.cache["lm.blocks.1.mlp_out"], other["lm.blocks.1.mlp_out"])


def test_resid_pre_write_changes_downstream_as_a_fresh_run_would(tinystories):
    hm, inputs = tinystories
    other = hm.run(text_batch(hm.model.config.vocab_size, seed=1), cache=True)
    run = hm.run(inputs, edits=[mmlens.replace("lm.blocks.0.resid_pre", other.cache["lm.blocks.0.resid_pre"])])
    assert torch.equal(run.logits, other.logits)


# -- edits ------------------------------------------------------------------------------------------
def test_replace_at_span_changes_only_selected_positions(tinystories):
    hm, inputs = tinystories
    clean = hm.run(inputs, cache="lm.blocks.0.resid_post")
    run = hm.run(
        inputs, edits=[mmlens.replace("lm.blocks.0.resid_post", 0.0, at=[2, 3])], cache="lm.blocks.0.resid_post"
    )
    act, ref = run.cache["lm.blocks.0.resid_post"], clean.cache["lm.blocks.0.resid_post"]
    assert torch.all(act[:, [2, 3]] == 0)
    assert torch.equal(act[:, [0, 1, 4, 5]], ref[:, [0, 1, 4, 5]])
    assert torch.equal(run.logits[:, :2], clean.logits[:, :2])  # causal: earlier positions unchanged
    assert not torch.allclose(run.logits[:, 3:], clean.logits[:, 3:])


def test_add_and_apply_and_heads(tinystories):
    hm, inputs = tinystories
    clean = hm.run(inputs, cache=["lm.blocks.0.attn_out", "lm.blocks.0.z"]).cache
    delta = torch.randn(hm.model.config.hidden_size)
    run = hm.run(inputs, edits=[mmlens.add("lm.blocks.0.attn_out", delta, at="last")], cache="lm.blocks.0.attn_out")
    assert torch.allclose(run.cache["lm.blocks.0.attn_out"][:, -1], clean["lm.blocks.0.attn_out"][:, -1] + delta)
    run = hm.run(
        inputs, edits=[mmlens.apply("lm.blocks.0.attn_out", lambda a, ctx: a * 2)], cache="lm.blocks.0.attn_out"
    )
    assert torch.equal(run.cache["lm.blocks.0.attn_out"], clean["lm.blocks.0.attn_out"] * 2)
    run = hm.run(inputs, edits=[mmlens.ablate("lm.blocks.0.z", heads=[1, 3], at="last")], cache="lm.blocks.0.z")
    z = run.cache["lm.blocks.0.z"]
    assert z.shape[2] == hm.model.config.num_attention_heads
    assert torch.all(z[:, -1, [1, 3]] == 0)
    assert torch.equal(z[:, -1, [0, 2]], clean["lm.blocks.0.z"][:, -1, [0, 2]])
    assert torch.equal(z[:, :-1], clean["lm.blocks.0.z"][:, :-1])


def test_edit_errors_are_clear(tinystories):
    hm, inputs = tinystories
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        hm.run(inputs, edits=[mmlens.apply("lm.blocks.0.attn_out", lambda a, ctx: a[:, :1])])
    with pytest.raises(ValueError, match="does not fit"):
        hm.run(inputs, edits=[mmlens.replace("lm.blocks.0.attn_out", torch.zeros(5, 7), at="last")])
    with pytest.raises(ValueError, match="does not broadcast"):
        hm.run(inputs, edits=[mmlens.replace("lm.blocks.0.attn_out", torch.zeros(5, 7))])
    with pytest.raises(ValueError, match="not a per-head point"):
        hm.run(inputs, edits=[mmlens.ablate("lm.blocks.0.attn_out", heads=0)])
    with pytest.raises(TypeError, match="mmlens.replace"):
        hm.run(inputs, edits=[("lm.blocks.0.attn_out", 0)])


def test_runs_never_see_each_others_edits_and_hooks_are_removed_on_error(tinystories):
    hm, inputs = tinystories
    reference = plain_logits(hm, inputs)
    hm.run(inputs, edits=[mmlens.ablate("lm.blocks.0.resid_post")])

    def boom(act, ctx):
        raise RuntimeError("edit failed")

    with pytest.raises(RuntimeError, match="edit failed"):
        hm.run(inputs, edits=[mmlens.apply("lm.blocks.1.mlp_out", boom)], cache=True)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in hm.model.modules())
    assert torch.equal(plain_logits(hm, inputs), reference)
    assert torch.equal(hm.run(inputs).logits, reference)


def test_gradients_flow_through_edits(tinystories):
    hm, inputs = tinystories
    delta = torch.zeros(hm.model.config.hidden_size, requires_grad=True)
    run = hm.run(
        inputs,
        edits=[mmlens.add("lm.blocks.0.resid_post", delta, at="last")],
        keep_grad=True,
        cache="lm.blocks.1.resid_post",
    )
    run.logits[:, -1].logsumexp(-1).sum().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    assert run.cache["lm.blocks.1.resid_post"].requires_grad


# -- cache -------------------------------------------------------------------------------------------
def test_cache_names_filter_and_indexing(tinystories):
    hm, inputs = tinystories
    cache = hm.run(inputs, cache="lm.blocks.*.resid_post").cache
    assert sorted(cache) == ["lm.blocks.0.resid_post", "lm.blocks.1.resid_post"]
    assert "lm.blocks.0.resid_post" in cache and None not in cache and "lm.blocks.0.attn_out" not in cache
    assert torch.equal(cache["resid_post", -1], cache["lm.blocks.1.resid_post"])
    assert torch.equal(cache["resid_post", 0, "last"], cache["lm.blocks.0.resid_post"][:, -1:])
    assert torch.equal(cache["blocks.1.hook_resid_post"], cache["lm.blocks.1.resid_post"])  # TransformerLens alias
    stacked = cache.stack("resid_post")
    assert stacked.dims == ("layer", "batch", "pos", "d") and stacked.coords["layer"] == [0, 1]
    assert torch.equal(stacked.values[1], cache["lm.blocks.1.resid_post"])
    with pytest.raises(KeyError, match="was not recorded"):
        cache["lm.blocks.0.attn_out"]
    with pytest.raises(IndexError, match="out of range"):
        cache["resid_post", 2]


def test_unknown_hook_name_lists_nearest(tinystories):
    hm, inputs = tinystories
    with pytest.raises(KeyError, match=r"nearest valid names: \['lm.blocks.0.resid_post'"):
        hm.run(inputs, cache="lm.blocks.0.resid_pst")
    with pytest.raises(KeyError, match="matches no hook point"):
        hm.run(inputs, cache="vision.*")


def test_bad_inputs_and_models(tinystories):
    hm, _ = tinystories
    with pytest.raises(TypeError, match="to_inputs"):
        hm.run("Once upon a time")
    with pytest.raises(KeyError, match="input_ids"):
        hm.run({"pixel_values": torch.zeros(1)})
    with pytest.raises(LookupError, match="register_adapter"):
        mmlens.wrap(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        mmlens.wrap("gpt2")
    out = hm.run(hm.to_inputs("Once upon a time"), cache="lm.logits")
    assert out.cache["lm.logits"].shape[-1] == hm.model.config.vocab_size


# -- spans -------------------------------------------------------------------------------------------
def test_span_selectors():
    ids = torch.tensor([[5, 9, 9, 6, 7, 0], [9, 9, 5, 6, 0, 0]])
    spans = spans_from_token_ids(ids, torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]), {"image": 9})
    assert spans.mask("image").tolist() == [[0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert spans.mask("text").tolist() == [[1, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]]
    assert spans.mask("last_text").nonzero().tolist() == [[0, 5], [1, 3]]
    assert spans.mask("first_image").nonzero().tolist() == [[0, 1], [1, 0]]
    assert spans.mask("last").nonzero().tolist() == [[0, 5], [1, 3]]
    assert spans.mask(-1).nonzero().tolist() == [[0, 5], [1, 5]]
    assert spans.mask(slice(1, 3)).sum().item() == 4
    assert spans.positions("image").tolist() == [[1, 2], [0, 1]]
    with pytest.raises(ValueError, match=r"\[4, 2\]"):
        spans.positions("text")
    with pytest.raises(KeyError, match="spans here: \\['text', 'image'"):
        spans.mask("graph")
    with pytest.raises(IndexError, match="out of range"):
        spans.mask(6)
    assert spans.modality_of_positions()[1] == ["image", "image", "text", "text", "pad", "pad"]


def test_llava_spans_follow_the_image_tokens_in_each_row(llava):
    hm, inputs = llava
    image_id = hm.model.config.image_token_id
    ids = inputs["input_ids"].clone()
    n_image = int((ids[0] == image_id).sum())
    ids[1] = torch.roll(ids[1], shifts=3)  # move row 1's image block 3 positions right
    inputs = {**inputs, "input_ids": ids}
    run = hm.run(inputs, cache=["lm.blocks.0.resid_post", "fusion.embeds", "fusion.projector_out"])
    spans = run.spans
    assert torch.equal(spans.masks["image"], ids == image_id)
    assert spans.masks["image"].sum(1).tolist() == [n_image, n_image]
    image_rows = run.cache["fusion.embeds", "image"]
    projector = run.cache["fusion.projector_out"]
    assert torch.equal(image_rows, projector.to(image_rows.dtype))
    assert run.cache.get("lm.blocks.0.resid_post", at="text", row=1).shape[0] == int(spans.masks["text"][1].sum())
    with pytest.raises(ValueError, match="does not index the fused sequence"):
        run.cache.get("fusion.projector_out", at="image")


def test_encoder_points_reject_span_names(llava):
    hm, inputs = llava
    with pytest.raises(ValueError, match="positions are its own"):
        hm.run(inputs, edits=[mmlens.ablate("vision.blocks.0.resid_post", at="image")])
    run = hm.run(
        inputs, edits=[mmlens.ablate("vision.blocks.0.resid_post", at=[0])], cache="vision.blocks.0.resid_post"
    )
    assert torch.all(run.cache["vision.blocks.0.resid_post"][:, 0] == 0)


def test_missing_modality_input_is_reported(llava):
    hm, inputs = llava
    text_only = {k: v for k, v in inputs.items() if k != "pixel_values"}
    text_only["input_ids"] = torch.where(
        text_only["input_ids"] == hm.model.config.image_token_id, 1, text_only["input_ids"]
    )
    with pytest.raises(RuntimeError, match="never reached"):
        hm.run(text_only, cache=["vision.blocks.0.resid_post"])


def test_neutral_references(llava):
    hm, inputs = llava
    neutral = hm.neutral(inputs, "image")
    assert torch.count_nonzero(neutral["pixel_values"]) == 0
    assert torch.equal(neutral["input_ids"], inputs["input_ids"])
    neutral_text = hm.neutral(inputs, "text")
    image = hm.spans(inputs).masks["image"]
    assert torch.equal(neutral_text["input_ids"][image], inputs["input_ids"][image])
    with pytest.raises(KeyError, match="no neutral reference for 'audio'"):
        hm.neutral(inputs, "audio")


def test_spans_object_is_reused_across_runs_identically(llava):
    hm, inputs = llava
    a, b = hm.spans(inputs), hm.spans(inputs)
    assert isinstance(a, ModalitySpans) and a.same_layout(b)
