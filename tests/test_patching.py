"""Patching: exactness of sweeps (full and replayed), corruptions, attribution and path patching."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mmlens
from mmlens.core.adapter import get_module
from mmlens.methods.patching import (
    Component,
    attribution_patch,
    correlation,
    corrupt,
    edge_attribution_patch,
    logit_diff,
    path_patch,
    sweep,
)
from mmlens.plots import plot_edges, plot_patching


@pytest.fixture(scope="module")
def story(loaded):
    """TinyStories with a clean prompt and a noise-corrupted copy (same layout)."""
    lm = loaded("tinystories-656k")
    hm = mmlens.wrap(lm.model, tokenizer=lm.tokenizer)
    clean = dict(lm.tokenizer(["Once upon a time there was a little girl who"], return_tensors="pt"))
    return hm, clean, corrupt(hm, clean, "text", "noise", noise=2.0, seed=1)


@pytest.fixture(scope="module")
def image_pair(llava):
    hm, inputs = llava
    clean = {k: v[:1] for k, v in inputs.items()}
    return hm, clean, corrupt(hm, clean, "image", "neutral")


def _metric(hm, clean):
    logits = hm.readout_logits(hm.run(clean).logits, clean)[0]
    top2 = logits.topk(2).indices.tolist()
    return logit_diff(*top2)


def test_clean_into_clean_is_bit_exact(story):
    hm, clean, _ = story
    metric = _metric(hm, clean)
    exact = float(metric(hm.readout_logits(hm.run(clean).logits, clean))[0])
    single = sweep(hm, clean, clean, metric, batch_size=1, replay=False, progress=False)
    assert (single.table.value == exact).all() and single.clean == [exact]
    batched = sweep(hm, clean, clean, metric, batch_size=16, progress=False)
    assert (batched.table.value - exact).abs().max() < 5e-5  # batched kernels: float round-off only


@pytest.mark.parametrize("replay", [True, False])
def test_patching_every_position_at_layer_0_gives_the_corrupted_run(story, replay):
    hm, clean, corrupted = story
    result = sweep(
        hm,
        clean,
        corrupted,
        "kl",
        hook="lm.blocks.0.resid_pre",
        axes=("layer",),
        direction="noise",
        replay=replay,
        progress=False,
    )
    assert len(result.table) == 1
    assert abs(result.table.value[0] - result.corrupted[0]) < 1e-5
    assert result.corrupted[0] > 1e-3 and result.clean[0] == 0.0


def test_replay_matches_full_forwards_and_the_table_is_tidy(story):
    hm, clean, corrupted = story
    metric = _metric(hm, clean)
    fast = sweep(hm, clean, corrupted, metric, batch_size=7, progress=False)
    slow = sweep(hm, clean, corrupted, metric, replay=False, progress=False)
    seq = clean["input_ids"].shape[1]
    assert len(fast.table) == 2 * seq and set(fast.table.layer) == {0, 1}
    assert (fast.table.value - slow.table.value).abs().max() < 1e-4
    assert fast.grid().shape == (2, seq)
    post = sweep(hm, clean, corrupted, metric, hook="resid_post", progress=False)
    last_layer_last_pos = post.table[(post.table.layer == 1) & (post.table.position == seq - 1)]
    assert abs(float(last_layer_last_pos.normalized.iloc[0]) - 1.0) < 1e-4  # that cell carries the whole clean state
    noising = sweep(hm, clean, corrupted, metric, direction="noise", progress=False)
    assert noising.clean == fast.clean and noising.corrupted == fast.corrupted


def test_mismatched_layouts_name_both_lengths(story, loaded):
    hm, clean, _ = story
    longer = dict(hm.tokenizer(["Once upon a time there was a little girl who liked cats"], return_tensors="pt"))
    with pytest.raises(ValueError, match=r"\(1, \d+\) vs \(1, \d+\)"):
        sweep(hm, clean, longer, "kl", progress=False)


def test_image_corruption_sweeps_over_spans_heads_and_encoder_positions(image_pair):
    hm, clean, corrupted = image_pair
    assert not torch.equal(corrupted.inputs["pixel_values"], clean["pixel_values"])
    by_span = sweep(hm, clean, corrupted, "kl", axes=("layer", "span"), progress=False)
    assert set(by_span.table.span) == {"text", "image"}
    image0 = by_span.table[(by_span.table.layer == 0) & (by_span.table.span == "image")]
    assert abs(float(image0.normalized.iloc[0]) - 1.0) < 1e-4  # all image positions at layer 0 = the clean run
    heads = sweep(hm, clean, corrupted, "kl", hook="z", axes=("layer", "head"), progress=False)
    assert len(heads.table) == 2 * hm.model.config.text_config.num_attention_heads
    encoder = sweep(hm, clean, corrupted, "kl", hook="vision.resid_post", progress=False)
    n_layers = hm.model.config.vision_config.num_hidden_layers
    assert set(encoder.table.layer) == set(range(n_layers)) and set(encoder.table.modality) == {"image"}
    fig = plot_patching(by_span, value="normalized")
    assert fig.axes[0].get_xlabel() == "span"


def test_attribution_patching_on_a_frozen_model_equals_the_unfrozen_one(story):
    """A model whose parameters do not require grad (the usual frozen LLM) still gets gradients at
    the patched points: the recorded activations become the graph's leaves."""
    hm, clean, corrupted = story
    metric = _metric(hm, clean)
    thawed = attribution_patch(hm, clean, corrupted, metric)
    flags = [p.requires_grad for p in hm.model.parameters()]
    hm.model.requires_grad_(False)
    try:
        frozen = attribution_patch(hm, clean, corrupted, metric)
    finally:
        for p, flag in zip(hm.model.parameters(), flags):
            p.requires_grad_(flag)
    assert len(frozen.table) == len(thawed.table) > 0
    torch.testing.assert_close(
        torch.tensor(frozen.table.effect.to_numpy()), torch.tensor(thawed.table.effect.to_numpy()), rtol=0, atol=1e-6
    )


