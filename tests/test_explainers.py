"""Explainers: known identities (completeness, occlusion == patching), modes, masks and errors."""

from __future__ import annotations

import math

import pytest
import torch

import mmlens
from mmlens.methods.explainers import EXPLAINERS, explain, explain_row, predicted_prob, prepare, with_embeds
from mmlens.methods.patching import logprob


@pytest.fixture(scope="module")
def vlm(loaded):
    lm = loaded("tiny-random-llava")
    return mmlens.wrap(lm.model, processor=lm.processor), lm.example_inputs()


@pytest.fixture(scope="module")
def story(loaded):
    lm = loaded("tinystories-656k")
    hm = mmlens.wrap(lm.model, tokenizer=lm.tokenizer)
    return hm, dict(lm.tokenizer(["Once upon a time there was a little girl who"], return_tensors="pt"))


def _logprob_of_prediction(hm, one):
    logits = hm.readout_logits(hm.run(one).logits, one)
    return logprob(int(logits[0].argmax()))


def _gap(hm, one, mode, metric):
    """f(input) - f(baseline), the quantity integrated gradients must add up to."""
    setup = prepare(hm, one, metric, mode)
    with torch.no_grad():
        return float(setup.value[0] - with_embeds(hm, one, setup.point, setup.baseline, metric)[0])


@pytest.mark.parametrize("mode", ["joint", "image", "text"])
def test_integrated_gradients_report_their_completeness_in_every_mode(vlm, mode):
    hm, inputs = vlm
    one = {k: v[:1] for k, v in inputs.items()}
    metric = _logprob_of_prediction(hm, one)
    ig = explain(hm, one, "integrated_gradients", mode=mode, metric=metric, steps=128, tolerance=None)
    gap = _gap(hm, one, mode, metric)
    assert abs(gap) > 1e-2
    error = abs(float(ig.scores.nansum()) - gap)
    assert ig.info["completeness_error"] == [pytest.approx(error, abs=1e-6)]
    if mode == "image":  # the image baseline is a real embedding: a smooth path, a small Riemann error
        assert error < 0.01 * abs(gap)
    if mode != "joint":  # unimodal: only that modality is scored
        explained = ig.spans.masks[mode]
        assert ig.scores[explained].isfinite().all() and ig.scores[~explained].isnan().all()


def test_integrated_gradients_completeness_on_a_real_lm(story):
    hm, inputs = story
    ig = explain(hm, inputs, "integrated_gradients", steps=128)  # default metric: probability of the prediction
    gap = _gap(hm, inputs, "joint", predicted_prob(hm, inputs))
    assert abs(gap) > 1e-2
    assert abs(float(ig.scores.nansum()) - gap) < 0.01 * abs(gap)


def test_occlusion_equals_exact_patching_at_layer_0(vlm):
    hm, inputs = vlm
    occlusion = explain(hm, inputs, "occlusion")
    patching = explain(hm, inputs, "patching")
    assert occlusion.scores.isnan().equal(patching.scores.isnan())
    assert (occlusion.scores - patching.scores).nan_to_num().abs().max() < 1e-5
    assert occlusion.scores.nan_to_num().abs().max() > 0


def test_attention_scores_are_distributions_and_the_implementation_is_restored(vlm):
    hm, inputs = vlm
    before = hm.model.config.get_text_config()._attn_implementation
    for method in ("attention", "attention_rollout"):
        e = explain(hm, inputs, method)
        assert torch.allclose(e.scores.nansum(1), torch.ones(2), atol=1e-5)  # rows of softmax (and their products)
        assert (e.scores.nan_to_num() >= 0).all()
    assert hm.model.config.get_text_config()._attn_implementation == before
    plain = mmlens.wrap(hm.model).run(inputs).logits
    assert torch.equal(plain, hm.model(**inputs).logits)


