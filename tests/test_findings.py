"""Regression tests for findings 1, 2, 3, 7 and 8 of issue 13 (silent wrong numbers)."""

from __future__ import annotations

import pytest
import torch

import mmlens
from mmlens.methods.patching import Component, logit_diff, path_patch

# -- finding 3: path patching into attention / MLP receivers ----------------------------------------


@pytest.fixture(scope="module")
def story_pair(loaded):
    """TinyStories, a clean prompt and a corrupted one with the same token count."""
    lm = loaded("tinystories-656k")
    hm = mmlens.wrap(lm.model, tokenizer=lm.tokenizer)
    clean = dict(lm.tokenizer(["Once upon a time there was a little girl who"], return_tensors="pt"))
    corrupted = dict(lm.tokenizer(["Once upon a time there was a little boy who"], return_tensors="pt"))
    assert clean["input_ids"].shape == corrupted["input_ids"].shape
    logits = hm.readout_logits(hm.run(clean).logits, clean)[0]
    return hm, clean, corrupted, logit_diff(*logits.topk(2).indices.tolist())


def _two_run_reference(hm, clean, corrupted, metric, senders: list[str], receiver: Component) -> float:
    """Path patching written out: run 1 patches the senders, holds every other attention/MLP output
    at its clean value (the receiver only outside its own selection) and records the receiver; run 2
    sets the receiver to the recorded value."""
    clean_run, corrupt_run = hm.run(clean, cache=True), hm.run(corrupted, cache=True)
    spans = hm.spans(clean)
    edits = [mmlens.replace(s, corrupt_run.cache[s]) for s in senders]
    for name in hm.names("lm.blocks.*"):
        if name.rsplit(".", 1)[1] not in ("attn_out", "mlp_out") or name in senders:
            continue
        if name != receiver.hook:
            edits.append(mmlens.replace(name, clean_run.cache[name]))
        elif receiver.at is not None:
            edits.append(mmlens.replace(name, clean_run.cache[name], at=~spans.mask(receiver.at)))
    recorded = hm.run(clean, edits=edits, cache=receiver.hook).cache[receiver.hook]
    final = hm.run(clean, edits=[mmlens.replace(receiver.hook, recorded, at=receiver.at, heads=receiver.heads)])
    return float(metric(hm.readout_logits(final.logits, clean))[0])


RECEIVERS = [
    Component("lm.blocks.1.attn_out"),
    Component("lm.blocks.1.attn_out", at="last"),
    Component("lm.blocks.1.mlp_out"),
    Component("lm.blocks.0.mlp_out", at="last"),
    Component("lm.blocks.1.z", heads=[0, 3]),
    Component("lm.blocks.1.resid_pre", at="last"),
    Component("lm.blocks.1.resid_mid"),
    Component("lm.blocks.1.resid_post", at="last"),
]


@pytest.mark.parametrize("receiver", RECEIVERS, ids=lambda r: f"{r.hook}-{r.at}-{r.heads}")
def test_path_patch_matches_a_two_run_reference_for_every_receiver_kind(story_pair, receiver):
    hm, clean, corrupted, metric = story_pair
    senders = ["lm.blocks.0.attn_out"]
    value = path_patch(hm, clean, corrupted, metric, [Component(s) for s in senders], [receiver])
    expected = _two_run_reference(hm, clean, corrupted, metric, senders, receiver)
    assert value == pytest.approx(expected, abs=1e-5)
    clean_value = float(metric(hm.readout_logits(hm.run(clean).logits, clean))[0])
    assert abs(value - clean_value) > 1e-4  # the sender reaches every receiver


# -- finding 1: one readout, from the spans of the fused sequence ------------------------------------


class ImageTextAudioLM(torch.nn.Module):
    """A hand-written two-encoder LM: image soft tokens prepended, audio frames appended after the
    text, bidirectional blocks, per-position logits ``[b, P + T + A, vocab]``; the attention mask
    covers the text only (the FusionTransformer convention)."""

    def __init__(self, d: int = 32, vocab: int = 50, n_patch: int = 4, n_frame: int = 3):
        super().__init__()
        from mmlens.models.fusion import Block

        torch.manual_seed(0)
        self.n_patch, self.n_frame = n_patch, n_frame
        self.image_proj = torch.nn.Linear(6, d)
        self.audio_proj = torch.nn.Linear(5, d)
        self.embed = torch.nn.Embedding(vocab, d)
        self.fuse = torch.nn.Identity()
        self.blocks = torch.nn.ModuleList(Block(d, 4, 2 * d) for _ in range(2))
        self.final_norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, pixel_values, input_ids, audio_values, attention_mask=None):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        x = torch.cat([self.image_proj(pixel_values), self.embed(input_ids), self.audio_proj(audio_values)], 1)
        x = self.fuse(x)
        keys = torch.cat([mask.new_ones(x.shape[0], self.n_patch), mask, mask.new_ones(x.shape[0], self.n_frame)], 1)
        for block in self.blocks:
            x = block(x, keys.bool())
        return self.head(self.final_norm(x))