def test_attribution_is_exact_on_a_linear_path(story):
    hm, clean, corrupted = story
    metric = _metric(hm, clean)
    # lm.final_norm's output reaches a logit difference through lm_head only: a linear path
    exact = sweep(hm, clean, corrupted, metric, hook="lm.final_norm", axes=("position",), progress=False)
    estimate = attribution_patch(hm, clean, corrupted, metric, hook="lm.final_norm", axes=("position",))
    agreement = correlation(estimate, exact)
    assert agreement["max_abs_diff"] < 1e-4 and agreement["n_cells"] == clean["input_ids"].shape[1]
    resid = attribution_patch(hm, clean, corrupted, metric)
    assert (
        correlation(resid, sweep(hm, clean, corrupted, metric, progress=False))["pearson"] > 0
    )  # first order: agrees in trend


def test_path_patching(story):
    hm, clean, corrupted = story
    metric = _metric(hm, clean)
    clean_value = float(metric(hm.readout_logits(hm.run(clean).logits, clean))[0])
    receivers = [Component("lm.blocks.1.resid_pre", at="last")]
    assert path_patch(hm, clean, corrupted, metric, senders=[], receivers=receivers) == clean_value
    embed = [Component("lm.blocks.0.attn_out")]
    through = path_patch(hm, clean, corrupted, metric, senders=embed, receivers=receivers)
    assert through != clean_value
    # with the receiver at the logits' input, the path patch equals noising that sender directly
    direct = sweep(
        hm,
        clean,
        corrupted,
        metric,
        hook="lm.blocks.0.attn_out",
        axes=("layer",),
        direction="noise",
        replay=False,
        progress=False,
    )
    final = path_patch(
        hm, clean, corrupted, metric, senders=embed, receivers=[Component("lm.final_norm")], frozen="none"
    )
    assert abs(final - float(direct.table.value[0])) < 1e-4


REPLAY_CASES = [
    ("resid_pre", ("layer", "position")),
    ("resid_post", ("layer", "position")),
    ("attn_out", ("layer", "position")),
    ("mlp_out", ("layer", "span")),
    ("resid_mid", ("layer", "position")),
    ("z", ("layer", "head")),
    ("z", ("layer", "position", "head")),
]


@pytest.mark.parametrize("name", ["tinystories-656k", "tiny-random-gpt2", "tiny-random-llava", "tiny-random-idefics3"])
def test_replay_with_kv_reuse_equals_full_forwards_at_every_kind_of_point(loaded, name):
    lm = loaded(name)
    hm = mmlens.wrap(lm.model, tokenizer=lm.tokenizer, processor=lm.processor)
    example = lm.example_inputs()
    clean = {k: v[:1] for k, v in example.items()}
    corrupted = corrupt(hm, clean, "text", "noise", noise=1.0, seed=3)
    metric = _metric(hm, clean)
    for hook, axes in REPLAY_CASES:
        fast = sweep(
            hm, clean, corrupted, metric, hook=hook, axes=axes, batch_size=5, skip_unchanged=False, progress=False
        )
        slow = sweep(
            hm, clean, corrupted, metric, hook=hook, axes=axes, replay=False, skip_unchanged=False, progress=False
        )
        assert fast.method == "replay + kv" and slow.method == "full forwards", (hook, fast.method)
        assert len(fast.table) == len(slow.table) > 0
        assert (fast.table.value - slow.table.value).abs().max() < 1e-4, (name, hook, axes)


def test_replay_asks_the_adapter_whether_keys_and_values_can_be_reused(story):
    """An adapter that says its LM is not causal gets plain replay (every position re-run), still exact."""
    hm, clean, corrupted = story
    bidirectional = mmlens.HookedModel(
        hm.model, adapter=dataclasses.replace(hm.adapter, causal=False), tokenizer=hm.tokenizer
    )
    metric = _metric(hm, clean)
    fast = sweep(
        bidirectional, clean, corrupted, metric, hook="attn_out", batch_size=5, skip_unchanged=False, progress=False
    )
    slow = sweep(
        bidirectional, clean, corrupted, metric, hook="attn_out", replay=False, skip_unchanged=False, progress=False
    )
    assert fast.method.startswith("replay (no kv reuse") and slow.method == "full forwards"
    assert (fast.table.value - slow.table.value).abs().max() < 1e-4