def test_explanation_views(vlm):
    hm, inputs = vlm
    e = explain(hm, inputs, "gradient_x_input")
    shares = e.importance()
    assert set(shares) == {"text", "image"}
    assert torch.allclose(shares["text"] + shares["image"], torch.ones(2))
    image = e.spans.masks["image"]
    top = e.top_mask("image", 0.25)
    n = int(image[0].sum())
    assert int(top[0].sum()) == math.ceil(0.25 * n) and not (top & ~image).any()
    chosen, rest = e.scores[0][top[0]], e.scores[0][image[0] & ~top[0]]
    assert chosen.min() >= rest.max()
    assert e.top_mask("image", 0.0).sum() == 0 and e.top_mask("image", 1.0).equal(image)
    assert torch.allclose(e.distribution("image").sum(1), torch.ones(2))
    table = e.table()
    assert len(table) == int(e.spans.valid.sum()) and set(table.modality) == {"text", "image"}


def test_every_explainer_runs_on_the_graph_language_model(loaded):
    lm = loaded("tea-glm-tiny")
    hm = mmlens.wrap(lm.model, tokenizer=lm.tokenizer)
    inputs = lm.example_inputs()
    for method in EXPLAINERS:
        e = explain(
            hm, inputs, method, mode="graph", **({"tolerance": None} if method == "integrated_gradients" else {})
        )
        graph = e.spans.masks["graph"]
        assert e.scores[graph].isfinite().all() and e.scores[~graph].isnan().all(), method


def test_errors(vlm):
    hm, inputs = vlm
    with pytest.raises(ValueError, match="did you mean.*integrated_gradients"):
        explain(hm, inputs, "integrated_gradient")
    with pytest.raises(ValueError, match=r"'joint' or a modality of these inputs \['text', 'image'\]"):
        explain(hm, inputs, "occlusion", mode="audio")
    with pytest.raises(ValueError, match="fraction"):
        explain(hm, inputs, "attention").top_mask("image", 1.5)


def _masked_case(loaded, name):
    """One example row of ``name``, its setup, 11 random masks, an empty one and a duplicate, and
    the same variants computed with full forwards."""
    from mmlens.metrics.desiderata import examples

    lm = loaded(name)
    hm = mmlens.wrap(lm.model, tokenizer=lm.tokenizer, processor=lm.processor)
    one = examples(hm, lm.example_inputs())[0]
    setup = prepare(hm, one, None, "joint")
    assert setup.replay is not None and setup.replay.reuse_kv
    generator = torch.Generator().manual_seed(0)
    seq = setup.embeds.shape[1]
    masks = [torch.rand(seq, generator=generator) < 0.3 for _ in range(11)] + [torch.zeros(seq, dtype=torch.bool)]
    masks.append(masks[0].clone())  # a duplicate runs once and gets the same value
    full = torch.stack(
        [
            with_embeds(
                hm, one, setup.point, torch.where(m[None, :, None], setup.baseline, setup.embeds), setup.metric
            )[0]
            for m in masks
        ]
    ).float()
    return hm, one, setup, masks, full


def _block_lengths(hm, run):
    """The sequence lengths the first LM block receives while ``run()`` runs, and its result."""
    lengths = []
    block = hm.hook_points["lm.blocks.0.resid_pre"].site.module
    handle = hm.model.get_submodule(block).register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
        with_kwargs=True,
    )
    try:
        return lengths, run()
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ["tiny-random-llava", "tinystories-656k"])
def test_masked_variants_replay_from_the_first_masked_position_and_equal_full_forwards(loaded, name):
    from mmlens.methods.explainers import masked_values

    hm, one, setup, masks, full = _masked_case(loaded, name)
    lengths, fast = _block_lengths(hm, lambda: masked_values(hm, one, setup, masks, batch_size=4, pack=False))
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-6)
    assert fast[-2] == setup.value[0] and fast[-1] == fast[0]
    differs = (setup.embeds != setup.baseline).any(-1)[0]  # positions at their baseline change nothing
    firsts = sorted(int((m & differs).nonzero()[0]) for m in masks[:11] if (m & differs).any())
    seq = setup.embeds.shape[1]
    assert lengths == [seq - firsts[i] for i in range(0, len(firsts), 4)]


