"""The cross-modal logit lens, nearest-token decodings, evolution metrics and the tuned lens."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import mmlens
from mmlens.core.replay import BlockReplay, record_points
from mmlens.core.unembed import Unembed
from mmlens.methods.evolution import bootstrap_ci, condition_tables, evolution
from mmlens.methods.lens import (
    TunedLens,
    compare_lenses,
    decode_encoder_layers,
    decode_soft_tokens,
    logit_lens,
    nearest_tokens,
    residual_points,
)

LENS_MODELS = ["tinystories-656k", "tea-glm-tiny", "tiny-random-llava", "tiny-random-idefics3", "tiny-random-gpt2"]


def _wrapped(loaded, name):
    lm = loaded(name)
    return mmlens.HookedModel(lm.model, tokenizer=lm.tokenizer, processor=lm.processor), lm.example_inputs()


@pytest.mark.parametrize("name", LENS_MODELS)
def test_final_layer_is_the_models_own_logits(loaded, name):
    hm, inputs = _wrapped(loaded, name)
    plain = hm.model(**inputs).logits
    run = hm.run(inputs, cache=residual_points(hm))
    assert torch.equal(Unembed(hm)(run.cache[residual_points(hm)[-1]]), plain)

    result = logit_lens(hm, inputs, k=4, shared_prefix=False)
    assert result.forward == "plain forward (shared_prefix=False)"
    valid = result.spans.valid
    top_p, top_i = plain.float().log_softmax(-1).exp().topk(4, dim=-1)
    assert torch.equal(result.top_ids[-1][valid], top_i[valid])
    assert torch.equal(result.top_probs[-1][valid], top_p[valid])
    assert torch.equal(result.kl_to_final[-1][valid], torch.zeros(int(valid.sum())))
    fast = logit_lens(hm, inputs, k=4)  # rows sharing a prompt prefix record it once
    torch.testing.assert_close(fast.top_probs[:, valid], result.top_probs[:, valid], rtol=1e-4, atol=1e-5)


def test_intermediate_layer_matches_a_hand_decoding(tinystories):
    hm, inputs = tinystories
    result = logit_lens(hm, inputs, k=3, targets=[5, 7])
    run = hm.run(inputs, cache=True)
    model = hm.model
    logits = model.lm_head(model.model.norm(run.cache["lm.blocks.0.resid_post"])).float()
    final = run.logits.float().log_softmax(-1)
    logp = logits.log_softmax(-1)
    layer = result.layers.index("0")
    assert result.hooks[layer] == "lm.blocks.0.resid_post" and result.layers[0] == "embed"
    torch.testing.assert_close(result.top_probs[layer], logp.exp().topk(3, dim=-1).values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.entropy[layer], -(logp.exp() * logp).sum(-1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.kl_to_final[layer], (final.exp() * (final - logp)).sum(-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(result.target_probs[layer], logp.exp()[..., [5, 7]], rtol=1e-5, atol=1e-7)
    expected_rank = (logits[..., None, :] > logits[..., [5, 7]][..., None]).sum(-1)
    assert torch.equal(result.target_ranks[layer], expected_rank)
    h1, h0 = run.cache["lm.blocks.1.resid_post"], run.cache["lm.blocks.0.resid_post"]
    torch.testing.assert_close(result.cosine_to_previous[2], torch.cosine_similarity(h1, h0, dim=-1))
    assert torch.isnan(result.cosine_to_previous[0]).all()


def test_graph_positions_are_labelled_and_can_be_decoded_alone(loaded):
    hm, inputs = _wrapped(loaded, "tea-glm-tiny")
    graph = inputs["input_ids"] == hm.model.graph_token_id
    full = logit_lens(hm, inputs, k=2)
    assert full.top_ids.shape == (len(residual_points(hm)), *inputs["input_ids"].shape, 2)
    for row in range(graph.shape[0]):
        labels = full.modalities[row]
        assert [p for p, m in enumerate(labels) if m == "graph"] == graph[row].nonzero().flatten().tolist()
        assert [full.tokens[row][p] for p in graph[row].nonzero().flatten().tolist()] == [
            f"<graph {k}>" for k in range(int(graph[row].sum()))
        ]
    only = logit_lens(hm, inputs, k=2, positions="graph")
    assert torch.equal(only.decoded, graph)
    assert torch.equal(only.top_ids[:, graph], full.top_ids[:, graph])
    assert (only.top_ids[:, ~graph] == -1).all() and torch.isnan(only.entropy[:, ~graph]).all()
    table = only.table(k=2)
    assert len(table) == len(only.layers) * int(graph.sum())
    assert set(table.modality) == {"graph"} and {"top1", "top2", "top2_prob", "kl_to_final"} <= set(table.columns)


def test_target_strings_must_be_single_tokens(tinystories, loaded):
    hm, inputs = tinystories
    with pytest.raises(ValueError, match="tokens"):
        logit_lens(hm, inputs, targets=["a very long target word"])


def test_models_without_an_unembedding_are_refused(loaded):
    lm = loaded("tiny-fusion")
    adapter = mmlens.Adapter(
        name="no-head",
        architectures=("FusionTransformer",),
        stacks=(mmlens.Stack(prefix="lm", stage="lm", modality=None, blocks="joint_blocks", layout=None),),
        points=(),
        spans=lambda model, inputs: mmlens.hooks.find_adapter(model).spans(model, inputs),
        required_inputs=("input_ids",),
    )
    hm = mmlens.HookedModel(lm.model, adapter)
    with pytest.raises(KeyError, match="lm.final_norm"):
        logit_lens(hm, lm.example_inputs())


def test_nearest_tokens_finds_embedding_rows(tinystories):
    hm, _ = tinystories
    weight = hm.model.get_input_embeddings().weight
    ids, cos = nearest_tokens(hm, weight[[10, 200]] * 3.0, k=3)
    assert ids[:, 0].tolist() == [10, 200]
    torch.testing.assert_close(cos[:, 0], torch.ones(2))
    assert (cos[:, 1:] <= cos[:, :1]).all()
    with pytest.raises(ValueError, match="width"):
        nearest_tokens(hm, torch.zeros(2, 7))


def test_soft_tokens_and_gnn_layers_decode_through_the_projector(loaded):
    hm, inputs = _wrapped(loaded, "tea-glm-tiny")
    model = hm.model
    weight = model.lm.get_input_embeddings().weight
    chosen = torch.tensor([11, 22, 33, 44, 55])
    saved = {k: v.clone() for k, v in model.projector.state_dict().items()}
    try:
        with torch.no_grad():
            model.projector.weight.zero_()
            model.projector.bias.copy_(weight[chosen].flatten())
        soft = decode_soft_tokens(hm, inputs, k=2)
        assert set(soft.modality) == {"graph"}
        best = soft[soft["rank"] == 0]
        assert best.token_id.tolist() == chosen.tolist() * inputs["input_ids"].shape[0]
        assert torch.allclose(torch.tensor(best.cosine.tolist()), torch.ones(len(best)))
    finally:
        model.projector.load_state_dict(saved)
    layers = decode_encoder_layers(hm, inputs, k=3)
    assert sorted(layers.layer.unique()) == list(range(len(model.gnn.convs)))
    last = layers[(layers.layer == len(model.gnn.convs) - 1) & (layers["rank"] == 0)]
    soft = decode_soft_tokens(hm, inputs, k=3)
    assert last.token_id.tolist() == soft[soft["rank"] == 0].token_id.tolist()


def test_vision_layers_decode_to_one_row_per_image_token(llava):
    hm, inputs = llava
    table = decode_encoder_layers(hm, inputs, k=2)
    n_image_tokens = int((inputs["input_ids"][0] == hm.model.config.image_token_id).sum())
    assert table.slot.nunique() == n_image_tokens
    assert table["item"].nunique() == inputs["pixel_values"].shape[0]
    assert table.layer.nunique() == hm.model.config.vision_config.num_hidden_layers


def test_bootstrap_interval_brackets_the_mean():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])
    mean, low, high = bootstrap_ci(values, n_boot=500, seed=1)
    assert mean == pytest.approx(4.0) and low < mean < high
    assert bootstrap_ci(torch.full((6,), 2.0)) == (2.0, 2.0, 2.0)


def test_evolution_metrics_on_a_constructed_result(loaded):
    hm, inputs = _wrapped(loaded, "tea-glm-tiny")
    result = logit_lens(hm, inputs, k=1)
    graph = result.spans.masks["graph"]
    n_layer = result.top_ids.shape[0]
    text = result.spans.masks["text"] & result.decoded
    # graph cells: the same top-1 at every layer; text cells: a new top-1 at every layer, the final
    # one appearing only at the last layer.
    result.top_ids[:, graph] = 7
    result.top_ids[:, text] = torch.arange(n_layer)[:, None, None].expand(-1, *text.shape)[:, text][..., None]
    evo = evolution(result, ["graph", "text"], n_boot=200)
    summary = evo.summary.set_index(["modality", "metric"])["mean"]
    assert summary["graph", "top1_change"] == 0.0 and summary["text", "top1_change"] == 1.0
    assert summary["graph", "first_final_top1_layer"] == 0.0
    assert summary["text", "first_final_top1_layer"] == n_layer - 1
    compare = evo.compare("graph", "text").set_index("metric")
    assert compare.loc["top1_change", "a_evolves_less"] and compare.loc["first_final_top1_layer", "a_evolves_less"]
    curves = evo.curves[evo.curves.metric == "top1_change"]
    assert set(curves.layer) == set(range(1, n_layer))
    assert ((curves.low <= curves["mean"]) & (curves["mean"] <= curves.high)).all()
    with pytest.raises(KeyError, match="image"):
        evolution(result, ["image"])


def test_identity_tuned_lens_equals_the_logit_lens_and_training_lowers_kl(tinystories, tmp_path):
    hm, inputs = tinystories
    tuned = TunedLens.for_model(hm)
    plain = logit_lens(hm, inputs, k=3)
    same = logit_lens(hm, inputs, k=3, tuned=tuned)
    assert same.lens == "tuned"
    assert torch.equal(same.top_ids, plain.top_ids) and torch.equal(same.kl_to_final, plain.kl_to_final)
    losses = tuned.fit(hm, [inputs], steps=30, tokens_per_step=16, lr=3e-3, progress=False)
    assert losses[-1] < losses[0]
    trained = logit_lens(hm, inputs, k=3, tuned=tuned)
    table = compare_lenses(plain, trained)
    assert (table.kl_tuned < table.kl_logit).all() and (table.reduction > 0).all()
    assert torch.equal(trained.top_ids[-1], plain.top_ids[-1])
    path = tuned.save(tmp_path / "tuned.pt")
    again = logit_lens(hm, inputs, k=3, tuned=TunedLens.load(path))
    assert torch.equal(again.top_probs, trained.top_probs)
    assert not math.isnan(float(table.kl_tuned.mean()))


@pytest.mark.parametrize("final_norm", [False, "naive"])
def test_unnormed_lens_variants_equal_lm_head_by_hand_at_every_layer(tinystories, final_norm):
    hm, inputs = tinystories
    names = residual_points(hm)
    run = hm.run(inputs, cache=names)
    head, norm = hm.model.lm_head, hm.model.model.norm
    result = logit_lens(hm, inputs, k=3, final_norm=final_norm)
    assert result.lens == {False: "logit-raw", "naive": "logit-naive"}[final_norm]
    last = len(names) - 1
    decoded = [
        (norm(run.cache[n]) if final_norm == "naive" and i == last else run.cache[n]) for i, n in enumerate(names)
    ]
    logp = torch.stack([head(h).float().log_softmax(-1) for h in decoded])
    valid = result.spans.valid
    for layer in range(len(names)):
        top_logp, top_i = logp[layer].topk(3, dim=-1)  # raw logits underflow exp: rank by log-probability
        top_p = top_logp.exp()
        assert torch.equal(result.top_ids[layer][valid], top_i[valid]), layer
        torch.testing.assert_close(result.top_probs[layer][valid], top_p[valid], rtol=1e-5, atol=1e-6)
        kl = (logp[-1].exp() * (logp[-1] - logp[layer])).sum(-1).clamp_min(0)
        torch.testing.assert_close(result.kl_to_final[layer][valid], kl[valid], rtol=1e-4, atol=1e-4)
    normed = logit_lens(hm, inputs, k=3)
    assert not torch.equal(normed.top_probs[0], result.top_probs[0])
    if final_norm == "naive":
        assert torch.equal(result.top_ids[-1], normed.top_ids[-1])
    with pytest.raises(ValueError, match="final_norm"):
        logit_lens(hm, inputs, final_norm="sometimes")
    with pytest.raises(ValueError, match="tuned lens"):
        logit_lens(hm, inputs, final_norm=final_norm, tuned=TunedLens.for_model(hm))


def test_balanced_tuned_lens_sees_every_modality_equally_and_records_each_curve(loaded):
    from mmlens.training.loop import StratifiedRowOrder

    groups = torch.tensor([0] * 5 + [1] * 95)
    order = StratifiedRowOrder(groups, 8, torch.Generator().manual_seed(0))
    drawn = torch.stack([order.next() for _ in range(50)])
    assert (groups[drawn].sum(1) == 4).all()  # 4 of each group per batch although group 0 is 5% of rows
    with pytest.raises(ValueError, match="batch_size"):
        StratifiedRowOrder(torch.tensor([0, 1, 2]), 2, torch.Generator())
    hm, inputs = _wrapped(loaded, "tea-glm-tiny")
    tuned = TunedLens.for_model(hm)
    loss = tuned.fit(
        hm,
        [inputs],
        steps=6,
        tokens_per_step=8,
        positions=lambda x: x["attention_mask"].bool(),
        balance=True,
        progress=False,
    )
    assert len(loss) == 6 and set(tuned.history) == {"loss", "kl_graph", "kl_text"}
    assert all(math.isfinite(v) for v in tuned.history["kl_graph"])
    assert tuned.history["loss"][-1] < tuned.history["loss"][0]


def test_lens_variants_from_one_forward_equal_each_variant_alone(loaded):
    hm, inputs = _wrapped(loaded, "tea-glm-tiny")
    slots = torch.randn(inputs["input_ids"].shape[0], 5, hm.model.lm.config.hidden_size)
    edits = [mmlens.replace("fusion.embeds", slots, at="graph")]
    shared = mmlens.logit_lens_variants(hm, inputs, k=2, targets=[1, 2], positions="graph", edits=edits)
    assert set(shared) == {True, False, "naive"}
    for variant, result in shared.items():
        alone = logit_lens(hm, inputs, k=2, targets=[1, 2], positions="graph", edits=edits, final_norm=variant)
        assert result.lens == alone.lens
        for field in ("top_ids", "top_probs", "entropy", "kl_to_final", "target_probs", "target_ranks"):
            a, b = getattr(result, field), getattr(alone, field)
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"{variant} {field}")
    assert not torch.equal(shared[False].kl_to_final, shared["naive"].kl_to_final)  # same reading, other final
    with pytest.raises(TypeError, match="final_norm"):
        mmlens.logit_lens_variants(hm, inputs, final_norm=True)
    with pytest.raises(ValueError, match="variants"):
        mmlens.logit_lens_variants(hm, inputs, ())


def test_evolution_layers_drops_the_embedding_row(loaded):
    hm, inputs = _wrapped(loaded, "tea-glm-tiny")
    result = logit_lens(hm, inputs, k=1)
    n_layer = len(result.layers)
    full = evolution(result, ["graph", "text"], n_boot=50)
    rest = evolution(result, ["graph", "text"], layers=result.layers[1:], n_boot=50)
    assert 0 in set(full.per_layer.layer) and 0 not in set(rest.per_layer.layer)
    kl = rest.per_layer[rest.per_layer.metric == "kl_to_final"]
    assert set(kl.layer) == set(range(1, n_layer - 1))
    assert set(rest.per_layer[rest.per_layer.metric == "top1_change"].layer) == set(range(2, n_layer))
    mask = result.spans.masks["graph"] & result.decoded
    expected = result.kl_to_final[1:-1][:, 0, mask[0]].mean(-1).mean()
    got = rest.per_input.query("input == 0 and modality == 'graph' and metric == 'kl_to_final'").value.item()
    assert got == pytest.approx(float(expected), rel=1e-6)
    assert (rest.per_input.query("metric == 'first_final_top1_layer'").value >= 1).all()
    assert evolution(result, ["graph"], layers=[1, 2], n_boot=10).per_layer.layer.max() == 2
    with pytest.raises(ValueError, match="contiguous"):
        evolution(result, ["graph"], layers=[0, 2])


def test_large_blocks_stay_mapped_on_glibc():
    import ctypes
    import platform

    from mmlens.core.memory import keep_large_blocks_mapped

    glibc = platform.libc_ver()[0] == "glibc"
    assert keep_large_blocks_mapped() is glibc
    if glibc:  # once set, the threshold stays fixed (mallopt accepts the same value again)
        assert ctypes.CDLL(None).mallopt(-3, 4 * 2**20) == 1


def test_condition_tables_are_the_evolution_of_each_variant_alone(loaded):
    hm, inputs = _wrapped(loaded, "tea-glm-tiny")
    slots = torch.randn(inputs["input_ids"].shape[0], 5, hm.model.lm.config.hidden_size)
    edits = [mmlens.replace("fusion.embeds", slots, at="graph")]
    tables = condition_tables(hm, inputs, "graph", "control", slots=slots, variants=(True, False), with_text=False)
    own = condition_tables(hm, inputs, "graph", "graph", variants=("naive",), n_boot=50)
    for variant in (True, False):
        alone = logit_lens(hm, inputs, k=1, positions="graph", edits=edits, final_norm=variant)
        for rows, layers in (("all_layers", None), ("no_embedding_row", alone.layers[1:])):
            expected = evolution(alone, ["graph"], layers=layers, n_boot=50).per_input
            per_input, per_layer = tables[variant][rows]
            assert set(per_input.modality) == {"control"} == set(per_layer.modality)  # only the slots, renamed
            pd.testing.assert_frame_equal(per_input.drop(columns="modality"), expected.drop(columns="modality"))
    assert set(own["naive"]["all_layers"][0].modality) == {"graph", "text"}
    plain = evolution(logit_lens(hm, inputs, k=1, final_norm="naive"), ["graph", "text"], n_boot=50).per_input
    pd.testing.assert_frame_equal(own["naive"]["all_layers"][0], plain)


def test_lens_result_saved_and_loaded_is_the_same_result(loaded, tmp_path):
    hm, inputs = _wrapped(loaded, "tea-glm-tiny")
    result = logit_lens(hm, inputs, k=2, targets=[1, 2], positions="graph")
    again = type(result).load(result.save(tmp_path / "lens.pt"), hm, inputs)
    for field in type(result).TENSOR_FIELDS:
        torch.testing.assert_close(getattr(again, field), getattr(result, field), rtol=0, atol=0, equal_nan=True)
    assert (again.lens, again.layers, again.tokens, again.modalities) == (
        result.lens,
        result.layers,
        result.tokens,
        result.modalities,
    )
    pd.testing.assert_frame_equal(again.table(k=2), result.table(k=2))
    fewer = {k: v[:1] if k in ("input_ids", "attention_mask", "node_ids") else v for k, v in inputs.items()}
    ids = inputs["input_ids"].clone()
    ids[:, 1] += 1  # a text token (position 0 is BOS): same shape, other tokens
    other = {**inputs, "input_ids": ids}
    for wrong in (fewer, other):
        with pytest.raises(ValueError, match="other inputs"):
            type(result).load(tmp_path / "lens.pt", hm, wrong)


def test_logit_lens_progress_bar_counts_the_decoded_chunks(loaded, capsys):
    hm, inputs = _wrapped(loaded, "tea-glm-tiny")
    logit_lens(hm, inputs, k=1, progress=True, max_chunk_mb=0.01)
    assert "logit lens: decoding" in capsys.readouterr().err


def test_shared_prefix_recording_falls_back_to_the_plain_forward_and_says_why(loaded, monkeypatch):
    """TEA-GLM prompts share their instruction: recorded once, equal to the plain forward within 1e-4.
    An edit inside the LM blocks, or a replay that goes wrong (caught by the one-row check), gives the
    plain forward bit for bit, with the reason in the method."""
    hm, inputs = _wrapped(loaded, "tea-glm-tiny")
    names = residual_points(hm)
    plain = hm.run(inputs, cache=names).cache
    valid = hm.spans(inputs).valid
    cache, method = record_points(hm, inputs, names)
    assert method.startswith("shared prefix: positions 0..") and "checked on row" in method, method
    for n in names:
        torch.testing.assert_close(cache[n][valid], plain[n][valid], rtol=1e-4, atol=1e-5)
    _, method = record_points(hm, inputs, names, [mmlens.add("lm.blocks.0.resid_post", 0.0)])
    assert method == "plain forward (an edit inside the LM blocks)"
    original = BlockReplay.run_blocks
    monkeypatch.setattr(
        BlockReplay, "run_blocks", lambda self, h, block, start=0: original(self, h + 1.0, block, start)
    )
    cache, method = record_points(hm, inputs, names)
    assert method.startswith("plain forward (the shared-prefix recording of row"), method
    assert all(torch.equal(cache[n], plain[n]) for n in names)


def test_rows_with_different_block_arguments_are_not_replayed_from_one_row(loaded):
    """Rows whose first-block arguments differ (e.g. per-row rotary positions) cannot share one row's
    keys and values: the check names the argument; broadcast (batch-1) arguments are shared."""
    hm, inputs = _wrapped(loaded, "tinystories-656k")
    x = hm.repeat(hm.rows(inputs, 0), 3)
    engine = BlockReplay(hm)
    h0, call = engine.first_block_call(x)
    assert h0.shape[0] == 3 and engine.rows_disagree(call, 3) is None
    cos, sin = call["position_embeddings"]
    rows = (cos.expand(3, -1, -1).clone(), sin.expand(3, -1, -1).clone())
    assert engine.rows_disagree({**call, "position_embeddings": rows}, 3) is None
    rows[0][2, -1] += 1.0
    assert engine.rows_disagree({**call, "position_embeddings": rows}, 3) == "position_embeddings"


def test_shared_prefix_refusals_end_to_end_give_the_plain_forward(loaded):
    """Rows that share their first 12 positions but (a) are padded on the left, or (b) get per-row
    rotary positions (the model's own ``position_ids`` input), are not recorded from one row: the plain
    forward, bit for bit, with the reason."""
    hm, inputs = _wrapped(loaded, "tinystories-656k")
    names = ["lm.blocks.0.resid_post", "lm.blocks.1.resid_post"]
    x = hm.repeat(hm.rows(inputs, 0), 3)
    seq = x["input_ids"].shape[1]
    _, method = record_points(hm, x, names, min_prefix=4)
    assert method.startswith("shared prefix"), method  # the control: these rows do share a prefix
    left = {**x, "attention_mask": x["attention_mask"].clone()}
    left["attention_mask"][1, 0] = 0
    shifted = {**x, "position_ids": torch.arange(seq).repeat(3, 1) + torch.tensor([[0], [0], [1]])}
    for case, why in (
        (left, "padding not only at the ends of rows"),
        (shifted, "differ in the first block's argument"),
    ):
        plain = hm.run(case, cache=names).cache
        cache, method = record_points(hm, case, names, min_prefix=4)
        assert method.startswith("plain forward (") and why in method, method
        assert all(torch.equal(cache[n], plain[n]) for n in names)
