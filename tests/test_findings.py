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
