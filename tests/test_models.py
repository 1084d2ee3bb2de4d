"""Tests of mmlens's own models: TeaGLM on the real TinyStories-656K LM, and FusionTransformer.

``models_dir`` (the shared models folder, ``MMLENS_MODELS``) comes from ``conftest.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmlens.data.graphs import build_graph_prompt, default_graph_token_id
from mmlens.models import Attention, Block, FusionConfig, FusionTransformer, GraphSAGEEncoder, TeaGLM

K = 5
IN_DIM, GNN_DIM, N_NODES = 8, 16, 12


@pytest.fixture(scope="module")
def tokenizer(models_dir: Path):
    return AutoTokenizer.from_pretrained(models_dir / "tinystories-656k")


@pytest.fixture(scope="module")
def tea_glm(models_dir: Path, tokenizer) -> TeaGLM:
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(models_dir / "tinystories-656k", dtype=torch.float32)
    gnn = GraphSAGEEncoder(IN_DIM, 32, GNN_DIM)
    return TeaGLM(lm, gnn, default_graph_token_id(tokenizer), num_graph_tokens=K).eval()


@pytest.fixture(scope="module")
def graph() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "node_features": torch.randn(N_NODES, IN_DIM, generator=gen),
        "edge_index": torch.randint(0, N_NODES, (2, 40), generator=gen),
        "node_ids": torch.tensor([3, 7]),
    }


@pytest.fixture(scope="module")
def input_ids(tea_glm: TeaGLM, tokenizer) -> torch.Tensor:
    prompts = [
        build_graph_prompt(tokenizer, "Tom saw a", " ran to the", tea_glm.graph_token_id, K),
        build_graph_prompt(tokenizer, "The little dog", " and he was", tea_glm.graph_token_id, K),
    ]
    assert len(prompts[0]) == len(prompts[1])
    return torch.tensor(prompts)


def lm_inputs_embeds(model: TeaGLM, **inputs) -> torch.Tensor:
    """The ``inputs_embeds`` keyword that ``model.lm`` receives during ``model(**inputs)``."""
    seen = {}

    def grab(module, args, kwargs):
        seen["inputs_embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["inputs_embeds"]


@torch.no_grad()
def test_graphsage_encoder_layers(graph) -> None:
    torch.manual_seed(0)
    gnn = GraphSAGEEncoder(IN_DIM, 32, GNN_DIM, num_layers=3).eval()
    dims = [(conv.in_channels, conv.out_channels) for conv in gnn.convs]
    assert dims == [(IN_DIM, 32), (32, 32), (32, GNN_DIM)]
    x, edge_index = graph["node_features"], graph["edge_index"]
    c1, c2, c3 = gnn.convs
    expected = c3(c2(c1(x, edge_index).relu(), edge_index).relu(), edge_index)
    torch.testing.assert_close(gnn(x, edge_index), expected)
    with pytest.raises(ValueError, match="num_layers must be at least 1"):
        GraphSAGEEncoder(IN_DIM, 32, GNN_DIM, num_layers=0)


def test_default_graph_token_id_prefers_unk(tokenizer) -> None:
    assert default_graph_token_id(tokenizer) == tokenizer.unk_token_id


def test_build_graph_prompt_places_contiguous_placeholders(tokenizer) -> None:
    ids = build_graph_prompt(tokenizer, "Once upon a time", " there was", 0, K)
    before = tokenizer.encode("Once upon a time")
    after = tokenizer.encode(" there was", add_special_tokens=False)
    assert ids == before + [0] * K + after
    assert 0 not in before + after


def test_graph_tokens_land_at_placeholders(tea_glm, graph, input_ids) -> None:
    embeds = lm_inputs_embeds(tea_glm, input_ids=input_ids, **graph)
    with torch.no_grad():
        h = tea_glm.gnn(graph["node_features"], graph["edge_index"])[graph["node_ids"]]
        expected = tea_glm.projector(h).view(2, K, tea_glm.d_model)
    mask = input_ids == tea_glm.graph_token_id
    for row in range(2):
        torch.testing.assert_close(embeds[row][mask[row]], expected[row])
    assert not torch.allclose(expected[0], expected[1])


def test_text_embeddings_untouched(tea_glm, graph, input_ids) -> None:
    embeds = lm_inputs_embeds(tea_glm, input_ids=input_ids, **graph)
    with torch.no_grad():
        plain = tea_glm.lm.get_input_embeddings()(input_ids)
    text = input_ids != tea_glm.graph_token_id
    assert torch.equal(embeds[text], plain[text])


def test_wrong_placeholder_count_raises(tea_glm, graph, input_ids) -> None:
    bad = input_ids.clone()
    first = (bad[1] == tea_glm.graph_token_id).nonzero()[0, 0]
    bad[1, first] = 5
    with pytest.raises(ValueError, match=r"exactly 5 .*found \[5, 4\] per row"):
        tea_glm(input_ids=bad, **graph)


def test_graph_input_routes(tea_glm, graph, input_ids) -> None:
    with torch.no_grad():
        via_gnn = tea_glm(input_ids=input_ids, **graph).logits
        h = tea_glm.gnn(graph["node_features"], graph["edge_index"])[graph["node_ids"]]
        via_embeds = tea_glm(input_ids=input_ids, graph_embeds=h).logits
    assert via_gnn.shape == (*input_ids.shape, tea_glm.lm.config.vocab_size)
    torch.testing.assert_close(via_gnn, via_embeds)
    with pytest.raises(ValueError, match="not both"):
        tea_glm(input_ids=input_ids, graph_embeds=h, **graph)
    with pytest.raises(ValueError, match="missing graph input"):
        tea_glm(input_ids=input_ids, node_features=graph["node_features"])
    with pytest.raises(ValueError, match=r"expected \(2, 16\)"):
        tea_glm(input_ids=input_ids, graph_embeds=h[:1])


def test_gradients_reach_projector_and_gnn_not_lm(tea_glm, graph, input_ids) -> None:
    labels = input_ids.masked_fill(input_ids == tea_glm.graph_token_id, -100)
    tea_glm.zero_grad(set_to_none=True)
    tea_glm(input_ids=input_ids, labels=labels, **graph).loss.backward()
    try:
        assert tea_glm.projector.weight.grad.abs().sum() > 0
        for conv in tea_glm.gnn.convs:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in conv.parameters())
        assert all(not p.requires_grad and p.grad is None for p in tea_glm.lm.parameters())
    finally:
        tea_glm.zero_grad(set_to_none=True)


# FusionTransformer


@pytest.fixture(scope="module")
def fusion() -> FusionTransformer:
    torch.manual_seed(0)
    return FusionTransformer().eval()


@pytest.fixture(scope="module")
def fusion_inputs(fusion: FusionTransformer) -> dict[str, torch.Tensor]:
    cfg = fusion.config
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, cfg.vocab_size, (3, 10), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    attention_mask[2, 2:] = 0
    return {
        "pixel_values": torch.randn(3, cfg.channels, cfg.image_size, cfg.image_size, generator=gen),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
    }


@torch.no_grad()
def test_fusion_logits_shape_and_determinism(fusion, fusion_inputs) -> None:
    logits = fusion(**fusion_inputs).logits
    assert logits.shape == (3, fusion.config.n_classes)
    assert torch.isfinite(logits).all()
    torch.manual_seed(0)
    assert torch.equal(FusionTransformer().eval()(**fusion_inputs).logits, logits)


@torch.no_grad()
def test_fusion_ignores_padded_text(fusion, fusion_inputs) -> None:
    before = fusion(**fusion_inputs).logits
    changed = fusion_inputs["input_ids"].clone()
    pad = fusion_inputs["attention_mask"] == 0
    changed[pad] = (changed[pad] + 1) % fusion.config.vocab_size
    after = fusion(**{**fusion_inputs, "input_ids": changed}).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    # A change at a valid position must show.
    changed[0, 0] = (changed[0, 0] + 1) % fusion.config.vocab_size
    assert not torch.allclose(fusion(**{**fusion_inputs, "input_ids": changed}).logits[0], before[0])


@torch.no_grad()
def test_fusion_batch_permutation_equivariant(fusion, fusion_inputs) -> None:
    perm = torch.tensor([2, 0, 1])
    logits = fusion(**fusion_inputs).logits
    permuted = fusion(**{k: v[perm] for k, v in fusion_inputs.items()}).logits
    torch.testing.assert_close(permuted, logits[perm])


@torch.no_grad()
def test_fusion_joint_sequence_is_image_then_text(fusion, fusion_inputs) -> None:
    seen = {}
    handle = fusion.fuse.register_forward_hook(lambda m, args, out: seen.update(joint=out))
    try:
        fusion(**fusion_inputs)
    finally:
        handle.remove()
    img = fusion.image_encoder(fusion_inputs["pixel_values"])
    txt = fusion.text_encoder(fusion_inputs["input_ids"], fusion_inputs["attention_mask"])
    n = fusion.config.n_patches
    assert seen["joint"].shape == (3, n + txt.shape[1], fusion.config.d_model)
    torch.testing.assert_close(seen["joint"][:, :n], img + fusion.modality_embed.weight[0])
    torch.testing.assert_close(seen["joint"][:, n:], txt + fusion.modality_embed.weight[1])


@torch.no_grad()
def test_attention_out_proj_input_is_concatenated_heads() -> None:
    torch.manual_seed(0)
    attn = Attention(d_model=16, n_heads=4).eval()
    x = torch.randn(2, 5, 16)
    key_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    seen = {}
    handle = attn.out_proj.register_forward_pre_hook(lambda m, args: seen.update(heads=args[0]))
    try:
        out = attn(x, key_mask)
    finally:
        handle.remove()
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    for head in range(4):
        cols = slice(head * 4, (head + 1) * 4)
        scores = q[..., cols] @ k[..., cols].transpose(1, 2) / 2.0
        scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
        expected = scores.softmax(-1) @ v[..., cols]
        torch.testing.assert_close(seen["heads"][..., cols], expected)
    torch.testing.assert_close(out, attn.out_proj(seen["heads"]))


@torch.no_grad()
def test_block_residual_structure() -> None:
    torch.manual_seed(0)
    block = Block(d_model=16, n_heads=4, d_mlp=32).eval()
    x = torch.randn(2, 5, 16)
    key_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    h = x + block.attn(block.ln1(x), key_mask)
    assert torch.equal(block(x, key_mask), h + block.mlp(block.ln2(h)))
    assert list(dict(block.mlp.named_children())) == ["fc1", "act", "fc2"]


def test_image_encoder_rejects_wrong_shape(fusion) -> None:
    with pytest.raises(ValueError, match=r"expected \[batch, 3, 16, 16\]"):
        fusion.image_encoder(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"expected \[batch, 3, 16, 16\]"):
        fusion.image_encoder(torch.randn(1, 3, 20, 20))


def test_fusion_config_validates() -> None:
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        FusionConfig(image_size=10, patch_size=4)
    assert FusionConfig().n_patches == 16