@pytest.mark.parametrize("name", ["tiny-random-llava", "tinystories-656k"])
def test_masked_variants_packed_as_prefix_trees_equal_full_forwards(loaded, name):
    """``pack=True`` packs the variants as prefix trees: the first block sees one sequence per tree with
    as many positions as the tree has nodes (the first also the row's own last positions, its check),
    fewer than the sorted batches; same numbers. The default chooses by a cost estimate."""
    from mmlens.core.prefix_tree import prefix_trees
    from mmlens.methods.explainers import masked_values

    hm, one, setup, masks, full = _masked_case(loaded, name)
    lengths, packed = _block_lengths(hm, lambda: masked_values(hm, one, setup, masks, batch_size=4, pack=True))
    torch.testing.assert_close(packed, full, rtol=0, atol=1e-6)
    assert packed[-2] == setup.value[0] and packed[-1] == packed[0]
    last, seq = setup.replay.last, setup.embeds.shape[1]
    differs = (setup.embeds != setup.baseline).any(-1)[0]
    reduced = list({(m & differs).numpy().tobytes(): m & differs for m in masks if (m & differs).any()}.values())
    trees = prefix_trees(reduced, last, max(last + 1, min(4 * (last + 1), 512, 2 * setup.embeds.shape[-1])))
    sizes = [len(tree) for tree, _ in trees]
    # the trees share calls of at most min(PACK_TOKENS, 2 d) nodes; the first also runs the row's own last positions
    assert sum(lengths) == sum(sizes) + min(last, 3) + 1 and len(lengths) <= len(sizes)
    assert all(n <= max(min(512, 2 * setup.embeds.shape[-1]), *sizes) + min(last, 3) + 1 for n in lengths)
    firsts = sorted(int(m.nonzero()[0]) for m in reduced)
    assert sum(sizes) < sum(len(firsts[i : i + 4]) * (seq - firsts[i]) for i in range(0, len(firsts), 4))
    if name == "tiny-random-llava":  # d = 64, two blocks: by the cost heuristic, the calls outweigh the savings
        lengths, default = _block_lengths(hm, lambda: masked_values(hm, one, setup, masks, batch_size=4))
        assert lengths == [seq - firsts[i] for i in range(0, len(firsts), 4)] and torch.equal(default, full)
    assert setup.replay.variant_method == "replay + kv, prefix tree"


def test_a_block_that_ignores_the_tree_mask_is_caught_and_variants_are_batched(loaded, monkeypatch):
    """Sabotage: every block gets a plain causal mask over the recorded keys and all nodes (what an
    attention that ignores the given mask would compute). The packing check catches it, the variants
    run in sorted batches instead, the numbers still equal full forwards, and the result says so."""
    import mmlens.core.replay as replay
    from mmlens.methods.explainers import masked_values

    def causal_over_everything(mask, hidden, tree):
        seq, nodes = hidden.shape[1], len(tree)
        allowed = torch.arange(seq + nodes)[None, :] <= (seq + torch.arange(nodes))[:, None]
        return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]

    monkeypatch.setattr(replay, "_tree_mask", causal_over_everything)
    hm, one, setup, masks, full = _masked_case(loaded, "tinystories-656k")
    fast = masked_values(hm, one, setup, masks, batch_size=4, pack=True)
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-6)
    assert setup.replay.variant_method.startswith("replay + kv (no prefix tree: the row's own positions, packed")


