"""HF Qwen2-Audio (``Qwen2AudioForConditionalGeneration``): Whisper-like audio encoder -> average pool
-> linear projector -> Qwen2, audio features spliced in at the ``<|AUDIO|>`` placeholders.

Also the audio facts the other audio adapters share: the audio span from the placeholder token, and
the neutral audio (silence through the Whisper feature extractor).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from mmlens.core.adapter import WHISPER_BLOCK, Adapter, Point, Site, Stack, language_model
from mmlens.core.spans import spans_from_token_ids
from mmlens.core.units import frame_units, token_units
from mmlens.hooks.language_models import neutral_text
from mmlens.metrics.perturb import audio_perturbations, token_perturbations

SAMPLING_RATE, HOP_LENGTH = 16_000, 160
"""Every Whisper-style extractor of these models: 16 kHz audio, one log-mel frame per 160 samples."""

_lm_stack, _lm_points = language_model(
    base="model.language_model", logits="lm_head", n_heads="config.text_config.num_attention_heads"
)


def audio_token_spans(model, inputs):
    """Audio positions are where ``input_ids == config.audio_token_id`` (the processor writes one
    placeholder per audio token); every other real position is text."""
    return spans_from_token_ids(
        inputs["input_ids"], inputs.get("attention_mask"), {"audio": model.config.audio_token_id}
    )


@lru_cache(maxsize=16)
def silence(n_mels: int, n_frames: int) -> torch.Tensor:
    """The log-mel ``Float[n_mels, n_frames]`` that transformers' ``WhisperFeatureExtractor`` (default
    16 kHz / hop 160 / n_fft 400 settings, ``n_mels`` bins; no hub access) computes for
    ``n_frames`` frames of zero samples: the extractor's floor, -1.5, everywhere."""
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=SAMPLING_RATE, hop_length=HOP_LENGTH)
    samples = n_frames * HOP_LENGTH
    out = extractor(
        np.zeros(samples, dtype=np.float32),
        sampling_rate=SAMPLING_RATE,
        padding="max_length",
        max_length=samples,
        return_tensors="pt",
    )
    return out["input_features"][0]


def neutral_audio(model, inputs, spans):
    """Every audio replaced by silence of the same duration (so the same frame mask and token count):
    the log-mel of zero samples, through the Whisper feature extractor."""
    features = inputs["input_features"]
    quiet = silence(features.shape[-2], features.shape[-1]).to(features.device, features.dtype)
    return {**inputs, "input_features": quiet.expand_as(features).clone()}


def audio_tokens(frames: int) -> int:
    """Audio tokens of ``frames`` real log-mel frames: the encoder's stride-2 convolution, then its
    average pooling by 2 (``Qwen2AudioEncoder._get_feat_extract_output_lengths``): about one per 4 frames."""
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def project_audio_layer(model, inputs, hidden):
    """An audio layer's output ``[audios, frames, d_a]`` -> LM-space tokens ``[audios, tokens, d_lm]``:
    what the encoder does after its last layer (average pooling by 2, ``layer_norm``), then the
    projector. Tokens past an audio's real length are included (the model drops them)."""
    tower = model.model.audio_tower
    pooled = tower.avg_pooler(hidden.transpose(1, 2)).transpose(1, 2)
    return model.model.multi_modal_projector(tower.layer_norm(pooled))


QWEN2_AUDIO = Adapter(
    name="qwen2-audio",
    architectures=("Qwen2AudioForConditionalGeneration",),
    stacks=(
        Stack(
            prefix="audio",
            stage="encoder",
            modality="audio",
            blocks="model.audio_tower.layers",
            layout=WHISPER_BLOCK,
            n_heads="config.audio_config.encoder_attention_heads",
        ),
        _lm_stack,
    ),
    points=(
        Point("fusion.audio_projector_out", "fusion", "audio", Site("model.multi_modal_projector")),
        Point(
            "fusion.embeds",
            "fusion",
            None,
            Site("model.language_model", "input", 0, "inputs_embeds"),
            fused_positions=True,
        ),
        *_lm_points,
    ),
    spans=audio_token_spans,
    neutral={"audio": neutral_audio, "text": neutral_text},
    modality_inputs={"audio": ("input_features", "feature_attention_mask"), "text": ("input_ids", "attention_mask")},
    perturbations={
        "audio": audio_perturbations("input_features", valid="feature_attention_mask"),
        "text": token_perturbations("input_ids"),
    },
    project_encoder=project_audio_layer,
    input_units={
        "audio": frame_units("input_features", "feature_attention_mask", 4, audio_tokens, neutral_audio),
        "text": token_units("input_ids", neutral_text),
    },
)
