"""Tiny random audio-language and tri-modal models for the registry (seeded weights in the real
transformers classes), with example inputs laid out as their processors lay them out.

- ``tiny-random-qwen2-audio``: ``Qwen2AudioForConditionalGeneration`` (Whisper-like encoder 2x32 ->
  linear projector -> Qwen2 2x64).
- ``tiny-random-voxtral``: ``VoxtralForConditionalGeneration`` (Whisper-like encoder 2x32 -> 4 frames
  stacked -> MLP projector -> Llama 2x64).
- ``tiny-random-qwen2.5-omni``: ``Qwen2_5OmniThinkerForConditionalGeneration`` (image + audio + text
  in one prompt: windowed ViT 2x32 with a patch merger, chunked audio encoder 2x32, Qwen2 2x64 with
  M-RoPE).

The audio is a short synthetic waveform (two tones and a little noise) turned into a Whisper log-mel
``Float[batch, mel, frames]`` by transformers' own ``WhisperFeatureExtractor`` (16 kHz, hop 160, so
100 frames a second), padded as each processor pads; the number of audio placeholder tokens is the
model's own length formula applied to the real frame count. Registered by :mod:`mmlens.data.loading`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from transformers import (
    PreTrainedModel,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    VoxtralConfig,
    VoxtralForConditionalGeneration,
    WhisperFeatureExtractor,
)

from mmlens.data.loading import Inputs, LoadedModel, register

SAMPLING_RATE = 16_000
"""Hz, as every Whisper-style feature extractor expects."""
HOP_LENGTH = 160
"""Samples per log-mel frame (10 ms)."""

_VOCAB = 256
_PAD, _BOS, _EOS = 0, 1, 2
_AUDIO, _AUDIO_START, _AUDIO_END = 255, 254, 253  # <|AUDIO|>, <|audio_bos|>, <|audio_eos|>
_IMAGE, _VISION_START, _VISION_END, _VIDEO = 252, 251, 250, 249
_TEXT_IDS = (3, 249)
_N_MELS = 16
_TEXT = {
    "vocab_size": _VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "pad_token_id": _PAD,
    "bos_token_id": _BOS,
    "eos_token_id": _EOS,
}
_WHISPER_ENCODER = {
    "num_mel_bins": _N_MELS,
    "encoder_layers": 2,
    "encoder_attention_heads": 4,
    "encoder_ffn_dim": 64,
    "d_model": 32,
}


def waveforms(seed: int, seconds: list[float]) -> list[np.ndarray]:
    """One mono 16 kHz waveform per entry of ``seconds``: two seeded tones plus a little noise, peak ~0.5."""
    rng = np.random.default_rng(seed)
    out = []
    for s in seconds:
        t = np.arange(round(s * SAMPLING_RATE)) / SAMPLING_RATE
        f1, f2 = rng.uniform(200, 2000, size=2)
        wave = 0.3 * np.sin(2 * np.pi * f1 * t) + 0.2 * np.sin(2 * np.pi * f2 * t) + 0.01 * rng.standard_normal(len(t))
        out.append(wave.astype(np.float32))
    return out


def log_mel(audio: list[np.ndarray], n_mels: int, n_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Whisper log-mel features of ``audio`` zero-padded to ``n_frames`` frames, as the processors make them.

    Returns ``input_features`` Float[batch, n_mels, n_frames] and the frame mask Long[batch, n_frames]
    (1 on frames of real audio).
    """
    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    out = extractor(
        audio,
        sampling_rate=SAMPLING_RATE,
        padding="max_length",
        max_length=n_frames * HOP_LENGTH,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return out["input_features"], out["attention_mask"].long()


def _text(seed: int, n: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(_TEXT_IDS[0], _TEXT_IDS[1], (n,), generator=generator).tolist()


def _pad_right(rows: list[list[int]]) -> Inputs:
    """``input_ids`` and ``attention_mask`` Long[batch, longest row], rows padded on the right."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [_PAD] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


def _build(
    model_class: type[PreTrainedModel], config: object, name: str, seed: int, inputs: Callable[[], Inputs]
) -> LoadedModel:
    """``model_class(config)`` with weights drawn under ``seed`` (the global RNG is left untouched)."""
    config.architectures = [model_class.__name__]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return LoadedModel(model, None, None, name, inputs)


def _whisper_tokens(frames: torch.Tensor) -> list[int]:
    """Audio tokens per row from real frame counts: conv stride 2, then average pooling by 2 (the
    formula ``_get_feat_extract_output_lengths`` of Qwen2-Audio and Qwen2.5-Omni)."""
    after_conv = (frames - 1) // 2 + 1
    return ((after_conv - 2) // 2 + 1).tolist()


@register(
    "tiny-random-qwen2-audio",
    "Qwen2AudioForConditionalGeneration, random weights: Whisper-like encoder 2x32 (16 mels, 1 s = 100 frames "
    "-> 25 tokens max) + Qwen2 2x64",
)
def _tiny_qwen2_audio(name: str, dtype: torch.dtype, seed: int) -> LoadedModel:
    config = Qwen2AudioConfig(
        audio_config={"model_type": "qwen2_audio_encoder", **_WHISPER_ENCODER, "max_source_positions": 50},
        text_config={"model_type": "qwen2", **_TEXT},
        audio_token_index=_AUDIO,
    )

    def inputs() -> Inputs:
        """0.6 s and 0.4 s of audio padded to 1 s: input_features [2, 16, 100], feature_attention_mask
        [2, 100] (60 and 40 real frames); input_ids [2, 24]: <|audio_bos|>, 15 (row 1: 10) <|AUDIO|>,
        <|audio_eos|>, 7 text ids, row 1 padded on the right."""
        features, frames = log_mel(waveforms(seed, [0.6, 0.4]), _N_MELS, 100)
        text = _text(seed, 7)
        rows = [[_AUDIO_START] + [_AUDIO] * n + [_AUDIO_END] + text for n in _whisper_tokens(frames.sum(-1))]
        return {**_pad_right(rows), "input_features": features, "feature_attention_mask": frames}

    return _build(Qwen2AudioForConditionalGeneration, config, name, seed, inputs)


@register(
    "tiny-random-voxtral",
    "VoxtralForConditionalGeneration, random weights: Whisper-like encoder 2x32 (16 mels, 2 s chunks = 200 "
    "frames -> 25 tokens) + Llama 2x64",
)
def _tiny_voxtral(name: str, dtype: torch.dtype, seed: int) -> LoadedModel:
    audio = {
        "model_type": "voxtral_encoder",
        "hidden_size": 32,
        "intermediate_size": 128,  # 4 encoder frames (4 x 32) per audio token, as 4 x 1280 = 5120 in Voxtral
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_mel_bins": _N_MELS,
        "max_source_positions": 100,
    }
    config = VoxtralConfig(audio_config=audio, text_config={"model_type": "llama", **_TEXT}, audio_token_id=_AUDIO)

    def inputs() -> Inputs:
        """1.3 s and 0.7 s of audio, each padded with zeros to one 2 s chunk (VoxtralProcessor pads to a
        multiple of the chunk): input_features [2, 16, 200]; every chunk is 100 encoder frames = 25
        audio tokens; input_ids [2, 33]: <s>, <begin_audio> (id 254), 25 [AUDIO], 6 text ids."""
        features, _ = log_mel(waveforms(seed, [1.3, 0.7]), _N_MELS, 200)
        per_chunk = audio["max_source_positions"] * audio["hidden_size"] // audio["intermediate_size"]
        rows = [[_BOS, _AUDIO_START] + [_AUDIO] * per_chunk + _text(seed + r, 6) for r in range(2)]
        return {**_pad_right(rows), "input_features": features}

    return _build(VoxtralForConditionalGeneration, config, name, seed, inputs)


_OMNI_PATCH, _OMNI_MERGE, _OMNI_TEMPORAL = 4, 2, 2


@register(
    "tiny-random-qwen2.5-omni",
    "Qwen2_5OmniThinkerForConditionalGeneration, random weights: image (16 px, patch 4, merge 2 -> 4 tokens) "
    "+ audio (16 mels, 1 s -> 25 tokens max) + text in one prompt; ViT 2x32, audio encoder 2x32, Qwen2 2x64",
)
def _tiny_qwen_omni(name: str, dtype: torch.dtype, seed: int) -> LoadedModel:
    config = Qwen2_5OmniThinkerConfig(
        audio_config={**_WHISPER_ENCODER, "max_source_positions": 50, "n_window": 25, "output_dim": 64},
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 4,
            "patch_size": _OMNI_PATCH,
            "spatial_merge_size": _OMNI_MERGE,
            "temporal_patch_size": _OMNI_TEMPORAL,
            "window_size": 16,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],
        },
        text_config={
            **_TEXT,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        },
        audio_token_index=_AUDIO,
        image_token_index=_IMAGE,
        video_token_index=_VIDEO,
        audio_start_token_id=_AUDIO_START,
        audio_end_token_id=_AUDIO_END,
        vision_start_token_id=_VISION_START,
        vision_end_token_id=_VISION_END,
    )

    def inputs() -> Inputs:
        """One 16x16 image and 0.6 s (row 1: 0.4 s) of audio per row. pixel_values [32, 96]: the 16
        patches of each image packed without a batch axis (C x T x P x P = 3 x 2 x 4 x 4), image_grid_thw
        [[1, 4, 4]] x 2 -> 4 image tokens each; input_features [2, 16, 100] with feature_attention_mask
        [2, 100] (60 and 40 real frames -> 15 and 10 audio tokens); input_ids: 2 text ids,
        <|vision_bos|> 4 <|IMAGE|> <|vision_eos|>, <|audio_bos|> 15 (row 1: 10) <|AUDIO|> <|audio_eos|>,
        6 text ids, row 1 padded on the right (input_ids [2, 31])."""
        features, frames = log_mel(waveforms(seed, [0.6, 0.4]), _N_MELS, 100)
        grid = torch.tensor([[1, 16 // _OMNI_PATCH, 16 // _OMNI_PATCH]] * 2)
        n_image = int(grid[0].prod()) // _OMNI_MERGE**2
        text = _text(seed, 8)
        rows = [
            text[:2]
            + [_VISION_START] + [_IMAGE] * n_image + [_VISION_END]
            + [_AUDIO_START] + [_AUDIO] * n + [_AUDIO_END]
            + text[2:]
            for n in _whisper_tokens(frames.sum(-1))
        ]  # fmt: skip
        patch = 3 * _OMNI_TEMPORAL * _OMNI_PATCH**2
        pixels = torch.randn(int(grid.prod(-1).sum()), patch, generator=torch.Generator().manual_seed(seed))
        return {
            **_pad_right(rows),
            "pixel_values": pixels,
            "image_grid_thw": grid,
            "input_features": features,
            "feature_attention_mask": frames,
        }

    return _build(Qwen2_5OmniThinkerForConditionalGeneration, config, name, seed, inputs)