def test_masked_positions_already_at_their_baseline_run_nothing(vlm, story):
    """Occluding an input whose modality is already neutral changes nothing: no block runs for those
    variants and their scores are exactly 0; the other modality's scores still equal full forwards."""
    for hm, inputs, neutral in ((story[0], story[1], "text"), (vlm[0], vlm[1], "image")):
        moved = hm.neutral(hm.rows(inputs, 0), neutral)
        setup = prepare(hm, moved, None, "joint")
        calls = []
        block = hm.model.get_submodule(hm.hook_points["lm.blocks.0.resid_pre"].site.module)
        handle = block.register_forward_pre_hook(lambda *args: calls.append(1))
        try:
            scores = explain_row(hm, setup, moved, "occlusion", "joint", {})
        finally:
            handle.remove()
        at = scores.scores[setup.spans.masks[neutral] & ~scores.scores.isnan()]
        assert at.numel() > 0 and at.eq(0).all()
        others = [m for m in scores.modalities if m != neutral]
        assert bool(calls) == bool(others)
        for m in others:
            where = setup.spans.masks[m][0]
            for p in where.nonzero()[:, 0].tolist()[:3]:
                variant = setup.embeds.clone()
                variant[0, p] = setup.baseline[0, p]
                full = setup.value - with_embeds(hm, moved, setup.point, variant, setup.metric)
                torch.testing.assert_close(scores.scores[0, p], full[0].float(), rtol=0, atol=1e-6)


def test_sweeps_of_a_pooling_classifier_fall_back_to_full_forwards(loaded):
    lm = loaded("tiny-fusion")
    hm = mmlens.wrap(lm.model)
    x = lm.example_inputs()
    corruption = mmlens.corrupt(hm, x, "text", "neutral")

    def metric(logits):
        return logits[:, 0]

    fast = mmlens.sweep(hm, x, corruption, metric, hook="lm.blocks.1.resid_pre", axes=("position",), progress=False)
    full = mmlens.sweep(
        hm, x, corruption, metric, hook="lm.blocks.1.resid_pre", axes=("position",), progress=False, replay=False
    )
    assert fast.method == "full forwards"
    assert (fast.table.value - full.table.value).abs().max() == 0
    assert len(fast.table) == int(hm.spans(x).valid.sum())  # every real position of both rows
    assert fast.table[fast.table.modality == "image"].token.str.match(r"<image \d+>$").all()


def test_integrated_gradients_and_occlusion_equal_captum_on_the_fused_embeddings(vlm):
    """Captum (an independent implementation) on f(embeddings) = the metric of a run with the LM's
    input embeddings replaced gives the same attributions, summed over the embedding width."""
    from captum.attr import FeatureAblation, IntegratedGradients

    from mmlens.metrics.desiderata import examples

    hm, inputs = vlm
    one = examples(hm, inputs)[0]
    setup = prepare(hm, one, None, "joint")

    def f(embeds):
        return with_embeds(hm, one, setup.point, embeds, setup.metric, grad=torch.is_grad_enabled())

    ours = explain(hm, one, "integrated_gradients", steps=16, tolerance=None).scores[0]
    theirs = (
        IntegratedGradients(f)
        .attribute(setup.embeds, baselines=setup.baseline, n_steps=16, method="riemann_middle", internal_batch_size=16)
        .sum(-1)[0]
    )
    explained = setup.explained[0]
    torch.testing.assert_close(ours[explained], theirs[explained].float(), rtol=1e-4, atol=1e-6)

    ours = explain(hm, one, "occlusion").scores[0]
    positions = torch.arange(setup.embeds.shape[1])[None, :, None].expand_as(setup.embeds)
    with torch.no_grad():
        theirs = FeatureAblation(f).attribute(
            setup.embeds, baselines=setup.baseline, feature_mask=positions, perturbations_per_eval=8
        )[..., 0][0]
    torch.testing.assert_close(ours[explained], theirs[explained].float(), rtol=1e-4, atol=1e-6)


