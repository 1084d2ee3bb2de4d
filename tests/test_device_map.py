"""Models placed with a device_map (accelerate dispatch, some blocks offloaded to disk) are wrapped exactly."""

from __future__ import annotations

import pytest
import torch

import mmlens

OFFLOADED = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


def test_a_model_with_blocks_on_disk_is_wrapped_exactly(tmp_path):
    plain = mmlens.load_model("tinystories-656k")
    placed = mmlens.load_model("tinystories-656k", device_map=OFFLOADED, offload_folder=tmp_path)
    assert placed.model.hf_device_map["model.layers.1"] == "disk"
    assert any(tmp_path.iterdir()), "the disk block's weights are in the offload folder"
    inputs = placed.example_inputs()
    hooked = mmlens.wrap(placed.model)
    with torch.no_grad():
        reference = placed.model(**inputs).logits
        assert torch.equal(reference, plain.model(**plain.example_inputs()).logits)
    run = hooked.run(inputs, cache=True)
    assert torch.equal(run.logits, reference)
    assert set(run.cache) == set(hooked.hook_points)
    patched = hooked.run(inputs, edits=[mmlens.replace(name, run.cache[name]) for name in hooked.hook_points])
    assert torch.equal(patched.logits, reference)
    zeroed = hooked.run(inputs, edits=[mmlens.ablate("lm.blocks.1.mlp_out")])
    assert not torch.equal(zeroed.logits, reference), "an edit inside the offloaded block takes effect"


def test_disk_placement_without_an_offload_folder_is_refused():
    with pytest.raises(ValueError, match="offload_folder"):
        mmlens.load_model("tinystories-656k", device_map=OFFLOADED)


@pytest.mark.parametrize(
    ("device", "hint"), [("meta", "holds no weights"), ("cuda:7" if not torch.cuda.is_available() else "nope", "")]
)
def test_devices_this_machine_cannot_use_are_named(device, hint):
    with pytest.raises(ValueError, match=f"device=.*{hint}"):
        mmlens.load_model("tiny-random-gpt2", device=device)
