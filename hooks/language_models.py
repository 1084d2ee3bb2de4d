"""Text-only causal LMs: the Llama family (Llama, Mistral, Qwen2, SmolLM2, Phi-3) and GPT-2."""

from __future__ import annotations

from mmlens.core.adapter import GPT2_BLOCK, Adapter, language_model
from mmlens.core.spans import spans_from_token_ids
from mmlens.core.units import token_units
from mmlens.metrics.perturb import token_perturbations

_llama_stack, _llama_points = language_model(base="model", logits="lm_head")
_gpt2_stack, _gpt2_points = language_model(
    base="transformer",
    logits="lm_head",
    layout=GPT2_BLOCK,
    n_heads="config.n_head",
    blocks="h",
    embed="wte",
    final_norm="ln_f",
)


def text_spans(model, inputs):
    """Every real position is text."""
    return spans_from_token_ids(inputs["input_ids"], inputs.get("attention_mask"), {})


def neutral_text(model, inputs, spans):
    """Every text position set to the pad (else eos) token; other modalities' positions untouched."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", config)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = getattr(config, "eos_token_id", None)
    if isinstance(pad, (list, tuple)):
        pad = pad[0]
    if pad is None:
        raise ValueError(
            "the model config has no pad_token_id or eos_token_id to build a neutral text; set config.pad_token_id"
        )
    text = spans.masks["text"].to(inputs["input_ids"].device)
    return {**inputs, "input_ids": inputs["input_ids"].masked_fill(text, int(pad))}


TEXT_UNITS = {"text": token_units("input_ids", neutral_text)}
"""Input-level units of a text-only LM: its tokens, a removed one set to the pad (else eos) id."""

LLAMA_FAMILY = Adapter(
    name="hf-causal-lm",
    architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM"),
    stacks=(_llama_stack,),
    points=_llama_points,
    spans=text_spans,
    neutral={"text": neutral_text},
    modality_inputs={"text": ("input_ids", "attention_mask")},
    perturbations={"text": token_perturbations("input_ids")},
    input_units=TEXT_UNITS,
)

GPT2 = Adapter(
    name="gpt2",
    architectures=("GPT2LMHeadModel",),
    stacks=(_gpt2_stack,),
    points=_gpt2_points,
    spans=text_spans,
    neutral={"text": neutral_text},
    modality_inputs={"text": ("input_ids", "attention_mask")},
    perturbations={"text": token_perturbations("input_ids")},
    input_units=TEXT_UNITS,
)