def test_attention_of_a_pooling_classifier_is_read_from_every_real_position(loaded):
    from mmlens.methods.explainers import _attentions

    lm = loaded("tiny-fusion")
    hm = mmlens.wrap(lm.model)
    x = {k: v[1:] for k, v in lm.example_inputs().items()}  # the row with padding
    assert hm.adapter.readout == "mean"
    weights = torch.stack([a.float().mean(1) for a in _attentions(hm, x)]).mean(0)[0]  # [seq, seq]
    valid = hm.spans(x).valid[0]
    expected = weights[valid].mean(0)
    scores = explain(hm, x, "attention").scores[0]
    torch.testing.assert_close(scores[valid], expected[valid])
    assert scores[~valid].isnan().all()


@pytest.fixture(scope="module")
def fusion(loaded):
    lm = loaded("tiny-fusion")
    return mmlens.wrap(lm.model), {k: v[:1] for k, v in lm.example_inputs().items()}


def test_integrated_gradients_below_the_completeness_tolerance_are_refused_or_refined(fusion):
    hm, one = fusion
    metric = _logprob_of_prediction(hm, one)
    gap = _gap(hm, one, "joint", metric)
    coarse = explain(hm, one, "integrated_gradients", metric=metric, steps=1, tolerance=None)
    assert coarse.info["completeness_error"][0] > 0.01 * abs(gap)  # one step is not enough here
    with pytest.raises(ValueError, match=r"did not converge: completeness error .* at every step count tried \[1\]"):
        explain(hm, one, "integrated_gradients", metric=metric, steps=1, max_steps=1)
    refined = explain(hm, one, "integrated_gradients", metric=metric, steps=1, max_steps=4096)
    error = abs(float(refined.scores.nansum()) - gap)
    assert refined.info["converged"] == [True] and refined.info["guard"] == ["refined"]
    assert refined.info["steps_used"][0] > 1 and error <= 0.01 * abs(gap) + 1e-5
    assert refined.info["completeness_error"][0] == pytest.approx(error, abs=1e-6)
    kept = explain(hm, one, "integrated_gradients", metric=metric, steps=1, max_steps=1, on_failure="record")
    assert kept.info["converged"] == [False] and kept.info["guard"] == ["failed"]


def test_user_explainers_and_controls(fusion):
    hm, one = fusion

    def by_norm(hooked, x, metric, setup):
        return (setup.embeds - setup.baseline).norm(dim=-1)

    direct = explain(hm, one, by_norm)
    assert direct.method == "by_norm" and direct.scores[direct.spans.valid].isfinite().all()
    mmlens.register_explainer("by_norm_test", by_norm, overwrite=True)
    named = explain(hm, one, "by_norm_test")
    assert torch.equal(named.scores.nan_to_num(), direct.scores.nan_to_num()) and named.method == "by_norm_test"
    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        mmlens.register_explainer("by_norm_test", by_norm)
    with pytest.raises(TypeError, match="must be callable"):
        mmlens.register_explainer("not_callable", 3)
    occlusion = explain(hm, one, "occlusion")
    inverted = explain(hm, one, "inverted")
    assert torch.equal(inverted.scores.nan_to_num(), -occlusion.scores.nan_to_num())
    constant = explain(hm, one, "constant").scores
    assert (constant[constant.isfinite()] == 1).all()
    first, again = explain(hm, one, "random").scores, explain(hm, one, "random").scores
    other = explain(hm, one, "random", seed=1).scores
    assert torch.equal(first.nan_to_num(), again.nan_to_num()) and not torch.equal(
        first.nan_to_num(), other.nan_to_num()
    )
    moved = explain(hm, dict(one, pixel_values=one["pixel_values"] + 0.1), "random").scores
    assert not torch.equal(first.nan_to_num(), moved.nan_to_num())  # a changed input draws new noise


