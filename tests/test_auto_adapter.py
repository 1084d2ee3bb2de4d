"""Automatic adapters: multimodal classes with no table are wrapped from their config and module tree,
checked at wrap time; a fact that cannot be found raises naming it."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaModel

import mmlens
from mmlens.core.adapter import ADAPTERS, AutoAdapterError, find_adapter, register_adapter
from mmlens.data.loading import load_model
from mmlens.hooks.auto import auto_adapter, is_auto
from mmlens.runs.cli import main

AUTO_MODELS = {
    "tiny-random-mistral3": "Mistral3ForConditionalGeneration",
    "tiny-random-aya-vision": "AyaVisionForConditionalGeneration",
    "tiny-random-vipllava": "VipLlavaForConditionalGeneration",
}


@pytest.mark.parametrize("name", sorted(AUTO_MODELS))
def test_auto_adapter_wraps_exactly(name: str):
    loaded = load_model(name)
    inputs = loaded.example_inputs()
    hm = mmlens.wrap(loaded.model)
    assert hm.adapter.name == f"auto:{AUTO_MODELS[name]}" and is_auto(hm.adapter)
    assert not any(a.matches(loaded.model) for a in ADAPTERS)  # no hand-written table
    assert hm.check_report.skipped is None and not hm.check_report.unreached
    plain = loaded.model(**inputs).logits
    run = hm.run(inputs, cache=True)
    assert torch.equal(run.logits, plain)  # wrapped == plain, bit for bit
    assert set(run.cache) == set(hm.hook_points)  # every point fires
    clean = hm.run(inputs, edits=[mmlens.replace(n, run.cache[n]) for n in run.cache])
    assert torch.equal(clean.logits, plain)  # clean-into-clean
    spans = hm.spans(inputs)
    image_tokens = (inputs["input_ids"] == loaded.model.config.image_token_id).sum(1)
    assert torch.equal(spans.masks["image"].sum(1), image_tokens)
    assert run.cache["fusion.projector_out"].shape[-1] == loaded.model.config.text_config.hidden_size


def test_cli_hooks_lists_the_stages_of_an_auto_model():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["hooks", "tiny-random-mistral3", "--json"]) == 0
    rows = json.loads(out.getvalue())
    stages = {(r["stage"], r["modality"]) for r in rows}
    assert {("encoder", "image"), ("fusion", "image"), ("fusion", "fused"), ("lm", "fused")} <= stages
    assert all(r["shape"] for r in rows)


class MyVLM(nn.Module):
    """A user's VLM: a class name mmlens has never seen, the usual structure (vision tower, projector,
    language model, placeholders replaced by image features)."""

    def __init__(self, projector_name: str = "multi_modal_projector"):
        super().__init__()
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        vision.image_size, vision.patch_size = 16, 8
        text = LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
        )
        self.config = SimpleNamespace(image_token_id=63, vision_config=vision, text_config=text)
        self.vision_tower = CLIPVisionModel(vision)
        setattr(self, projector_name, nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32)))
        self.projector_name = projector_name
        self.language_model = LlamaModel(text)
        self.lm_head = nn.Linear(32, 64, bias=False)

    def forward(self, input_ids, pixel_values, attention_mask=None):
        embeds = self.language_model.embed_tokens(input_ids)
        features = getattr(self, self.projector_name)(self.vision_tower(pixel_values).last_hidden_state[:, 1:])
        mask = (input_ids == self.config.image_token_id)[..., None]
        embeds = embeds.masked_scatter(mask, features.to(embeds.dtype))
        hidden = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        return self.lm_head(hidden)


def my_vlm_inputs() -> dict:
    ids = torch.tensor([[1, 5, 6, *[63] * 4, 7], [1, 8, 9, *[63] * 4, 10]])
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def test_an_unseen_class_with_the_usual_structure_wraps():
    torch.manual_seed(0)
    model = MyVLM().eval()
    hm = mmlens.wrap(model)
    assert hm.adapter.name == "auto:MyVLM"
    assert hm.hook_points["vision.blocks.1.resid_mid"].stage == "encoder"
    assert hm.check_report.skipped is None and "vision.blocks.0.resid_mid" in hm.check_report.points
    inputs = my_vlm_inputs()
    run = hm.run(inputs, cache=True)
    assert torch.equal(run.logits, model(**inputs)) and set(run.cache) == set(hm.hook_points)
    assert run.spans.masks["image"].sum().item() == 8


def test_an_explicit_table_wins_over_the_automatic_one():
    model = MyVLM()
    table = dataclasses.replace(auto_adapter(model, causal=True), name="my-vlm")
    register_adapter(table)
    try:
        assert find_adapter(model) is table
    finally:
        ADAPTERS.remove(table)
    assert find_adapter(model).name == "auto:MyVLM"


def test_an_unfindable_fact_is_named_with_its_fix():
    model = MyVLM(projector_name="bridge")
    with pytest.raises(LookupError) as err:
        find_adapter(model)
    assert "projector" in str(err.value) and "auto_adapter(model, projector=" in str(err.value)
    assert auto_adapter(model, projector="bridge").points  # supplying the fact works
    model.config.image_token_id = None
    with pytest.raises(AutoAdapterError) as err:
        auto_adapter(model, projector="bridge")
    assert err.value.fact.startswith("the image placeholder token id") and "image_token_id=" in str(err.value)


def test_post_norm_blocks_are_not_guessed():
    config = Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, head_dim=8
    )
    with pytest.raises(AutoAdapterError) as err:
        auto_adapter(Gemma3ForCausalLM(config))
    assert "lm_layout" in err.value.fact and "post_feedforward_layernorm" in str(err.value)
