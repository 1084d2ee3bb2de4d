"""Qwen2-VL / Qwen2.5-VL / Gemma3: packed inputs split into rows, attention semantics that are a fact
of the inputs, Gemma's post-norm branches, and M-RoPE sequence arguments in replay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mmlens
from mmlens.core.adapter import MROPE_SEQUENCE_KWARGS, Adapter, BlockLayout, language_model
from mmlens.core.spans import spans_from_token_ids
from mmlens.data.tiny_qwen_gemma import gemma3_inputs, qwen_inputs
from mmlens.methods.explainers import explain
from mmlens.methods.patching import corrupt, logit_diff, sweep


def _metric(hm, inputs):
    logits = hm.readout_logits(hm.run(inputs).logits, inputs)[0]
    return logit_diff(*logits.topk(2).indices.tolist())


# -- finding 4: packed pixel_values without a batch axis -------------------------------------------------


@pytest.fixture(scope="module")
def qwen(loaded):
    hm = mmlens.wrap(loaded("tiny-random-qwen2-vl").model)
    # row 0: one 4x4 image (4 tokens); row 1: a 4x6 and a 2x4 image (6 + 2 tokens), so rows differ
    return hm, qwen_inputs(3, [[(1, 4, 4)], [(1, 4, 6), (1, 2, 4)]])


def test_rows_of_packed_patches_are_the_rows_of_the_batch(qwen):
    hm, inputs = qwen
    batch = hm.run(inputs).logits
    for row, n_patches in ((0, 16), (1, 24 + 8)):
        one = hm.rows(inputs, row)
        assert one["pixel_values"].shape[0] == n_patches and one["image_grid_thw"].shape[0] == row + 1
        real = inputs["attention_mask"][row].bool()
        alone = hm.run(one).logits[0, : int(real.sum())]
        assert (alone - batch[row, real]).abs().max() < 1e-5
    tripled = hm.repeat(hm.rows(inputs, 1), 3)
    assert tripled["pixel_values"].shape[0] == 3 * 32 and tripled["image_grid_thw"].shape[0] == 6
    logits = hm.run(tripled).logits
    assert (logits - logits[:1]).abs().max() < 1e-5
    assert torch.equal(hm.rows(inputs, [1, 0])["image_grid_thw"], inputs["image_grid_thw"][[1, 2, 0]])


def test_sweep_and_occlusion_run_on_packed_inputs(qwen):
    hm, inputs = qwen
    clean = hm.rows(inputs, 1)
    corrupted = corrupt(hm, clean, "image", "neutral")
    metric = _metric(hm, clean)
    kw = {"hook": "resid_pre", "axes": ("layer", "position"), "skip_unchanged": False, "progress": False}
    fast = sweep(hm, clean, corrupted, metric, batch_size=4, **kw)
    slow = sweep(hm, clean, corrupted, metric, replay=False, **kw)
    assert fast.method == "replay + kv" and slow.method == "full forwards"
    assert (fast.table.value - slow.table.value).abs().max() < 1e-4
    occlusion = explain(hm, inputs, "occlusion", mode="image")
    assert [f.removesuffix(", prefix tree") for f in occlusion.info["forwards"]] == ["replay + kv", "replay + kv"]
    assert torch.isfinite(occlusion.masked("image")).all()


def test_a_row_split_that_does_not_match_the_placeholders_raises(qwen):
    hm, inputs = qwen
    short = {**inputs, "pixel_values": inputs["pixel_values"][:-8], "image_grid_thw": inputs["image_grid_thw"][:-1]}
    with pytest.raises(ValueError, match="image_grid_thw"):
        hm.rows(short, 0)


def test_qwen2_5_vl_encoder_lens_projection_matches_the_model(loaded):
    lm = loaded("tiny-random-qwen2.5-vl")
    hm = mmlens.wrap(lm.model)
    inputs = lm.example_inputs()
    run = hm.run(inputs, cache=["vision.blocks.1.resid_post", "fusion.embeds"])
    tokens = hm.adapter.project_encoder(lm.model, inputs, run.cache["vision.blocks.1.resid_post"])
    assert tokens.shape == (2, 4, 64)
    assert (tokens.flatten(0, 1) - run.cache["fusion.embeds", "image"].flatten(0, 1)).abs().max() < 1e-5


# -- finding 5: Gemma3's image tokens attend to each other both ways ------------------------------------


@pytest.fixture(scope="module")
def gemma(loaded):
    lm = loaded("tiny-random-gemma3")
    return mmlens.wrap(lm.model), lm.example_inputs()


@pytest.mark.parametrize("batch_size", [1, 3])
def test_gemma3_sweep_does_not_reuse_keys_and_values_across_image_tokens(gemma, batch_size):
    hm, inputs = gemma
    clean = hm.rows(inputs, 0)
    corrupted = hm.rows(gemma3_inputs(5), 0)
    corrupted["input_ids"] = clean["input_ids"]  # same prompt, another image
    metric = _metric(hm, clean)
    kw = {"hook": "resid_pre", "axes": ("layer", "position"), "skip_unchanged": False, "progress": False}
    fast = sweep(hm, clean, corrupted, metric, batch_size=batch_size, **kw)
    slow = sweep(hm, clean, corrupted, metric, replay=False, **kw)
    assert (fast.table.value - slow.table.value).abs().max() < 1e-4
    assert "no kv reuse" in fast.method and fast.method.startswith("replay")


def test_gemma3_occlusion_equals_full_forwards_and_says_how_it_ran(gemma):
    hm, inputs = gemma
    one = hm.rows(inputs, 0)
    metric = _metric(hm, one)
    result = explain(hm, one, "occlusion", mode="image", metric=metric)
    assert result.info["forwards"] == [f"replay ({mmlens.core.replay.NOT_CAUSAL})"]
    setup_value = float(result.value[0])
    neutral = hm.neutral(one, "image")
    point = "fusion.embeds"
    embeds = hm.run(one, cache=point).cache[point]
    reference = hm.run(neutral, cache=point).cache[point]
    image = hm.spans(one).masks["image"][0].nonzero()[:, 0].tolist()
    for p in image:
        edited = embeds.clone()
        edited[0, p] = reference[0, p]
        out = hm.run(one, edits=[mmlens.replace(point, edited)])
        value = float(metric(hm.readout_logits(out.logits, one))[0])
        assert abs(float(result.scores[0, p]) - (setup_value - value)) < 1e-4


def test_gemma3_causality_is_a_fact_of_the_inputs(gemma):
    hm, inputs = gemma
    assert not hm.adapter.is_causal(inputs)
    assert hm.adapter.is_causal({k: v for k, v in inputs.items() if k != "token_type_ids"})


# -- finding 9: Gemma's post-norm branches ----------------------------------------------------------------


def test_gemma3_block_points_are_what_the_block_adds(gemma):
    hm, inputs = gemma
    clean = hm.run(inputs, cache=True)
    c = clean.cache
    for layer in range(2):
        name = f"lm.blocks.{layer}"
        assert torch.equal(c[f"{name}.resid_mid"], c[f"{name}.resid_pre"] + c[f"{name}.attn_out"])
        assert torch.equal(c[f"{name}.resid_post"], c[f"{name}.resid_mid"] + c[f"{name}.mlp_out"])
    replayed = hm.run(inputs, edits=[mmlens.replace(n, c[n]) for n in hm.hook_points])
    assert torch.equal(replayed.logits, clean.logits)


def test_gemma3_writes_at_each_kind_of_point_propagate_as_by_hand(gemma):
    hm, inputs = gemma
    block = hm.model.model.language_model.layers[0]
    c = hm.run(inputs, cache=True).cache
    watch = ["lm.blocks.0.resid_mid", "lm.blocks.0.mlp_out", "lm.blocks.0.resid_post"]
    x = c["lm.blocks.0.resid_mid"] * 1.5
    run = hm.run(inputs, edits=[mmlens.replace("lm.blocks.0.resid_mid", x)], cache=watch)
    mlp = block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(x)))
    assert torch.allclose(run.cache["lm.blocks.0.mlp_out"], mlp, atol=1e-6)
    assert torch.equal(run.cache["lm.blocks.0.resid_post"], x + run.cache["lm.blocks.0.mlp_out"])
    a = c["lm.blocks.0.attn_out"] * -2.0
    run = hm.run(inputs, edits=[mmlens.replace("lm.blocks.0.attn_out", a)], cache=watch)
    assert torch.equal(run.cache["lm.blocks.0.resid_mid"], c["lm.blocks.0.resid_pre"] + a)
    m = torch.randn_like(c["lm.blocks.0.mlp_out"])
    run = hm.run(inputs, edits=[mmlens.replace("lm.blocks.0.mlp_out", m)], cache=watch)
    assert torch.equal(run.cache["lm.blocks.0.resid_post"], c["lm.blocks.0.resid_mid"] + m)


# -- finding 6: M-RoPE sequence arguments in replay -------------------------------------------------------


class _MRopeBlock(nn.Module):
    """Causal attention whose queries/keys get M-RoPE-like terms: ``position_ids [3, b, seq]`` and
    ``position_embeddings = (a, b)``, each ``[3, b, seq, d]``; keys/values go through a cache."""

    def __init__(self, d: int, layer: int):
        super().__init__()
        self.layer = layer
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.post_attention_layernorm = nn.LayerNorm(d)
        self.mlp = nn.Linear(d, d)
        self.self_attn = nn.Identity()

    def forward(self, hidden_states, position_ids, position_embeddings, attention_mask=None, past_key_values=None):
        h = self.norm(hidden_states)
        pos = position_ids.float().sum(0)[..., None] / 10
        q = self.q(h) + position_embeddings[0].sum(0) + pos
        k = self.k(h) + position_embeddings[1].sum(0)
        v = self.v(h)
        if past_key_values is not None:
            k, v = past_key_values.update(k[:, None], v[:, None], self.layer)
            k, v = k[:, 0], v[:, 0]
        scores = q @ k.transpose(-1, -2) / k.shape[-1] ** 0.5
        if attention_mask is None:
            seq = scores.shape[-1]
            attention_mask = torch.full((seq, seq), float("-inf")).triu(1)
        else:
            attention_mask = attention_mask[0, 0]
        mid = hidden_states + self.self_attn(self.o((scores + attention_mask).softmax(-1) @ v))
        return mid + self.mlp(self.post_attention_layernorm(mid))


class _MRopeLM(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 16):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.pos_a, self.pos_b = nn.Embedding(64, d), nn.Embedding(64, d)
        self.layers = nn.ModuleList([_MRopeBlock(d, i) for i in range(2)])
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, input_ids):
        b, seq = input_ids.shape
        base = torch.arange(seq).expand(b, seq)
        position_ids = torch.stack([base, base // 2, base % 3])  # [3, b, seq]
        cos_sin = (self.pos_a(position_ids), self.pos_b(position_ids))  # each [3, b, seq, d]
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, position_ids=position_ids, position_embeddings=cos_sin)
        return self.lm_head(self.norm(h))


def test_replay_cuts_mrope_arguments_on_the_adapters_axes():
    torch.manual_seed(0)
    model = _MRopeLM().eval()
    stack, points = language_model(base="", logits="lm_head", layout=BlockLayout(attn_out_proj="o"), n_heads=None)
    adapter = Adapter(
        name="mrope-toy",
        architectures=("_MRopeLM",),
        stacks=(stack,),
        points=points,
        spans=lambda model, inputs: spans_from_token_ids(inputs["input_ids"], None, {}),
        sequence_kwargs=MROPE_SEQUENCE_KWARGS,
    )
    hm = mmlens.wrap(model, adapter=adapter)
    clean = {"input_ids": torch.randint(0, 32, (1, 9), generator=torch.Generator().manual_seed(1))}
    corrupted = {"input_ids": clean["input_ids"].roll(1, dims=1)}
    metric = _metric(hm, clean)
    kw = {"hook": "resid_pre", "axes": ("layer", "position"), "skip_unchanged": False, "progress": False}
    fast = sweep(hm, clean, corrupted, metric, batch_size=4, **kw)
    slow = sweep(hm, clean, corrupted, metric, replay=False, **kw)
    assert fast.method == "replay + kv"
    assert (fast.table.value - slow.table.value).abs().max() < 1e-4


def test_join_is_the_inverse_of_rows_for_packed_inputs(qwen, loaded):
    """Joining rows (batched tensors and packed image patches concatenated) gives what selecting those
    rows gives; rows that differ in a shared input (a graph) or in their keys are refused by name."""
    hm, inputs = qwen
    joined = hm.join([hm.rows(inputs, 1), hm.rows(inputs, 0)])
    selected = hm.rows(inputs, [1, 0])
    assert joined.keys() == selected.keys()
    assert all(torch.equal(joined[k], selected[k]) for k in joined if isinstance(joined[k], torch.Tensor))
    lm = loaded("tea-glm-tiny")
    tea = mmlens.wrap(lm.model, tokenizer=lm.tokenizer)
    x = tea.rows(lm.example_inputs(), 0)
    with pytest.raises(ValueError, match="differ in the shared input"):
        tea.join([x, {**x, "node_features": x["node_features"] + 1.0}])
    with pytest.raises(ValueError, match="different keys"):
        hm.join([hm.rows(inputs, 0), {k: v for k, v in hm.rows(inputs, 1).items() if k != "attention_mask"}])
