"""Remote execution through nnsight: ``hooked.run(..., backend="nnsight", remote=...)`` reaches
nnsight's ``trace(remote=...)``, and what NDIF needs (an API key, a hub id) is named when missing.
No network here: the NDIF call itself is replaced by a spy."""

from __future__ import annotations

import nnsight
import pytest
from nnsight.modeling.mixins.remotable import Remotable

import mmlens


@pytest.fixture
def hooked(loaded):
    lm = loaded("tinystories-656k")
    inputs = dict(lm.tokenizer(["Tom had a red ball"], return_tensors="pt"))
    return mmlens.HookedModel(lm.model, tokenizer=lm.tokenizer), inputs


def test_remote_reaches_nnsights_trace(hooked, monkeypatch):
    hm, inputs = hooked
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", "test-key")
    monkeypatch.setattr(hm.model.config, "name_or_path", "org/hosted-model")
    seen = []

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("remote"))
        raise ConnectionError("NDIF unreachable (spy)")

    monkeypatch.setattr(Remotable, "trace", spy)
    with pytest.raises(RuntimeError, match=r"remote execution \(https?://.*\) failed: ConnectionError.*NDIF_API_KEY"):
        hm.run(inputs, cache="lm.blocks.0.resid_post", backend="nnsight", remote=True)
    assert seen == [True]
    with pytest.raises(RuntimeError, match=r"remote execution \(http://my-ndif:8000\) failed"):
        hm.run(inputs, backend="nnsight", remote="http://my-ndif:8000")
    assert seen == [True, "http://my-ndif:8000"]


def test_missing_api_key_and_local_models_are_named(hooked, monkeypatch):
    hm, inputs = hooked
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    with pytest.raises(RuntimeError, match="NDIF_API_KEY.*set_default_api_key"):
        hm.run(inputs, backend="nnsight", remote=True)
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", "test-key")
    with pytest.raises(RuntimeError, match="loaded from .*tinystories-656k.*load it by hub id"):
        hm.run(inputs, backend="nnsight", remote=True)


def test_remote_needs_the_nnsight_backend(hooked):
    hm, inputs = hooked
    with pytest.raises(ValueError, match="remote=True needs backend='nnsight'"):
        hm.run(inputs, remote=True)


def test_local_simulation_states_that_the_plan_does_not_serialize(hooked):
    """nnsight's serverless simulation of the remote path (remote="local") serializes the trace as
    NDIF would; mmlens's hook plan does not serialize yet, and the error says so (docs/scale-out.md).
    When this starts passing through, update the docs and turn this into an equality test."""
    hm, inputs = hooked
    with pytest.raises(RuntimeError, match="nnsight's local simulation.*could not be serialized"):
        hm.run(inputs, cache="lm.blocks.0.resid_post", backend="nnsight", remote="local")
    local = hm.run(inputs, cache="lm.blocks.0.resid_post", backend="nnsight")  # the local backend is untouched
    assert local.logits.equal(hm.run(inputs).logits)