def test_batched_setups_fall_back_to_one_row_each_when_their_check_fails(story, monkeypatch):
    """Sabotage: joining rows reverses them, so the batched setup of row 0 is row 1's. The once-per-model
    check catches it; the rows are then prepared one by one (bit for bit ``prepare``), now and later."""
    from mmlens.core.adapter import Adapter
    from mmlens.methods.setups import BATCHED_SETUPS_AGREE, prepare_rows

    hm, inputs = story
    rows = [hm.rows(inputs, 0), hm.neutral(hm.rows(inputs, 0), "text")]
    original = Adapter.join_rows
    monkeypatch.setattr(Adapter, "join_rows", lambda self, rows: original(self, list(rows)[::-1]))
    previous = BATCHED_SETUPS_AGREE.pop(hm.model, None)
    try:
        for _ in range(2):
            setups = prepare_rows(hm, rows, None, "joint")
            assert BATCHED_SETUPS_AGREE[hm.model] is False
            for row, got in zip(rows, setups):
                want = prepare(hm, row, None, "joint")
                assert torch.equal(got.logits, want.logits) and torch.equal(got.embeds, want.embeds)
    finally:
        BATCHED_SETUPS_AGREE.pop(hm.model, None)
        if previous is not None:
            BATCHED_SETUPS_AGREE[hm.model] = previous


def test_a_recording_cut_wrongly_from_a_batch_is_caught(story, monkeypatch):
    """Sabotage: each row's cut recording gets the other row's keys and values. Embeddings and logits
    still agree (they come from the batched run), but replaying the row's last positions does not, so
    the check fails and the rows are prepared one by one."""
    from mmlens.core.replay import BlockReplay
    from mmlens.methods.setups import BATCHED_SETUPS_AGREE, prepare_rows

    hm, inputs = story
    rows = [hm.rows(inputs, 0), hm.neutral(hm.rows(inputs, 0), "text")]
    original = BlockReplay.row

    def swapped(self, r, n):
        out, other = original(self, r, n), original(self, n - 1 - r, n)
        out.recorder.entries = other.recorder.entries
        return out

    monkeypatch.setattr(BlockReplay, "row", swapped)
    previous = BATCHED_SETUPS_AGREE.pop(hm.model, None)
    try:
        setups = prepare_rows(hm, rows, None, "joint")
        assert BATCHED_SETUPS_AGREE[hm.model] is False
        assert torch.equal(setups[0].logits, prepare(hm, rows[0], None, "joint").logits)
    finally:
        BATCHED_SETUPS_AGREE.pop(hm.model, None)
        if previous is not None:
            BATCHED_SETUPS_AGREE[hm.model] = previous


SENTENCES = ("Once upon a time there was a little girl who", "The dog ran to the", "She smiled at the tiny cat and")


def _rows_case(loaded):
    """Three TinyStories rows of different lengths, each prepared alone (separate recordings), with
    occlusion masks and 6 random masks each."""
    lm = loaded("tinystories-656k")
    hm = mmlens.wrap(lm.model, tokenizer=lm.tokenizer)
    rows = [dict(lm.tokenizer([s], return_tensors="pt")) for s in SENTENCES]
    generator = torch.Generator().manual_seed(1)
    jobs = []
    for row in rows:
        setup = prepare(hm, row, None, "joint")
        seq = setup.embeds.shape[1]
        masks = [torch.arange(seq) == p for p in range(seq)] + [
            torch.rand(seq, generator=generator) < 0.4 for _ in range(6)
        ]
        jobs.append((row, setup, masks))
    return hm, jobs


def _full_forwards(hm, row, setup, masks):
    """Float[len(masks)]: each mask's variant of ``row`` by one plain forward with its embeddings."""
    variants = [torch.where(m[None, :, None], setup.baseline, setup.embeds) for m in masks]
    return torch.stack([with_embeds(hm, row, setup.point, v, setup.metric)[0] for v in variants]).float()


