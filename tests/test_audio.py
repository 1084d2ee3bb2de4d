"""Audio-language and tri-modal models: Qwen2-Audio, Voxtral, Qwen2.5-Omni's thinker.

Token counts as the processors make them, the audio span, neutral audio = silence through the
Whisper feature extractor, the log-mel perturbations against the extractor run on the edited
waveform, Whisper block writes, the encoder projection, and the CLI's stage listing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mmlens
from mmlens.data.tiny_audio import HOP_LENGTH, log_mel, waveforms
from mmlens.hooks.qwen2_audio import silence
from mmlens.metrics.perturb import WHISPER_FLOOR, audio_gain, audio_noise, audio_time_shift, perturb

AUDIO_MODELS = ["tiny-random-qwen2-audio", "tiny-random-voxtral", "tiny-random-qwen2.5-omni"]
N_MELS = 16


@pytest.fixture(scope="module")
def speech():
    """Two waveforms (0.6 s, 0.4 s) and their log-mel padded to 1 s: ([w], Float[2, 16, 100], Long[2, 100])."""
    w = waveforms(0, [0.6, 0.4])
    features, frames = log_mel(w, N_MELS, 100)
    return w, features, frames


@pytest.mark.parametrize("name", AUDIO_MODELS)
def test_audio_span_has_the_processors_token_count(name, loaded):
    lm = loaded(name)
    hm = mmlens.wrap(lm.model)
    inputs = lm.example_inputs()
    spans = hm.spans(inputs)
    tower = lm.model.model.audio_tower
    if "feature_attention_mask" in inputs:
        _, expected = tower._get_feat_extract_output_lengths(inputs["feature_attention_mask"].sum(-1))
    else:  # Voxtral: every chunk's frames, 4 encoder frames per token
        config = lm.model.config.audio_config
        per_chunk = config.max_source_positions * config.hidden_size // config.intermediate_size
        expected = torch.full((inputs["input_features"].shape[0],), per_chunk)
    assert spans.masks["audio"].sum(1).tolist() == expected.tolist()
    ids = inputs["input_ids"]
    assert torch.equal(spans.masks["audio"], ids == lm.model.config.audio_token_id)
    real = inputs["attention_mask"].bool()
    assert torch.equal(spans.masks["text"], real & ~spans.masks["audio"] & ~spans.masks.get("image", ~real))
    run = hm.run(inputs, cache=["fusion.audio_projector_out", "fusion.embeds"])
    spliced = run.cache["fusion.embeds"][spans.masks["audio"]]
    projected = run.cache["fusion.audio_projector_out"].reshape(-1, spliced.shape[-1])
    if name == "tiny-random-qwen2-audio":  # the projector runs on every encoder frame; the model keeps the real ones
        keep = torch.arange(projected.shape[0] // 2)[None] < expected[:, None]
        projected = projected.view(2, -1, spliced.shape[-1])[keep]
    assert torch.equal(spliced, projected)


def test_omni_has_three_spans_and_image_tokens_from_the_grid(loaded):
    lm = loaded("tiny-random-qwen2.5-omni")
    hm = mmlens.wrap(lm.model)
    inputs = lm.example_inputs()
    spans = hm.spans(inputs)
    assert set(spans.modalities) == {"text", "image", "audio"}
    merge = lm.model.config.vision_config.spatial_merge_size
    per_image = (inputs["image_grid_thw"].prod(-1) // merge**2).tolist()
    assert spans.masks["image"].sum(1).tolist() == per_image
    assert not (spans.masks["image"] & spans.masks["audio"]).any()


def test_silence_is_what_the_feature_extractor_makes_of_zeros(speech, loaded):
    _, features, frames = speech
    quiet, quiet_frames = log_mel([np.zeros(6000, dtype=np.float32)] * 2, N_MELS, 100)
    assert torch.equal(silence(N_MELS, 100).expand_as(quiet), quiet)
    assert (quiet == WHISPER_FLOOR).all()
    lm = loaded("tiny-random-qwen2-audio")
    hm = mmlens.wrap(lm.model)
    inputs = lm.example_inputs()
    neutral = hm.neutral(inputs, "audio")
    assert torch.equal(neutral["input_features"], quiet)
    assert all(neutral[k] is inputs[k] for k in inputs if k != "input_features")
    assert not torch.equal(hm.run(neutral).logits, hm.run(inputs).logits)


def test_gain_on_the_log_mel_equals_gain_on_the_waveform(speech):
    w, features, _ = speech
    for db in (6.0, -6.0, -20.0):
        louder, _ = log_mel([x * 10 ** (db / 20) for x in w], N_MELS, 100)
        assert (audio_gain(features, db) - louder).abs().max() < 1e-5, db
    assert torch.equal(audio_gain(features, 0.0), features)
    quiet = silence(N_MELS, 100).expand(2, -1, -1)
    assert torch.equal(audio_gain(quiet, 10.0), quiet), "silence made louder is silence"


@pytest.mark.parametrize("k", [4, -4])
def test_time_shift_on_the_log_mel_equals_a_shifted_waveform(speech, k):
    """Exact except within the STFT window's reach (2 frames) of a cut edge."""
    w, features, frames = speech
    step = abs(k) * HOP_LENGTH
    zeros = np.zeros(step, dtype=np.float32)
    moved = [np.concatenate([zeros, x[:-step]]) if k > 0 else np.concatenate([x[step:], zeros]) for x in w]
    expected, _ = log_mel(moved, N_MELS, 100)
    shifted = audio_time_shift(features, k, frames)
    for row, n in enumerate(frames.sum(-1).tolist()):
        interior = slice(abs(k) + 2, n - abs(k) - 2)
        assert (shifted[row, :, interior] - expected[row, :, interior]).abs().max() < 1e-5
        vacated = slice(0, k - 1) if k > 0 else slice(n + k + 2, n)  # away from the edges
        assert torch.equal(shifted[row, :, vacated], expected[row, :, vacated])
        assert torch.equal(shifted[row, :, n:], features[row, :, n:]), "padding frames stay"
    assert torch.equal(audio_time_shift(features, 0, frames), features)


