"""Interop: TransformerLens names, the TransformerBridge, the torchvision-install guard, and the
nnsight backend (results equal to the torch-hook backend).

Every test that boots a bridge runs with ``subprocess`` disarmed (``no_subprocess``), so a test can
never install anything, whatever TransformerLens does; the guard tests check that it is mmlens's
guard, not that fixture, that stops the install.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

import mmlens
from mmlens.core import backends as interop
from mmlens.core.names import from_transformer_lens_name, to_transformer_lens_name

from .conftest import text_batch


@pytest.fixture(autouse=True)
def no_subprocess(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a test tried to run a subprocess: {args}")

    monkeypatch.setattr(subprocess, "check_call", refuse)
    monkeypatch.setattr(subprocess, "run", refuse)


# -- models -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    return mmlens.wrap(model), text_batch(100, seq=7)


@pytest.fixture(scope="module")
def story_tokenizer(models_dir: Path):
    tok = AutoTokenizer.from_pretrained(models_dir / "tinystories-656k")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def tiny_llava(tokenizer) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>")
    )
    return LlavaForConditionalGeneration(config).eval()


def llava_inputs(image_id: int) -> dict[str, torch.Tensor]:
    """Two rows, 16 image positions each (at different offsets), 4 text positions."""
    ids = torch.tensor([[1, 5] + [image_id] * 16 + [7, 8], [1] + [image_id] * 16 + [4, 5, 6]])
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(2, 3, 32, 32, generator=g),
    }


@pytest.fixture(scope="module")
def llava(story_tokenizer):
    model = tiny_llava(story_tokenizer)
    return mmlens.wrap(model), llava_inputs(model.config.image_token_id)


def assert_same_run(a, b) -> None:
    """Two RunResults hold bit-identical logits and caches."""
    assert torch.equal(a.logits, b.logits)
    assert sorted(a.cache) == sorted(b.cache)
    for name in a.cache:
        assert torch.equal(a.cache[name], b.cache[name]), name


# -- TransformerLens names --------------------------------------------------------------------------
def test_tl_names_round_trip(llava):
    hm, _ = llava
    mapped = [n for n in hm.hook_points if to_transformer_lens_name(n)]
    assert {
        "lm.blocks.1.resid_mid",
        "lm.blocks.0.z",
        "vision.blocks.1.attn_out",
        "fusion.projector_out",
        "lm.final_norm",
        "lm.logits",
        "lm.embed",
        "vision.embed",
    } <= set(mapped)
    for name in mapped:
        assert from_transformer_lens_name(to_transformer_lens_name(name)) == name
    assert to_transformer_lens_name("lm.blocks.3.resid_post") == "blocks.3.hook_resid_post"
    assert to_transformer_lens_name("vision.blocks.0.z") == "vision_encoder.encoder_layers.0.attn.hook_z"
    assert from_transformer_lens_name("blocks.2.hook_out") == "lm.blocks.2.resid_post"
    # the bridge fires ln_final.hook_normalized before the norm's weight: not our lm.final_norm
    assert from_transformer_lens_name("ln_final.hook_normalized") is None
    assert from_transformer_lens_name("blocks.0.attn.hook_pattern") is None
    assert to_transformer_lens_name("fusion.embeds") is None


def test_tl_names_are_accepted_as_aliases(llama):
    hm, inputs = llama
    run = hm.run(inputs, cache=["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"])
    assert set(run.cache) == {"lm.blocks.0.resid_post", "lm.blocks.1.z"}
    edited = hm.run(inputs, edits=[mmlens.ablate("blocks.2.hook_mlp_out")], cache="lm.blocks.2.mlp_out")
    assert torch.all(edited.cache["lm.blocks.2.mlp_out"] == 0)


# -- nnsight backend --------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", [None, True])
def test_nnsight_reads_equal_torch_hooks(llama, llava, cache):
    for hm, inputs in (llama, llava):
        torch_run = hm.run(inputs, cache=cache)
        nn_run = hm.run(inputs, cache=cache, backend="nnsight")
        assert_same_run(torch_run, nn_run)
        with torch.no_grad():
            assert torch.equal(nn_run.logits, hm.model(**inputs).logits)
        assert nn_run.spans.same_layout(torch_run.spans)


def test_nnsight_edits_equal_torch_hooks_llama(llama):
    hm, inputs = llama
    other = hm.run(text_batch(100, seq=7, seed=1), cache=True).cache
    edits = [
        mmlens.replace("lm.blocks.1.resid_mid", other["lm.blocks.1.resid_mid"]),
        mmlens.replace("lm.blocks.0.z", other["lm.blocks.0.z"], heads=[1], at="last"),
        mmlens.add("blocks.2.hook_mlp_out", 0.5, at=[1, 2]),
    ]
    torch_run = hm.run(inputs, edits=edits, cache=True)
    nn_run = hm.run(inputs, edits=edits, cache=True, backend="nnsight")
    assert_same_run(torch_run, nn_run)
    assert not torch.equal(nn_run.logits, hm.run(inputs).logits)
    # resid_mid write semantics: the block adds its MLP to the written stream
    assert torch.equal(nn_run.cache["lm.blocks.1.resid_post"], other["lm.blocks.1.resid_post"])
    z = nn_run.cache["lm.blocks.0.z"]
    assert torch.equal(z[:, -1, 1], other["lm.blocks.0.z"][:, -1, 1])


def test_nnsight_edits_equal_torch_hooks_llava(llava):
    """Includes a write to a vision block's output (via resid_mid) that must reach the projector: LLaVA
    reads vision hidden_states[-2], which transformers records with its own forward hooks."""
    hm, inputs = llava
    other = hm.run({**inputs, "pixel_values": inputs["pixel_values"].flip(0)}, cache=True).cache
    edits = [
        mmlens.replace("vision.blocks.0.resid_mid", other["vision.blocks.0.resid_mid"], at=[0, 3]),
        mmlens.replace("lm.blocks.0.z", other["lm.blocks.0.z"], heads=[0, 2], at="image"),
        mmlens.replace("lm.blocks.1.resid_mid", other["lm.blocks.1.resid_mid"], at="last_text"),
        mmlens.apply("fusion.projector_out", lambda act, ctx: act * 2),
    ]
    torch_run = hm.run(inputs, edits=edits, cache=True)
    assert_same_run(torch_run, hm.run(inputs, edits=edits, cache=True, backend="nnsight"))


def test_nnsight_skips_unrun_modules_like_torch_hooks(llava):
    hm, inputs = llava
    text_only = {k: v for k, v in inputs.items() if k != "pixel_values"}
    text_only["input_ids"] = text_only["input_ids"].clamp(max=100)
    assert_same_run(hm.run(text_only, cache=True), hm.run(text_only, cache=True, backend="nnsight"))
    with pytest.raises(RuntimeError, match="never reached"):
        hm.run(text_only, cache="vision.blocks.0.resid_post", backend="nnsight")


def test_nnsight_gradients_equal_torch_hooks(llama):
    hm, inputs = llama
    grads = []
    for backend in ("torch", "nnsight"):
        run = hm.run(inputs, cache="lm.blocks.1.resid_post", keep_grad=True, backend=backend)
        act = run.cache["lm.blocks.1.resid_post"]
        (grad,) = torch.autograd.grad(run.logits[:, -1].logsumexp(-1).sum(), act)
        grads.append(grad)
    assert torch.equal(*grads)


def test_nnsight_refuses_modules_that_run_twice():
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    ).eval()
    model.model.layers[1] = model.model.layers[0]  # one block, called twice per forward
    hm = mmlens.wrap(model)
    inputs = text_batch(50, seq=5)
    with pytest.raises(NotImplementedError, match="more than once"):
        hm.run(inputs, cache="lm.blocks.0.resid_post", backend="nnsight")
    with pytest.raises(ValueError, match="unknown backend"):
        hm.run(inputs, backend="jax")


# -- TransformerBridge ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def story_bridge(models_dir: Path):
    """A bridge booted around TinyStories-656K, and the same checkpoint loaded plainly (eager
    attention, as booting switches the bridged model to eager)."""
    from transformer_lens.model_bridge import TransformerBridge

    path = models_dir / "tinystories-656k"
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    with interop.no_torchvision_install():
        bridge = TransformerBridge.boot_transformers(str(path), hf_model=hf, tokenizer=tokenizer)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return bridge, plain, tokenizer


def test_bridge_replaces_hf_modules_but_our_paths_resolve(story_bridge):
    bridge, _, _ = story_bridge
    hf = bridge.original_model
    assert type(hf.model.layers[0]).__name__ == "BlockBridge"
    assert "model.layers.0.post_attention_layernorm" not in dict(hf.named_modules())
    hm = mmlens.wrap(bridge)
    assert hm.model is hf and hm.tokenizer is bridge.tokenizer and hm.adapter.name == "hf-causal-lm"


def test_wrapped_bridge_equals_plain_hf_and_bridge_hooks(story_bridge):
    bridge, plain, tokenizer = story_bridge
    hm = mmlens.wrap(bridge)
    inputs = dict(tokenizer(["Once upon a time there was", "The cat sat on the mat"], return_tensors="pt"))
    run = hm.run(inputs, cache=True)
    with torch.no_grad():
        assert torch.equal(run.logits, plain(**inputs).logits)
    # unpadded input: the bridge's own forward derives position ids from the mask, so only
    # without padding is it the same computation as HF's
    logits, tl_cache = bridge.run_with_cache(inputs["input_ids"], attention_mask=inputs["attention_mask"])
    torch.testing.assert_close(logits, run.logits)
    compared = set()
    for tl_name in tl_cache:
        ours = from_transformer_lens_name(tl_name)
        if ours in set(run.cache):
            torch.testing.assert_close(run.cache[ours], tl_cache[tl_name], msg=tl_name)
            compared.add(ours)
    assert compared == set(hm.hook_points)
    assert_same_run(run, hm.run(inputs, cache=True, backend="nnsight"))


def test_wrapping_a_compatibility_mode_bridge_is_refused(story_bridge, monkeypatch):
    bridge, _, _ = story_bridge
    monkeypatch.setattr(bridge, "compatibility_mode", True)
    with pytest.raises(ValueError, match="compatibility mode"):
        mmlens.wrap(bridge)


def test_llava_bridge_with_a_saved_processor(story_tokenizer):
    model = tiny_llava(story_tokenizer)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=story_tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    bridge = interop.boot_bridge(model, processor=processor)
    hm = mmlens.wrap(bridge)
    assert type(hm.processor).__name__ == "LlavaProcessor"
    inputs = llava_inputs(model.config.image_token_id)
    run = hm.run(inputs, cache=True)
    logits, tl_cache = bridge.run_with_cache(
        inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"]
    )
    assert torch.equal(logits, run.logits)
    compared = set()
    for tl_name in tl_cache:
        ours = from_transformer_lens_name(tl_name)
        if ours in set(run.cache):
            torch.testing.assert_close(run.cache[ours], tl_cache[tl_name], msg=tl_name)
            compared.add(ours)
    assert compared == set(hm.hook_points) - {"fusion.embeds"}  # no TL counterpart
    assert_same_run(run, hm.run(inputs, cache=True, backend="nnsight"))


# -- torchvision guard ------------------------------------------------------------------------------
def test_guard_replaces_the_installer_transformer_lens_calls():
    from transformer_lens.model_bridge.sources.transformers import helpers

    original = helpers._ensure_torchvision
    assert "_ensure_torchvision" in helpers.load_modality_processor.__code__.co_names
    with interop.no_torchvision_install():
        assert helpers._ensure_torchvision is interop._refuse_torchvision_install
    assert helpers._ensure_torchvision is original


def test_booting_a_vlm_without_processor_raises_instead_of_installing(story_tokenizer, monkeypatch):
    """No processor in the boot folder: TransformerLens would pip-install torchvision; the guard raises."""
    monkeypatch.setitem(sys.modules, "torchvision", None)  # missing, even where it is installed
    with pytest.raises(RuntimeError, match=r"pip install torchvision.*mmlens blocked it"):
        interop.boot_bridge(tiny_llava(story_tokenizer), story_tokenizer)
