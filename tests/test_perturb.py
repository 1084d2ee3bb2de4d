"""Perturbations for stability: the layout is kept, only one modality changes, draws are seeded,
and input distances live in the LM's input embeddings."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

import mmlens
from mmlens.data.graphs import build_graph_prompt
from mmlens.metrics.perturb import (
    PERTURBATIONS,
    PUNCTUATION,
    drop_edges,
    input_distance,
    perturb,
    punctuation_edit,
    shift,
    synonym_groups,
    synonym_swap,
)

STORIES = [
    "The pretty bunny was quick! She saw a small rabbit and a little dog. Yay!",
    "A tiny bunny made a big noise. Wow! It did a little jump!",
]  # shorter: left padding
GRAPH_PROMPT = ("The pretty bunny was quick! She saw a small rabbit and a little dog.", "Yay! It did a little jump!")
MODALITY_KEYS = {
    "text": {"input_ids"},
    "image": {"pixel_values"},
    "graph": {"node_features", "edge_index", "graph_embeds"},
}


@pytest.fixture(scope="module")
def story(loaded):
    """TinyStories (text LM, ``lm.embed``) with a left-padded batch of two stories."""
    lm = loaded("tinystories-656k")
    hm = mmlens.wrap(lm.model, tokenizer=lm.tokenizer)
    inputs = hm.to_inputs(STORIES)
    assert not inputs["attention_mask"].all()
    return hm, inputs


@pytest.fixture(scope="module")
def glm(loaded):
    """The tiny graph-language model: text around 5 graph tokens, run through the GNN."""
    lm = loaded("tea-glm-tiny")
    hm = mmlens.wrap(lm.model, tokenizer=lm.tokenizer)
    ids = torch.tensor([build_graph_prompt(lm.tokenizer, *GRAPH_PROMPT, lm.model.graph_token_id)] * 2)
    return hm, {**lm.example_inputs(), "input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="module")
def glm_embeds(glm):
    """The same model given node representations directly (``graph_embeds``)."""
    hm, inputs = glm
    text = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    embeds = 3 * torch.randn(2, hm.model.gnn.out_dim, generator=torch.Generator().manual_seed(0))
    return hm, {**text, "graph_embeds": embeds}


@pytest.fixture(scope="module")
def vlm(loaded):
    lm = loaded("tiny-random-llava")
    return mmlens.wrap(lm.model), lm.example_inputs()


CASES = [
    ("story", "text", "synonym_swap"),
    ("story", "text", "punctuation_edit"),
    ("glm", "text", "synonym_swap"),
    ("glm", "text", "punctuation_edit"),
    ("vlm", "image", "shift"),
    ("vlm", "image", "brightness"),
    ("vlm", "image", "gaussian_noise"),
    ("glm", "graph", "drop_edges"),
    ("glm", "graph", "feature_noise"),
    ("glm_embeds", "graph", "embedding_noise"),
]


def _flat(variants) -> list[torch.Tensor]:
    return [v.inputs[k].flatten().float() for v in variants for k in sorted(v.inputs)]


def _same_draws(a, b) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(_flat(a), _flat(b)))


@pytest.mark.parametrize("fixture, modality, kind", CASES)
def test_every_kind_keeps_the_layout_changes_only_its_modality_and_is_seeded(request, fixture, modality, kind):
    hm, inputs = request.getfixturevalue(fixture)
    spans = hm.spans(inputs)
    variants = perturb(hm, inputs, modality, kind, n=4, seed=0)
    assert 1 <= len(variants) <= 4
    for v in variants:
        assert (v.modality, v.kind) == (modality, kind) and v.description.startswith(f"{kind}: ")
        assert hm.spans(v.inputs).same_layout(spans)
        assert v.inputs.keys() == inputs.keys()
        changed = {
            k for k in inputs if not (v.inputs[k].shape == inputs[k].shape and torch.equal(v.inputs[k], inputs[k]))
        }
        assert changed and changed <= MODALITY_KEYS[modality], changed
        for k in inputs.keys() - changed:
            assert v.inputs[k] is inputs[k]  # untouched inputs are the very same tensors
        if modality == "text":
            moved = v.inputs["input_ids"] != inputs["input_ids"]
            assert moved.any() and not (moved & ~spans.masks["text"]).any()
        if "pixel_values" in changed:
            assert v.inputs["pixel_values"].shape == inputs["pixel_values"].shape
    for i, a in enumerate(variants):
        assert not any(_same_draws([a], [b]) for b in variants[i + 1 :])  # no repeats
    assert _same_draws(variants, perturb(hm, inputs, modality, kind, n=4, seed=0))
    assert any(not _same_draws(variants, perturb(hm, inputs, modality, kind, n=4, seed=s)) for s in (1, 2, 3))


def test_the_shipped_synonym_list():
    raw = json.loads(resources.files("mmlens").joinpath("data/synonyms.json").read_text(encoding="utf-8"))
    groups = synonym_groups()
    assert groups == raw["groups"] and len(groups) >= 150
    words = [w for g in groups for w in g]
    assert all(len(g) >= 2 for g in groups)
    assert all(w.isalpha() and w.islower() for w in words)
    assert len(words) == len(set(words)), "a word is in two groups"
    assert ["big", "large", "huge"] == groups[0][:3]


def test_synonym_swap_replaces_one_listed_word_by_its_synonym(story):
    hm, inputs = story
    tok = hm.tokenizer
    group_of = {w: i for i, g in enumerate(synonym_groups()) for w in g}
    variants = perturb(hm, inputs, "text", "synonym_swap", n=8)
    assert len(variants) >= 4
    for v in variants:
        for before, after in zip(inputs["input_ids"], v.inputs["input_ids"]):
            old, new = (tok.decode(ids, skip_special_tokens=True).split() for ids in (before, after))
            diff = [(a, b) for a, b in zip(old, new) if a != b]
            assert len(old) == len(new) and len(diff) == 1, (old, new)
            a, b = (w.strip("!.,").lower() for w in diff[0])
            assert a != b and group_of[a] == group_of[b], diff
            assert f"'{diff[0][0].strip('!.,')}'->'{diff[0][1].strip('!.,')}'" in v.description


class _ByteLevelVocab:
    """A minimal byte-level-BPE-style tokenizer ("Ġ" marks a leading space); id 0 is special."""

    all_special_ids = (0,)

    def __init__(self, tokens: list[str]):
        self.tokens = tokens

    def get_vocab(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}

    def convert_ids_to_tokens(self, ids):
        return self.tokens[ids] if isinstance(ids, int) else [self.tokens[i] for i in ids]


def test_token_swaps_keep_case_whole_words_numbers_and_the_allowed_positions():
    vocab = _ByteLevelVocab(
        [
            "<s>",
            "The",
            "ĠBig",
            "ĠLarge",
            "Ġdog",
            "Ġran",
            "Ġfast",
            "Ġquick",
            ".",
            "ĠBIG",
            "ĠLARGE",
            "Ġbreak",
            "fast",
            "quick",
            "!",
            "3",
            "5",
            "Ġlarge",
            "Ġbig",
            "ĠHappy",
        ]
    )
    text = ["<s>", "The", "ĠBig", "Ġdog", "Ġran", "Ġfast", ".", "ĠBIG", "Ġbreak", "fast", "!", "3", ".", "5", "ĠHappy"]
    ids = torch.tensor([[vocab.tokens.index(t) for t in text]])
    where = torch.ones_like(ids, dtype=torch.bool)
    new, (swaps,) = synonym_swap(ids, where, vocab, words=10)
    assert [(p, vocab.tokens[r]) for p, _, r in swaps] == [(2, "ĠLarge"), (5, "Ġquick"), (7, "ĠLARGE")]
    assert vocab.convert_ids_to_tokens(new[0].tolist())[9] == "fast"  # the end of "breakfast" is no word
    new, (swaps,) = punctuation_edit(ids, where, vocab, edits=10)
    assert [(p, vocab.tokens[r]) for p, _, r in swaps] == [(6, "!"), (10, ".")]  # not the "." of 3.5
    where[0, :6] = False
    _, (swaps,) = synonym_swap(ids, where, vocab, words=10)
    assert [p for p, _, _ in swaps] == [7]
    ids = torch.tensor([[vocab.tokens.index("Ġlarge"), vocab.tokens.index("Ġbig")]])  # "Ġlarge" as a placeholder
    _, (swaps,) = synonym_swap(ids, torch.tensor([[False, True]]), vocab)
    assert swaps == []  # a swap must not create another modality's placeholder


def test_punctuation_edit_uses_the_table(story):
    hm, inputs = story
    tok = hm.tokenizer
    for v in perturb(hm, inputs, "text", "punctuation_edit", n=8):
        moved = (v.inputs["input_ids"] != inputs["input_ids"]).nonzero().tolist()
        assert len(moved) == 2  # one per row (scale 1)
        for r, p in moved:
            old, new = (tok.convert_ids_to_tokens(int(x[r, p])) for x in (inputs["input_ids"], v.inputs["input_ids"]))
            assert new.strip("▁") in PUNCTUATION[old.strip("▁")]


def test_shift_replicates_edges_on_any_leading_shape():
    x = torch.arange(2 * 1 * 3 * 4 * 5, dtype=torch.float).view(2, 1, 3, 4, 5)
    out = shift(x, 2, -1)  # 2 right, 1 up
    assert out.shape == x.shape
    assert torch.equal(out[..., :3, 2:], x[..., 1:, :3])
    assert torch.equal(out[..., :, :2], out[..., :, 2:3].expand_as(out[..., :, :2]))  # left edge repeated
    assert torch.equal(out[..., 3, :], out[..., 2, :])  # bottom edge repeated
    with pytest.raises(ValueError, match="not smaller than the image"):
        shift(x, 5, 0)


def test_repeated_draws_are_left_out(vlm):
    hm, inputs = vlm
    variants = perturb(hm, inputs, "image", "shift", n=20)  # scale 1: the 8 one-pixel shifts, each once
    assert sorted(v.description for v in variants) == sorted(
        f"shift: shift by dx={dx}, dy={dy} px" for dx in (-1, 0, 1) for dy in (-1, 0, 1) if (dx, dy) != (0, 0)
    )


def test_image_noise_and_brightness_scale_with_each_images_std(vlm):
    hm, inputs = vlm
    pixels = inputs["pixel_values"] * torch.tensor([1.0, 4.0])[:, None, None, None]  # images of different std
    inputs = {**inputs, "pixel_values": pixels}
    std = pixels.flatten(1).std(1)
    (noisy,) = perturb(hm, inputs, "image", "gaussian_noise", n=1, scale=0.1)
    ratio = (noisy.inputs["pixel_values"] - pixels).flatten(1).std(1) / std
    assert torch.allclose(ratio, torch.full((2,), 0.1), rtol=0.1)
    for v in perturb(hm, inputs, "image", "brightness", n=4, scale=0.2):
        delta = (v.inputs["pixel_values"] - pixels).flatten(1)
        assert torch.allclose(delta, delta[:, :1].expand_as(delta), atol=1e-5)  # one constant per image
        assert (delta[:, 0].abs() <= 0.2 * std + 1e-5).all() and (delta[:, 0] != 0).all()
    neutral = hm.neutral(inputs, "image")  # all-zero images: std 0, nothing to perturb
    with pytest.raises(
        ValueError, match=r"no image perturbation.*\['shift', 'brightness', 'gaussian_noise'\].*unchanged"
    ):
        perturb(hm, neutral, "image")


def _is_subsequence(kept: torch.Tensor, edges: torch.Tensor) -> bool:
    columns = iter(edges.t().tolist())
    return all(any(c == k for c in columns) for k in kept.t().tolist())


def test_drop_edges_only_removes_and_keeps_undirected_pairs_together():
    ring = torch.tensor([[i, (i + 1) % 10] for i in range(10)]).t()
    edges = torch.cat([ring, ring.flip(0), torch.tensor([[3], [7]])], dim=1)  # 10 undirected pairs + 1 directed
    g = torch.Generator().manual_seed(0)
    for fraction, n_pairs in ((0.2, 2), (1e-6, 1), (1.0, 11)):
        kept = drop_edges(edges, fraction, g)
        assert _is_subsequence(kept, edges) and kept.shape[1] < edges.shape[1]
        pairs = {tuple(sorted(c)) for c in edges.t().tolist()} - {tuple(sorted(c)) for c in kept.t().tolist()}
        assert len(pairs) == n_pairs
        kept_set = {tuple(c) for c in kept.t().tolist()}
        assert all((v, u) in kept_set for u, v in kept_set if (v, u) in {tuple(c) for c in edges.t().tolist()})
    with pytest.raises(ValueError, match="fraction"):
        drop_edges(edges, 0.0)


def test_graph_kinds_on_the_graph_language_model(glm, glm_embeds):
    hm, inputs = glm
    variants = perturb(hm, inputs, "graph", n=3)
    assert {v.kind for v in variants} == {"drop_edges", "feature_noise"}
    for v in variants:
        if v.kind == "drop_edges":
            kept = v.inputs["edge_index"]
            assert kept.shape[1] < inputs["edge_index"].shape[1] and _is_subsequence(kept, inputs["edge_index"])
            assert f"of {inputs['edge_index'].shape[1]} edges" in v.description
    big = {**inputs, "node_features": torch.randn(400, 32, generator=torch.Generator().manual_seed(1)) * 5}
    (noisy,) = perturb(hm, big, "graph", "feature_noise", n=1, scale=0.1)
    delta = noisy.inputs["node_features"] - big["node_features"]
    assert float(delta.std() / big["node_features"].std()) == pytest.approx(0.1, rel=0.05)
    assert abs(float(delta.mean())) < 0.05
    hm, inputs = glm_embeds
    variants = perturb(hm, inputs, "graph", n=2, scale=0.2)
    assert {v.kind for v in variants} == {"embedding_noise"}
    ratio = (variants[0].inputs["graph_embeds"] - inputs["graph_embeds"]).std(1) / inputs["graph_embeds"].std(1)
    assert torch.allclose(ratio, torch.full((2,), 0.2), rtol=0.35)


def test_input_distance_is_measured_per_modality_in_the_lms_input_embeddings(story, glm, vlm):
    for hm, inputs, modalities in (
        (story[0], story[1], ["text"]),
        (glm[0], glm[1], ["text", "graph"]),
        (vlm[0], vlm[1], ["text", "image"]),
    ):
        for m in modalities:
            assert torch.equal(input_distance(hm, inputs, dict(inputs), m), torch.zeros(2))
    hm, inputs = vlm
    for v in perturb(hm, inputs, "image", n=2):
        assert (input_distance(hm, inputs, v.inputs, "image") > 0).all()
        assert torch.equal(input_distance(hm, inputs, v.inputs, "text"), torch.zeros(2))
    hm, inputs = glm
    (text,) = perturb(hm, inputs, "text", "synonym_swap", n=1)
    (graph,) = perturb(hm, inputs, "graph", "feature_noise", n=1)
    assert (input_distance(hm, inputs, text.inputs, "text") > 0).all()
    assert torch.equal(input_distance(hm, inputs, text.inputs, "graph"), torch.zeros(2))
    assert (input_distance(hm, inputs, graph.inputs, "graph") > 0).all()
    assert torch.equal(input_distance(hm, inputs, graph.inputs, "text"), torch.zeros(2))
    hm, inputs = story  # a text LM: lm.embed; one swapped token per row
    (v,) = perturb(hm, inputs, "text", "synonym_swap", n=1)
    embed = hm.model.get_input_embeddings().weight.detach()
    expected = [
        float((embed[int(a[p])] - embed[int(b[p])]).norm())
        for a, b in zip(inputs["input_ids"], v.inputs["input_ids"])
        for p in (a != b).nonzero()[:, 0]
    ]
    assert input_distance(hm, inputs, v.inputs, "text").tolist() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(input_distance(hm, inputs, v.inputs, "all"), input_distance(hm, inputs, v.inputs, "text"))


def test_errors(story, vlm, glm_embeds):
    hm, inputs = story
    with pytest.raises(ValueError, match=r"unknown modality 'smell'.*\['audio', 'graph', 'image', 'text'\]"):
        perturb(hm, inputs, "smell")
    with pytest.raises(ValueError, match=r"modality 'audio' is not in these inputs; their modalities are \['text'\]"):
        perturb(hm, inputs, "audio")
    with pytest.raises(
        ValueError, match=r"'shift' is for image\); text kinds are \['synonym_swap', 'punctuation_edit'\]"
    ):
        perturb(hm, inputs, "text", "shift")
    with pytest.raises(ValueError, match=r"unknown image perturbation kind\(s\) \['blur'\]; image kinds are"):
        perturb(*vlm, "image", ["shift", "blur"])
    with pytest.raises(ValueError, match=r"modality 'image' is not in these inputs; their modalities are \['text'\]"):
        perturb(hm, inputs, "image")
    plain = hm.to_inputs(["Once upon a time there was a girl who"])
    with pytest.raises(
        ValueError,
        match=r"no text perturbation could be made with kinds \['synonym_swap', "
        r"'punctuation_edit'\]: synonym_swap: no word .*; punctuation_edit: no punct",
    ):
        perturb(hm, plain, "text")
    with pytest.raises(ValueError, match=r"shift's scale is a count of pixels, an int >= 1; got 0.5"):
        perturb(*vlm, "image", "shift", scale=0.5)
    with pytest.raises(ValueError, match=r"gaussian_noise's scale .* > 0; got -1"):
        perturb(*vlm, "image", scale={"gaussian_noise": -1})
    with pytest.raises(ValueError, match=r"scale given for kinds \['drop_edges'\]"):
        perturb(*vlm, "image", scale={"drop_edges": 0.1})
    with pytest.raises(ValueError, match="n must be at least 1"):
        perturb(hm, inputs, "text", n=0)
    vhm, vinputs = vlm
    with pytest.raises(ValueError, match=r"text perturbations need\(s\) .*tokenizer"):
        perturb(vhm, vinputs, "text")
    no_image = {k: v for k, v in vinputs.items() if k != "pixel_values"}
    with pytest.raises(ValueError, match=r"image positions but none of its inputs \['pixel_values'\]"):
        perturb(vhm, no_image, "image")
    with pytest.raises(ValueError, match=r"kinds \['drop_edges'\]: drop_edges: these inputs have no 'edge_index'"):
        perturb(*glm_embeds, "graph", "drop_edges")
    with pytest.raises(ValueError, match="drop_edges' scale is the fraction of edges to drop, in \\(0, 1\\]"):
        perturb(*glm_embeds, "graph", scale={"drop_edges": 2.0})
    with pytest.raises(ValueError, match="different layouts"):
        input_distance(hm, inputs, hm.to_inputs(STORIES[:1] * 2), "text")
    with pytest.raises(KeyError, match="span 'image' is not in these inputs"):
        input_distance(hm, inputs, inputs, "image")
    assert set(PERTURBATIONS) == {"text", "image", "graph", "audio"}


def test_perturbations_come_from_the_adapter(story):
    """perturb dispatches through the model's adapter table: its kinds, its input keys."""
    from dataclasses import replace

    from mmlens.metrics.perturb import CannotPerturb

    hm, inputs = story
    calls = []

    def reverse_rows(hooked, inputs, spans, scale, generator):
        if scale > 10:
            raise CannotPerturb("too strong")
        calls.append(scale)
        return lambda i: ({**inputs, "input_ids": inputs["input_ids"].flip(0)}, "rows reversed")

    table = replace(hm.adapter, perturbations={"text": {"reverse": reverse_rows}})
    own = mmlens.wrap(hm.model, adapter=table, tokenizer=hm.tokenizer)
    (v,) = perturb(own, inputs, "text", n=3, scale=1.0)
    assert (v.kind, v.description, calls) == ("reverse", "reverse: rows reversed", [1.0])
    assert v.inputs["attention_mask"] is inputs["attention_mask"]
    with pytest.raises(ValueError, match="reverse has no default scale"):
        perturb(own, inputs, "text")
    with pytest.raises(ValueError, match="reverse: too strong"):
        perturb(own, inputs, "text", scale=11.0)
    with pytest.raises(ValueError, match=r"text kinds are \['reverse'\]"):
        perturb(own, inputs, "text", "synonym_swap")
    silent = mmlens.wrap(hm.model, adapter=replace(hm.adapter, perturbations={}), tokenizer=hm.tokenizer)
    with pytest.raises(ValueError, match="declares no text perturbations"):
        perturb(silent, inputs, "text")