def _ita_spans(model, inputs):
    ids = inputs["input_ids"]
    return mmlens.core.spans.spans_from_blocks(
        ids.shape[0],
        {"image": model.n_patch, "text": ids.shape[1], "audio": model.n_frame},
        {"text": inputs.get("attention_mask")},
        device=ids.device,
    )


def _zeroed(key):
    return lambda model, inputs, spans: {**inputs, key: torch.zeros_like(inputs[key])}


@pytest.fixture(scope="module")
def image_text_audio():
    from mmlens.hooks.fusion_transformer import FUSION_BLOCK

    adapter = mmlens.Adapter(
        name="image-text-audio-test",
        architectures=("ImageTextAudioLM",),
        stacks=(mmlens.Stack("lm", "lm", None, "blocks", FUSION_BLOCK, n_heads="blocks.0.attn.n_heads"),),
        points=(
            mmlens.Point("fusion.embeds", "fusion", None, mmlens.Site("fuse"), fused_positions=True),
            mmlens.Point("lm.final_norm", "lm", None, mmlens.Site("final_norm"), fused_positions=True),
            mmlens.Point("lm.logits", "lm", None, mmlens.Site("head"), fused_positions=True),
        ),
        spans=_ita_spans,
        neutral={"image": _zeroed("pixel_values"), "audio": _zeroed("audio_values"), "text": _zeroed("input_ids")},
        modality_inputs={"image": ("pixel_values",), "audio": ("audio_values",), "text": ("input_ids",)},
        causal=False,
    )
    model = ImageTextAudioLM().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # row 1: two padding tokens, then the audio frames
    inputs = {
        "pixel_values": torch.randn(2, 4, 6, generator=g),
        "input_ids": ids,
        "audio_values": torch.randn(2, 3, 5, generator=g),
        "attention_mask": mask,
    }
    return mmlens.HookedModel(model, adapter), inputs


def _by_hand(hm, inputs) -> torch.Tensor:
    """Float[b, vocab]: the plain model's logits at each row's last real position per the spans."""
    with torch.no_grad():
        logits = hm.model(**inputs)
    return logits[hm.spans(inputs).mask("last")]


def test_readout_comes_from_the_spans_of_the_fused_sequence(image_text_audio):
    hm, inputs = image_text_audio
    expected = _by_hand(hm, inputs)
    assert hm.spans(inputs).mask("last")[1, -1]  # row 1 (padded text) reads the last audio frame
    assert torch.equal(hm.readout_logits(hm.run(inputs).logits, inputs), expected)
    assert torch.equal(hm.readout_logits(hm.run(inputs).logits, spans=hm.spans(inputs)), expected)
    with pytest.raises(ValueError, match="line up"):
        hm.readout_logits(torch.zeros(2, 5, 50), inputs)


def test_every_method_reads_its_metric_at_the_span_last_position(image_text_audio):
    from mmlens.methods.patching import attribution_patch, corrupt, sweep
    from mmlens.metrics.desiderata import granger

    hm, inputs = image_text_audio
    expected = _by_hand(hm, inputs)
    neutral = hm.neutral(inputs, "audio")
    expected_neutral = _by_hand(hm, neutral)
    metric = logit_diff(3, 7)
    by_hand, by_hand_neutral = metric(expected).tolist(), metric(expected_neutral).tolist()
    corruption = corrupt(hm, inputs, "audio")
    for replay in (True, False):
        result = sweep(hm, inputs, corruption, metric, hook="resid_pre", axes=("layer",), replay=replay, progress=False)
        assert result.clean == pytest.approx(by_hand, abs=1e-5)
        assert result.corrupted == pytest.approx(by_hand_neutral, abs=1e-5)
        layer0 = result.table[result.table.layer == 0].value.tolist()
        assert layer0 == pytest.approx(by_hand, abs=1e-5)  # the whole clean stream patched in
    attribution = attribution_patch(hm, inputs, corruption, metric, hook="resid_pre", axes=("layer",))
    assert attribution.clean == pytest.approx(by_hand, abs=1e-5)
    assert attribution.corrupted == pytest.approx(by_hand_neutral, abs=1e-5)
    row = hm.rows(inputs, 1)
    assert path_patch(hm, row, hm.rows(neutral, 1), metric, [], [Component("lm.final_norm")]) == pytest.approx(
        by_hand[1], abs=1e-5
    )
    explanation = mmlens.explain(hm, inputs, "occlusion")
    assert explanation.value.tolist() == pytest.approx(expected.softmax(-1).max(-1).values.tolist(), abs=1e-6)
    influence = granger(hm, [row], ["occlusion"], progress=False).influence
    target = int(expected[1].argmax())
    drop = {
        m: float(expected[1].softmax(-1)[target] - _by_hand(hm, hm.neutral(row, m))[0].softmax(-1)[target])
        for m in ("image", "text", "audio")
    }
    got = dict(zip(influence.modality, influence.delta_prob))
    assert got == pytest.approx(drop, abs=1e-6)


# -- finding 8: the graph + text classifier pools, so its readers are every real position ------------