def test_no_op_cells_are_skipped_and_equal_the_target_run(story):
    hm, clean, _ = story
    ids = clean["input_ids"]
    other = {**clean, "input_ids": ids.clone()}
    other["input_ids"][0, -3] = (int(ids[0, -3]) + 1) % hm.model.config.vocab_size  # differ at one position only
    metric = _metric(hm, clean)
    fast = sweep(hm, clean, other, metric, progress=False)
    full = sweep(hm, clean, other, metric, skip_unchanged=False, replay=False, progress=False)
    n_layers = hm.model.config.num_hidden_layers
    seq = ids.shape[1]
    # layer 0 is the embedding: every position but the changed one is a no-op; later layers: causal,
    # so only positions before the change are identical
    assert fast.skipped == (seq - 1) + (n_layers - 1) * (seq - 3)
    before = fast.table.position < seq - 3
    assert (fast.table.value[before] == fast.corrupted[0]).all()
    assert (fast.table.value - full.table.value).abs().max() < 1e-4


def test_edge_attribution_sums_to_node_attribution_and_splits_by_span(image_pair):
    hm, clean, _ = image_pair
    corrupted = corrupt(hm, clean, "text", "noise", noise=1.0, seed=2)  # only text embeddings change
    metric = _metric(hm, clean)
    edges = edge_attribution_patch(hm, clean, corrupted, metric)
    n_layers = hm.model.config.text_config.num_hidden_layers
    assert len(edges.nodes) == 2 * n_layers + 2
    assert len(edges.table) == (2 * n_layers + 1) * (2 * n_layers + 2) // 2  # receivers after their sender only
    for hook in ("attn_out", "mlp_out"):
        nodes = attribution_patch(hm, clean, corrupted, metric, hook=hook, axes=("layer",)).table
        for layer, effect in zip(nodes.layer, nodes.effect):
            sent = edges.table[edges.table.sender == f"lm.blocks.{layer}.{hook}"].score.sum()
            assert abs(sent - effect) < 1e-4 * max(1.0, abs(effect)), (hook, layer, sent, effect)
    by_span = edge_attribution_patch(hm, clean, corrupted, metric, by="span")
    from_input = by_span.table[by_span.table.sender == "lm.blocks.0.resid_pre"]
    assert (from_input[from_input.span == "image"].score == 0).all()  # image embeddings are not corrupted
    assert from_input[from_input.span == "text"].score.abs().max() > 0
    merged = by_span.table.groupby(["sender", "receiver"]).score.sum()
    assert (merged - edges.table.set_index(["sender", "receiver"]).score).abs().max() < 1e-6
    matrix = edges.matrix()
    assert (
        matrix.shape == (2 * n_layers + 1, 2 * n_layers + 1)
        and matrix.isna().to_numpy().sum() == (2 * n_layers + 1) * (2 * n_layers) // 2
    )
    assert abs(edges.top(1).score[0]) == edges.table.score.abs().max()
    fig = plot_edges(edges)
    assert fig.axes[0].get_ylabel() == "sender"


@pytest.mark.parametrize("name", ["tiny-random-llava", "tiny-random-internvl", "tea-glm-tiny"])
def test_projector_sweeps_reuse_the_encoder_outputs_exactly(loaded, name):
    lm = loaded(name)
    hm = mmlens.wrap(lm.model, tokenizer=lm.tokenizer, processor=lm.processor)
    clean = {
        k: (v[:1] if isinstance(v, torch.Tensor) and k not in ("node_features", "edge_index") else v)
        for k, v in lm.example_inputs().items()
    }
    modality = "graph" if name == "tea-glm-tiny" else "image"
    corrupted = corrupt(hm, clean, modality, "neutral")
    metric = _metric(hm, clean)
    hook = "fusion.embeds" if name == "tea-glm-tiny" else "fusion.projector_out"  # TEA-GLM's projector: [b, 5 * d]
    # noising: the target run is the clean one, whose encoder runs (TEA-GLM's neutral graph skips the GNN)
    fast = sweep(
        hm, clean, corrupted, metric, hook=hook, axes=("position",), direction="noise", batch_size=3, progress=False
    )
    slow = sweep(
        hm, clean, corrupted, metric, hook=hook, axes=("position",), direction="noise", replay=False, progress=False
    )
    assert fast.method == "full forwards, encoders cached" and slow.method == "full forwards"
    assert len(fast.table) > 1 and (fast.table.value - slow.table.value).abs().max() < 1e-5
    encoder_blocks = [hp for hp in hm.hook_points.values() if hp.stage == "encoder" and hp.layer is not None]
    assert encoder_blocks and all("forward" not in vars(get_module(hm.model, hp.site.module)) for hp in encoder_blocks)