def test_noise_stays_on_real_frames_in_the_extractors_range(speech):
    _, features, frames = speech
    assert torch.equal(audio_noise(features, 0.0, frames), features)
    noisy = audio_noise(features, 0.5, frames, torch.Generator().manual_seed(0))
    real = frames.bool()[:, None, :].expand_as(features)
    assert torch.equal(noisy[~real], features[~real])
    assert not torch.equal(noisy[real], features[real])
    floor = (features.flatten(1).max(1).values - 2).clamp(min=WHISPER_FLOOR)
    assert (noisy.flatten(1).min(1).values >= floor).all()


@pytest.mark.parametrize("name", ["tiny-random-qwen2-audio", "tiny-random-voxtral"])
def test_every_audio_perturbation_changes_only_the_features(name, loaded):
    lm = loaded(name)
    hm = mmlens.wrap(lm.model)
    inputs = lm.example_inputs()
    made = perturb(hm, inputs, "audio", n=2)
    assert {p.kind for p in made} == {"gain", "audio_noise", "time_shift"}
    for p in made:
        assert all(p.inputs[k] is inputs[k] for k in inputs if k != "input_features"), p.kind
        assert not torch.equal(p.inputs["input_features"], inputs["input_features"]), p.kind
        assert torch.isfinite(hm.run(p.inputs).logits).all()


@pytest.mark.parametrize("name", AUDIO_MODELS)
def test_resid_mid_write_in_a_whisper_block(name, loaded):
    """Setting audio.blocks.0.resid_mid to X makes the block output X + fc2(...) (WHISPER_BLOCK)."""
    lm = loaded(name)
    hm = mmlens.wrap(lm.model)
    inputs = lm.example_inputs()
    clean = hm.run(inputs, cache=["audio.blocks.0.resid_mid", "audio.blocks.0.mlp_out"]).cache
    x = clean["audio.blocks.0.resid_mid"] * 1.5
    run = hm.run(
        inputs,
        edits=[mmlens.replace("audio.blocks.0.resid_mid", x)],
        cache=["audio.blocks.0.mlp_out", "audio.blocks.0.resid_post"],
    )
    assert torch.equal(run.cache["audio.blocks.0.resid_post"], x + run.cache["audio.blocks.0.mlp_out"])
    assert not torch.allclose(run.cache["audio.blocks.0.mlp_out"], clean["audio.blocks.0.mlp_out"])


@pytest.mark.parametrize("name", ["tiny-random-qwen2-audio", "tiny-random-voxtral"])
def test_project_encoder_of_the_last_layer_is_the_projector_output(name, loaded):
    lm = loaded(name)
    hm = mmlens.wrap(lm.model)
    inputs = lm.example_inputs()
    last = f"audio.blocks.{len(hm.names('audio.blocks.*.resid_post')) - 1}.resid_post"
    run = hm.run(inputs, cache=[last, "fusion.audio_projector_out"])
    tokens = hm.adapter.project_encoder(lm.model, inputs, run.cache[last])
    assert tokens.shape[0] == inputs["input_features"].shape[0]
    target = run.cache["fusion.audio_projector_out"]
    assert torch.allclose(tokens.reshape(target.shape), target, atol=1e-6)


def _mmlens_cli() -> str:
    script = Path(sys.executable).parent / "mmlens"
    assert script.exists(), f"console script missing at {script}: is mmlens pip-installed in this environment?"
    return str(script)


@pytest.mark.parametrize(
    "name,encoders", [("tiny-random-qwen2-audio", {"audio"}), ("tiny-random-qwen2.5-omni", {"audio", "image"})]
)
def test_cli_hooks_json_lists_encoder_fusion_and_lm(name, encoders):
    out = subprocess.run(
        [_mmlens_cli(), "hooks", name, "--json"], capture_output=True, text=True, check=True, timeout=600
    )
    rows = json.loads(out.stdout)
    assert {r["stage"] for r in rows} == {"encoder", "fusion", "lm"}
    assert {r["modality"] for r in rows if r["stage"] == "encoder"} == encoders
    assert {r["modality"] for r in rows if r["stage"] == "fusion"} == encoders | {"fused"}
    assert {r["modality"] for r in rows if r["stage"] == "lm"} == {"fused"}
    by_name = {r["name"]: r for r in rows}
    assert by_name["fusion.audio_projector_out"]["modality"] == "audio"
    assert by_name["audio.blocks.0.resid_post"]["modality"] == "audio"
