"""HF Voxtral (``VoxtralForConditionalGeneration``): Whisper-like audio encoder over 30 s chunks -> every
4 consecutive frames stacked -> MLP projector -> Llama, spliced in at the audio placeholder token.

``input_features`` is ``[chunks, mel, 2 * max_source_positions]``: a row of the batch whose audio
spans several chunks owns several entries (the example inputs use one chunk per row). Voxtral takes
no frame mask: padding to the chunk is zeros, whose log-mel is part of the input.
"""

from __future__ import annotations

from mmlens.core.adapter import ITEMS, WHISPER_BLOCK, Adapter, Point, Site, Stack, language_model
from mmlens.hooks.language_models import neutral_text
from mmlens.hooks.qwen2_audio import audio_token_spans, neutral_audio
from mmlens.metrics.perturb import audio_perturbations, token_perturbations

_lm_stack, _lm_points = language_model(
    base="model.language_model", logits="lm_head", n_heads="config.text_config.num_attention_heads"
)


def project_audio_layer(model, inputs, hidden):
    """An audio layer's output ``[chunks, frames, d_a]`` -> LM-space tokens ``[chunks, tokens, d_lm]``:
    the encoder's final ``layer_norm``, 4 consecutive frames stacked (``intermediate_size / d_a``), then
    the projector (as ``VoxtralModel.get_audio_features``)."""
    stacked = model.model.audio_tower.layer_norm(hidden).reshape(-1, model.config.audio_config.intermediate_size)
    return model.model.multi_modal_projector(stacked).reshape(hidden.shape[0], -1, model.config.text_config.hidden_size)


VOXTRAL = Adapter(
    name="voxtral",
    architectures=("VoxtralForConditionalGeneration",),
    stacks=(
        Stack(
            prefix="audio",
            stage="encoder",
            modality="audio",
            blocks="model.audio_tower.layers",
            layout=WHISPER_BLOCK,
            n_heads="config.audio_config.num_attention_heads",
        ),
        _lm_stack,
    ),
    points=(
        Point("fusion.audio_projector_out", "fusion", "audio", Site("model.multi_modal_projector"), axes=ITEMS),
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
    modality_inputs={"audio": ("input_features",), "text": ("input_ids", "attention_mask")},
    perturbations={"audio": audio_perturbations("input_features"), "text": token_perturbations("input_ids")},
    project_encoder=project_audio_layer,
)