def test_masked_variants_of_several_rows_share_calls_and_equal_each_row_alone(loaded):
    """``masked_values_rows`` packs three rows' prefix trees into shared calls of the blocks: fewer
    calls than row by row, each row's values within 1e-6 of its own trees and of full forwards."""
    from mmlens.methods.explainers import masked_values, masked_values_rows

    hm, jobs = _rows_case(loaded)
    calls_alone, alone = _block_lengths(hm, lambda: [masked_values(hm, *job, pack=True) for job in jobs])
    calls_together, together = _block_lengths(hm, lambda: masked_values_rows(hm, jobs, pack=True))
    assert len(calls_together) < len(calls_alone)
    for (row, setup, masks), a, b in zip(jobs, alone, together):
        full = _full_forwards(hm, row, setup, masks)
        torch.testing.assert_close(b, a, rtol=0, atol=2e-6)
        torch.testing.assert_close(b, full, rtol=0, atol=2e-6)  # trees round differently (~1e-6)
        assert setup.replay.variant_method == "replay + kv, prefix tree"


def test_a_forest_mask_that_leaks_across_rows_is_caught(loaded, monkeypatch):
    """Sabotage: each row's nodes also see the other rows' recorded keys. Each recording's first call
    runs its own last positions inside the shared call, which now differ from its run: the check
    fails, the rows fall back, and the values still equal full forwards."""
    import mmlens.core.replay as replay
    from mmlens.methods.explainers import masked_values_rows

    original = replay._block_diagonal

    def leaky(masks, seqs):
        out, total, row, key = original(masks, seqs).clone(), sum(seqs), 0, 0
        for mask, seq in zip(masks, seqs):
            block = out[..., row : row + mask.shape[-2], :total]
            own = block[..., key : key + seq].clone()
            block.fill_(True if block.dtype == torch.bool else 0.0)
            block[..., key : key + seq] = own
            row, key = row + mask.shape[-2], key + seq
        return out

    monkeypatch.setattr(replay, "_block_diagonal", leaky)
    hm, jobs = _rows_case(loaded)
    together = masked_values_rows(hm, jobs, pack=True)
    for (row, setup, masks), got in zip(jobs, together):
        full = _full_forwards(hm, row, setup, masks)
        torch.testing.assert_close(got, full, rtol=0, atol=2e-6)
    verdicts = [setup.replay.variant_method for _, setup, _ in jobs]
    assert any("no prefix tree: the row's own positions, packed" in v for v in verdicts), verdicts


def test_recordings_of_different_wrappers_run_one_by_one(loaded):
    """``forest_refusal`` names why recordings cannot share a call; ``forest_logits`` then runs each
    part alone, with the same numbers as its own ``tree_logits``."""
    from mmlens.core.prefix_tree import prefix_trees
    from mmlens.core.replay import forest_logits, forest_refusal
    from mmlens.methods.explainers import masked_values_rows

    hm, jobs = _rows_case(loaded)
    other = mmlens.wrap(hm.model, tokenizer=hm.tokenizer)
    row, _, masks = jobs[1]
    theirs = prepare(other, row, None, "joint")
    mine = jobs[0][1]
    assert forest_refusal([mine.replay, theirs.replay]) == "recordings of different wrapped models"
    assert forest_refusal([mine.replay, jobs[2][1].replay]) is None
    parts = []
    for setup, own in ((mine, jobs[0][2]), (theirs, masks)):
        last = setup.replay.last
        tree, _ = prefix_trees([m for m in own if m[: last + 1].any()], last, 512)[0]
        h = torch.where(
            (tree.source > 0)[None, :, None], setup.baseline[:, tree.positions], setup.embeds[:, tree.positions]
        )
        parts.append((setup.replay, tree, h))
    together = forest_logits(parts)
    for (engine, tree, h), got in zip(parts, together):
        torch.testing.assert_close(got, engine.tree_logits(h, tree), rtol=0, atol=1e-5)
    assert masked_values_rows(hm, [jobs[0], (row, theirs, masks)], pack=True)[1].shape == (len(masks),)


