"""The wrap-time self-check (issue 13, finding 9): a wrong adapter table fails at wrap time, naming
the point that does not reproduce; a right one wraps, once per (model class, adapter)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

import mmlens
from mmlens.core.adapter import Adapter, language_model
from mmlens.core.selfcheck import AdapterCheckError, forget_verdicts
from mmlens.hooks import LLAMA_FAMILY
from mmlens.hooks.language_models import text_spans


@pytest.fixture(autouse=True)
def fresh_verdicts():
    forget_verdicts()
    yield
    forget_verdicts()


def tiny_gemma3() -> Gemma3ForCausalLM:
    config = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


def test_post_norm_blocks_under_the_llama_layout_fail_naming_resid_mid():
    model = tiny_gemma3()
    with pytest.raises(AdapterCheckError) as err:
        mmlens.wrap(model, adapter=dataclasses.replace(LLAMA_FAMILY, architectures=("Gemma3ForCausalLM",)))
    assert err.value.point == "lm.blocks.0.resid_mid" and err.value.difference > 1e-3
    message = str(err.value)
    assert "'lm.blocks.0.resid_mid'" in message and "max |difference|" in message and "BlockLayout" in message
    assert "check=False" in message
    hm = mmlens.wrap(model, adapter=LLAMA_FAMILY, check=False)  # skipping the check wraps
    assert hm.check_report is None


class Attention(nn.Module):
    def __init__(self, d: int, causal: bool):
        super().__init__()
        self.causal, self.qkv, self.o_proj = causal, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 4, -1)).unbind(2)
        z = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=self.causal
        )
        return self.o_proj(z.transpose(1, 2).flatten(2))


class Block(nn.Module):
    """Llama module names; ``mlp_reads_input`` makes the MLP read the block input (not the mid stream),
    ``scale`` scales the attention branch before it is added (MiniCPM-style residual scaling)."""

    def __init__(self, d: int, causal: bool, mlp_reads_input: bool, scale: float):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn, self.mlp = (
            Attention(d, causal),
            nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)),
        )
        self.mlp_reads_input, self.scale = mlp_reads_input, scale

    def forward(self, hidden_states):
        mid = hidden_states + self.scale * self.self_attn(self.input_layernorm(hidden_states))
        return mid + self.mlp(self.post_attention_layernorm(hidden_states if self.mlp_reads_input else mid))


class TinyLM(nn.Module):
    def __init__(self, causal: bool = True, mlp_reads_input: bool = False, scale: float = 1.0, d: int = 16):
        super().__init__()
        self.embed_tokens = nn.Embedding(32, d)
        self.layers = nn.ModuleList([Block(d, causal, mlp_reads_input, scale) for _ in range(2)])
        self.norm, self.lm_head = nn.LayerNorm(d), nn.Linear(d, 32)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed_tokens(input_ids)
        for block in self.layers:
            h = block(h)
        return self.lm_head(self.norm(h))


def tiny_lm_adapter(name: str) -> Adapter:
    stack, points = language_model(base="", logits="lm_head", n_heads=None)
    return Adapter(name=name, architectures=("TinyLM",), stacks=(stack,), points=points, spans=text_spans)


PROBE = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}


def test_a_right_table_wraps_and_reports_what_it_checked():
    torch.manual_seed(0)
    hm = mmlens.wrap(TinyLM(), adapter=tiny_lm_adapter("tiny-lm"), check=PROBE)
    report = hm.check_report
    assert report.skipped is None and report.causal_positions == (5,)
    assert {"lm.blocks.0.resid_mid", "lm.blocks.0.attn_out", "lm.embed", "lm.logits"} <= set(report.points)


def test_bidirectional_attention_declared_causal_fails():
    torch.manual_seed(0)
    with pytest.raises(AdapterCheckError) as err:
        mmlens.wrap(TinyLM(causal=False), adapter=tiny_lm_adapter("tiny-lm"), check=PROBE)
    assert err.value.check == "causal" and "causal=False" in str(err.value)
    adapter = dataclasses.replace(tiny_lm_adapter("tiny-lm"), causal=False)
    assert mmlens.wrap(TinyLM(causal=False), adapter=adapter, check=PROBE).check_report.causal_positions == ()


def test_an_mlp_that_does_not_read_the_mid_stream_fails_at_resid_mid():
    torch.manual_seed(0)
    with pytest.raises(AdapterCheckError) as err:
        mmlens.wrap(TinyLM(mlp_reads_input=True), adapter=tiny_lm_adapter("tiny-lm"), check=PROBE)
    assert err.value.point == "lm.blocks.0.resid_mid"


def test_a_scaled_branch_reproduces_clean_but_fails_the_residual_check():
    """Writes at every point reproduce (clean-into-clean passes), but attn_out is not what the block
    adds to its residual stream: patching attn_out and resid_mid would mean different things."""
    torch.manual_seed(0)
    with pytest.raises(AdapterCheckError) as err:
        mmlens.wrap(TinyLM(scale=0.5), adapter=tiny_lm_adapter("tiny-lm"), check=PROBE)
    assert err.value.check == "residual" and err.value.point == "lm.blocks.0.resid_mid"


def test_verdict_is_cached_per_class_and_adapter():
    torch.manual_seed(0)
    model, adapter = TinyLM(), tiny_lm_adapter("tiny-lm")
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    mmlens.wrap(model, adapter=adapter, check=PROBE)
    first = len(calls)
    mmlens.wrap(model, adapter=adapter, check=PROBE)
    assert first > 0 and len(calls) == first  # the same class and adapter: no forward
    mmlens.wrap(model, adapter=tiny_lm_adapter("tiny-lm"), check=PROBE)  # another adapter object: checked again
    assert len(calls) > first


def test_the_default_probe_of_a_text_lm_is_its_dummy_inputs():
    model = tiny_gemma3()
    probe = LLAMA_FAMILY.probe_inputs(model)
    assert set(probe) == {"input_ids"} and probe["input_ids"].shape == (1, 5)
    assert tiny_lm_adapter("tiny-lm").probe_inputs(TinyLM()) is None  # not a Hugging Face model: no probe
    report = mmlens.wrap(TinyLM(), adapter=tiny_lm_adapter("tiny-lm")).check_report
    assert report.skipped and "probe" in report.skipped


def test_a_hand_vlm_table_with_an_image_probe_checks_its_vision_stack():
    from mmlens.data.loading import load_model
    from mmlens.hooks import LLAVA
    from mmlens.hooks.auto import auto_probe

    model = load_model("tiny-random-llava").model
    text_only = mmlens.wrap(model).check_report
    assert "vision.blocks.*.resid_mid" in text_only.unreached  # dummy_inputs: text only
    report = mmlens.wrap(model, adapter=dataclasses.replace(LLAVA, probe=auto_probe)).check_report
    assert not report.unreached and "vision.blocks.0.resid_mid" in report.points
    assert len(report.causal_positions) == 2  # the last position and the last image position


def test_bfloat16_models_pass_with_a_dtype_scaled_tolerance():
    from mmlens.data.loading import load_model

    loaded = load_model("tiny-random-mistral3", dtype=torch.bfloat16)
    report = mmlens.wrap(loaded.model, check=loaded.example_inputs()).check_report
    assert report.skipped is None and "lm.blocks.0.resid_mid" in report.points