@pytest.fixture(scope="module")
def graph_text():
    from mmlens.models.graph_text import GraphTextConfig, GraphTextFusion

    torch.manual_seed(0)
    model = GraphTextFusion(GraphTextConfig(d_model=16, n_heads=2, d_mlp=32, gnn_dim=8, node_dim=4)).eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 64, (2, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    inputs = {
        "node_features": torch.randn(6, 4, generator=g),
        "edge_index": torch.randint(0, 6, (2, 10), generator=g),
        "node_index": torch.tensor([1, 4]),
        "input_ids": ids,
        "attention_mask": mask,
    }
    return mmlens.wrap(model), inputs


def test_attention_explainers_score_the_pooled_positions(graph_text):
    hm, inputs = graph_text
    weights = []
    for block in hm.model.blocks:
        block.attn.return_weights = True
    handles = [b.attn.register_forward_hook(lambda m, a, out: weights.append(out[1])) for b in hm.model.blocks]
    try:
        with torch.no_grad():
            hm.model(**inputs)
    finally:
        for h, block in zip(handles, hm.model.blocks):
            h.remove()
            block.attn.return_weights = False
    mean = torch.stack([w.mean(1) for w in weights]).mean(0)  # Float[b, seq, seq]
    valid = hm.spans(inputs).valid
    expected = torch.stack([mean[r][valid[r]].mean(0) for r in range(2)])
    expected[~valid] = float("nan")
    scores = mmlens.explain(hm, inputs, "attention").scores
    torch.testing.assert_close(scores, expected, equal_nan=True)
    assert hm.adapter.readout == "mean"


# -- finding 2: token labels aligned to the fused sequence by spans ----------------------------------


def test_lens_table_labels_soft_tokens_prepended_to_the_text(loaded):
    from mmlens.methods.lens import logit_lens

    lm = loaded("tiny-fusion")
    hm, inputs = mmlens.wrap(lm.model), lm.example_inputs()
    n_patch = lm.model.config.n_patches
    result = logit_lens(hm, inputs, k=1)
    for row in range(2):
        assert result.tokens[row][:n_patch] == [f"<image {k}>" for k in range(n_patch)]
        assert result.tokens[row][n_patch:] == [str(i) for i in inputs["input_ids"][row].tolist()]
    table = result.table()
    assert len(table) == len(result.layers) * int(hm.spans(inputs).valid.sum())
    image = table[table.modality == "image"]
    assert (image.token == [f"<image {p}>" for p in image.position]).all()


def test_sweep_labels_follow_the_spans_around_the_text(image_text_audio):
    from mmlens.methods.patching import corrupt, sweep

    hm, inputs = image_text_audio
    labels = hm.position_labels(inputs)
    ids = inputs["input_ids"][1].tolist()
    assert labels[1] == [f"<image {k}>" for k in range(4)] + [str(i) for i in ids] + [f"<audio {k}>" for k in range(3)]
    row = hm.rows(inputs, 1)
    result = sweep(hm, row, corrupt(hm, row, "audio"), logit_diff(3, 7), axes=("layer", "position"), progress=False)
    first = result.table[result.table.layer == 0]
    assert first.token.tolist() == [labels[1][p] for p in first.position]
    assert first.modality.tolist() == [hm.spans(row).modality_of_positions()[0][p] for p in first.position]


# -- finding 7: position selectors on [items, d] encoder points select rows ---------------------------


def test_position_selectors_on_gnn_points_select_nodes_not_channels(loaded):
    lm = loaded("tea-glm-tiny")
    hm, inputs = mmlens.wrap(lm.model, tokenizer=lm.tokenizer), lm.example_inputs()
    point = "graph.blocks.0.out"
    clean = hm.run(inputs, cache="graph.blocks.*.out").cache
    edited = hm.run(inputs, edits=[mmlens.ablate(point, at=[3])], cache=point).cache[point]
    nodes = clean[point].shape[0]
    others = torch.arange(nodes) != 3
    assert torch.equal(edited[3], torch.zeros_like(edited[3]))
    assert torch.equal(edited[others], clean[point][others])
    added = hm.run(inputs, edits=[mmlens.add(point, 1.0, at=torch.arange(nodes) < 2)], cache=point).cache[point]
    assert torch.equal(added[:2], clean[point][:2] + 1) and torch.equal(added[2:], clean[point][2:])
    assert hm.hook_points[point].axes == ("item",)
    stacked = clean.stack("graph.out")
    assert stacked.dims == ("layer", "item", "d") and stacked.values.shape[1] == nodes
    with pytest.raises(ValueError, match="span 'graph' does not apply"):
        hm.run(inputs, edits=[mmlens.ablate(point, at="graph")])
    with pytest.raises(ValueError, match="no position axis"):
        hm.run(inputs, edits=[mmlens.ablate("fusion.projector_out", at=[0])])
    with pytest.raises(ValueError, match="no batch axis"):
        mmlens.sweep(hm, inputs, hm.neutral(inputs, "graph"), logit_diff(3, 7), hook="graph.out", axes=("layer",))