def test_draws_rebased_on_a_recording_share_its_nodes_and_equal_their_own_runs(loaded):
    """Token swaps of a TinyStories row, rebased on the row's recording: no forward of their own, their
    occlusion (explained with the row's) equals that of their own setups within 2e-6, and the
    first LM block sees fewer positions than explaining each draw from its own recording."""
    from mmlens.methods.explainers import explain_rows, rebased_setups

    lm = loaded("tinystories-656k")
    hm = mmlens.wrap(lm.model, tokenizer=lm.tokenizer)
    row = dict(lm.tokenizer([SENTENCES[0]], return_tensors="pt"))
    setup = prepare(hm, row, None, "joint")
    draws = []
    for p, token in ((3, 11), (7, 42), (9, 5)):
        ids = row["input_ids"].clone()
        ids[0, p] = token
        draws.append({**row, "input_ids": ids})
    rebased = rebased_setups(hm, setup, draws)
    own = [prepare(hm, d, setup.metric, "joint") for d in draws]
    for got, want in zip(rebased, own):
        assert torch.equal(got.embeds, want.embeds) and got.replay is setup.replay
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    shared, together = _block_lengths(
        hm, lambda: explain_rows(hm, [setup, *rebased], [row, *draws], "occlusion", "joint", {"pack": True})
    )
    apart, alone = _block_lengths(
        hm, lambda: explain_rows(hm, [setup, *own], [row, *draws], "occlusion", "joint", {"pack": True})
    )
    assert sum(shared) < sum(apart) - sum(
        len(d["input_ids"][0]) for d in draws
    )  # more saved than the draws' own positions
    for a, b in zip(together, alone):
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=2e-6, equal_nan=True)


def test_a_draw_whose_first_block_call_differs_is_not_rebased(loaded, monkeypatch):
    """A Phi-3 row whose position ids skip 20 positions after the third token has the same layout but
    other rotary tables in its first block call, so ``rebased_setups`` refuses and says why. Sabotage:
    without that check, the rebased logits differ from the row's own run."""
    from mmlens.core.replay import BlockReplay
    from mmlens.methods.explainers import CannotRebase, rebased_setups

    lm = loaded("tiny-random-phi3")
    hm = mmlens.wrap(lm.model, tokenizer=lm.tokenizer)
    clean = hm.rows(lm.example_inputs(), 0)
    positions = torch.arange(clean["input_ids"].shape[1])[None]
    setup = prepare(hm, {**clean, "position_ids": positions}, None, "joint")
    draw = {**clean, "position_ids": torch.where(positions >= 3, positions + 20, positions)}
    with pytest.raises(CannotRebase, match="first LM block call differs"):
        rebased_setups(hm, setup, [draw])
    monkeypatch.setattr(BlockReplay, "matches_first_call", lambda self, hidden, call: True)
    wrong = rebased_setups(hm, setup, [draw])[0]
    want = prepare(hm, draw, setup.metric, "joint")
    assert float((wrong.logits - want.logits).abs().max()) > 1e-3


def test_prepare_rows_runs_one_forward_per_layout_and_checks_its_metrics(story):
    """Rows of two layouts (lengths 6 and 4): one batched forward per layout, each setup equal to
    its row's own ``prepare``; a metric list of the wrong length is refused with the fix."""
    from mmlens.methods.setups import prepare_rows

    hm, inputs = story
    row = hm.rows(inputs, 0)
    short = {k: v[:, :4] for k, v in row.items()}
    six = {k: v[:, :6] for k, v in row.items()}
    rows = [six, short, {**six, "input_ids": six["input_ids"].flip(1)}, short]
    shapes = []
    block = hm.model.get_submodule(hm.hook_points["lm.blocks.0.resid_pre"].site.module)
    handle = block.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple((args[0] if args else kwargs["hidden_states"]).shape[:2])),
        with_kwargs=True,
    )
    try:
        setups = prepare_rows(hm, rows, None, "joint")
    finally:
        handle.remove()
    assert sorted(s for s in shapes if s[0] > 1) == [(2, 4), (2, 6)]  # one batched forward per layout
    for r, got in zip(rows, setups):
        want = prepare(hm, r, None, "joint")
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="got 1 metrics for 4 rows"):
        prepare_rows(hm, rows, [None], "joint")
