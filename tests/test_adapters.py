"""Every adapter: a hooked forward with no edit equals the plain model exactly, every hook point
fires, clean-into-clean patching is bit-exact, and stages/modalities are labelled right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmlens
from mmlens.core.spans import spans_from_blocks

# registry name -> expected {stage: {modalities}} ("fused" = the joint multimodal sequence)
EXPECTED = {
    "tinystories-656k": {"lm": {"fused"}},
    "tiny-random-gpt2": {"lm": {"fused"}},
    "tiny-random-phi3": {"lm": {"fused"}},
    "smollm2-135m-instruct": {"lm": {"fused"}},
    "tiny-random-llava": {"encoder": {"image"}, "fusion": {"image", "fused"}, "lm": {"fused"}},
    "tiny-random-idefics3": {"encoder": {"image"}, "fusion": {"image", "fused"}, "lm": {"fused"}},
    "tiny-random-qwen2-vl": {"encoder": {"image"}, "fusion": {"image", "fused"}, "lm": {"fused"}},
    "tiny-random-qwen2.5-vl": {"encoder": {"image"}, "fusion": {"image", "fused"}, "lm": {"fused"}},
    "tiny-random-gemma3": {"encoder": {"image"}, "fusion": {"image", "fused"}, "lm": {"fused"}},
    "tiny-random-llava-next": {"encoder": {"image"}, "fusion": {"image", "fused"}, "lm": {"fused"}},
    "tiny-random-llava-onevision": {"encoder": {"image"}, "fusion": {"image", "fused"}, "lm": {"fused"}},
    "tiny-random-smolvlm": {"encoder": {"image"}, "fusion": {"image", "fused"}, "lm": {"fused"}},
    "tiny-random-paligemma": {"encoder": {"image"}, "fusion": {"image", "fused"}, "lm": {"fused"}},
    "tiny-random-internvl": {"encoder": {"image"}, "fusion": {"image", "fused"}, "lm": {"fused"}},
    "tea-glm-tiny": {"encoder": {"graph"}, "fusion": {"graph", "fused"}, "lm": {"fused"}},
    "tea-glm": {"encoder": {"graph"}, "fusion": {"graph", "fused"}, "lm": {"fused"}},
    "tiny-fusion": {"encoder": {"image", "text"}, "fusion": {"fused"}, "lm": {"fused"}},
    "tiny-random-qwen2-audio": {"encoder": {"audio"}, "fusion": {"audio", "fused"}, "lm": {"fused"}},
    "tiny-random-voxtral": {"encoder": {"audio"}, "fusion": {"audio", "fused"}, "lm": {"fused"}},
    "tiny-random-qwen2.5-omni": {"encoder": {"image", "audio"}, "fusion": {"image", "audio", "fused"}, "lm": {"fused"}},
}


def logits_of(output):
    return output if isinstance(output, torch.Tensor) else output.logits


@pytest.mark.parametrize("name", list(EXPECTED))
def test_hooked_forward_is_exact_and_complete(name, loaded):
    lm = loaded(name)
    hm = mmlens.HookedModel(lm.model)
    inputs = lm.example_inputs()
    with torch.no_grad():
        plain = logits_of(lm.model(**inputs))
    run = hm.run(inputs, cache=True)
    assert (run.logits - plain).abs().max().item() == 0.0
    assert torch.equal(run.logits, plain)
    assert set(run.cache) == set(hm.hook_points), "some hook points never fired"
    patched = hm.run(inputs, edits=[mmlens.replace(n, run.cache[n]) for n in hm.hook_points])
    assert torch.equal(patched.logits, plain)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_stages_and_modalities(name, loaded):
    hm = mmlens.HookedModel(loaded(name).model)
    found: dict[str, set[str]] = {}
    for hp in hm.hook_points.values():
        found.setdefault(hp.stage, set()).add(hp.modality or "fused")
    assert found == EXPECTED[name]
    n_blocks = len({hp.layer for hp in hm.hook_points.values() if hp.prefix == "lm" and hp.layer is not None})
    for kind in ("resid_pre", "resid_mid", "resid_post", "attn_out", "z", "mlp_out"):
        assert len(hm.names(f"lm.blocks.*.{kind}")) == n_blocks, kind


@pytest.mark.parametrize(
    "name",
    [
        "tiny-random-gpt2",
        "tiny-random-phi3",
        "tiny-random-llava",
        "tiny-random-idefics3",
        "tiny-random-llava-next",
        "tiny-random-llava-onevision",
        "tiny-random-smolvlm",
        "tiny-random-paligemma",
        "tiny-random-internvl",
        "tea-glm-tiny",
        "tiny-fusion",
    ],
)
def test_resid_mid_write_matches_a_recomputed_block(name, loaded):
    """Setting resid_mid to X makes the block output X + mlp(norm(X)) in every block family."""
    lm = loaded(name)
    hm = mmlens.HookedModel(lm.model)
    inputs = lm.example_inputs()
    clean = hm.run(inputs, cache=True).cache
    x = clean["lm.blocks.0.resid_mid"] * 1.5
    run = hm.run(
        inputs,
        edits=[mmlens.replace("lm.blocks.0.resid_mid", x)],
        cache=["lm.blocks.0.mlp_out", "lm.blocks.0.resid_post"],
    )
    assert torch.equal(run.cache["lm.blocks.0.resid_post"], x + run.cache["lm.blocks.0.mlp_out"])
    assert not torch.allclose(run.cache["lm.blocks.0.mlp_out"], clean["lm.blocks.0.mlp_out"])


def test_tea_glm_graph_span_holds_the_projected_tokens(loaded):
    lm = loaded("tea-glm-tiny")
    hm = mmlens.HookedModel(lm.model)
    inputs = lm.example_inputs()
    run = hm.run(inputs, cache=["fusion.projector_out", "fusion.embeds", "graph.blocks.0.out"])
    k = lm.model.num_graph_tokens
    assert run.spans.masks["graph"].sum(1).tolist() == [k] * inputs["input_ids"].shape[0]
    tokens = run.cache["fusion.projector_out"].unflatten(-1, (k, -1))
    assert torch.equal(run.cache["fusion.embeds", "graph"], tokens)
    neutral = hm.run(hm.neutral(inputs, "graph"), cache="fusion.projector_out")
    bias = lm.model.projector.bias.detach().expand_as(neutral.cache["fusion.projector_out"])
    assert torch.equal(neutral.cache["fusion.projector_out"], bias)


def _mmlens_cli() -> list[str]:
    script = Path(sys.executable).parent / "mmlens"
    assert script.exists(), f"console script missing at {script}: is mmlens pip-installed in this environment?"
    return [str(script)]


@pytest.mark.parametrize(
    "name,encoder_modality",
    [
        ("tiny-random-llava", "image"),
        ("tea-glm", "graph"),
        ("tiny-random-qwen2-vl", "image"),
        ("tiny-random-gemma3", "image"),
    ],
)
def test_cli_hooks_json_lists_every_stage(name, encoder_modality):
    out = subprocess.run(
        [*_mmlens_cli(), "hooks", name, "--json"], capture_output=True, text=True, check=True, timeout=600
    )
    rows = json.loads(out.stdout)
    stages = {r["stage"] for r in rows}
    assert stages == {"encoder", "fusion", "lm"}
    assert {r["modality"] for r in rows if r["stage"] == "encoder"} == {encoder_modality}
    assert {r["modality"] for r in rows if r["stage"] == "lm"} == {"fused"}
    assert all({"name", "stage", "modality", "module", "shape"} <= r.keys() for r in rows)
    assert all(r["shape"] for r in rows), "every hook point has a measured shape"
    by_name = {r["name"]: r for r in rows}
    assert by_name["fusion.embeds"]["shape"][1] == by_name["lm.logits"]["shape"][1]


def test_cli_reports_unknown_model():
    out = subprocess.run(
        [*_mmlens_cli(), "hooks", "no-such-model"], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 2 and "tiny-random-llava" in out.stderr


# -- the tables' own facts and the registry ------------------------------------------------------------
@pytest.mark.parametrize("adapter", mmlens.hooks.BUILT_IN, ids=lambda a: a.name)
def test_every_table_names_the_inputs_of_its_modalities(adapter):
    """Every modality with a neutral reference, perturbations or an encoder names its input keys, and
    every required or shared input belongs to a modality."""
    from mmlens.metrics.perturb import PERTURBATIONS

    keys = {k for ks in adapter.modality_inputs.values() for k in ks}
    encoders = {s.modality for s in adapter.stacks if s.modality} | {p.modality for p in adapter.points if p.modality}
    assert set(adapter.neutral) | set(adapter.perturbations) | encoders <= set(adapter.modality_inputs)
    assert set(adapter.required_inputs) | set(adapter.shared_inputs) <= keys
    for modality, kinds in adapter.perturbations.items():
        assert set(kinds) <= set(PERTURBATIONS[modality]), modality


def test_registry_lives_in_the_core_and_later_registrations_win(tinystories):
    from dataclasses import replace

    from mmlens.core import adapter as registry

    hm, _ = tinystories
    assert mmlens.register_adapter is registry.register_adapter is mmlens.hooks.register_adapter
    assert registry.find_adapter(hm.model) is mmlens.hooks.LLAMA_FAMILY
    mine = mmlens.register_adapter(replace(mmlens.hooks.LLAMA_FAMILY, name="mine"))
    try:
        assert registry.find_adapter(hm.model) is mine and mmlens.wrap(hm.model).adapter is mine
    finally:
        registry.ADAPTERS.remove(mine)
    assert registry.find_adapter(hm.model) is mmlens.hooks.LLAMA_FAMILY
    with pytest.raises(TypeError, match="mmlens.Adapter"):
        mmlens.register_adapter(object())


def test_a_table_is_checked_at_wrap_time(tinystories):
    from dataclasses import replace

    hm, _ = tinystories
    bad = replace(hm.adapter, perturbations={**hm.adapter.perturbations, "image": {}})
    with pytest.raises(ValueError, match=r"perturbations names modalities \['image'\] that modality_inputs"):
        mmlens.wrap(hm.model, adapter=bad)


def test_readout_logits_at_the_last_real_position():
    adapter = mmlens.hooks.LLAMA_FAMILY
    logits = torch.arange(2 * 5 * 3.0).view(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    spans = mmlens.ModalitySpans({"text": mask.bool()}, mask.bool())
    assert torch.equal(adapter.readout_logits(logits, spans), logits[[0, 1], [4, 2]])
    # two soft tokens prepended to a text mask: the spans of the fused sequence say where the last one is
    fused = spans_from_blocks(2, {"image": 2, "text": 3}, {"text": mask[:, 2:]})
    assert torch.equal(adapter.readout_logits(logits, fused), logits[[0, 1], [4, 2]])
    assert torch.equal(adapter.readout_logits(logits[:, 0], spans), logits[:, 0])
