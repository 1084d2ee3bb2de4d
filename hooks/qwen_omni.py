"""HF Qwen2.5-Omni's thinker (``Qwen2_5OmniThinkerForConditionalGeneration``): image + audio + text in
one prompt, three spans.

- image: a windowed ViT over packed patches ``pixel_values [n_patches, C*T*P*P]`` with
  ``image_grid_thw [n_images, 3]`` (no batch axis), then the patch merger (the image projector);
- audio: a Whisper-like encoder over the real frames of every audio packed one after another
  (``[frames, d]``, cut into chunks of ``2 * n_window`` input frames), average pooling by 2 and
  ``proj`` (the audio projector) inside the audio tower;
- both spliced into the Qwen2 LM at their placeholder tokens; the LM uses M-RoPE (position ids
  ``[3, batch, seq]`` built from the grid and the audio lengths).

Encoder points are packed, ``[n_patches, d]`` / ``[frames, d]``: axis 0 runs over the patches (frames)
of every item of the batch, axis 1 is the width. The merger's output is in the ViT's window order
(the model restores the image order after it).
"""

from __future__ import annotations

import torch

from mmlens.core.adapter import (
    ITEMS,
    SEQUENCE_KWARGS,
    WHISPER_BLOCK,
    Adapter,
    BlockLayout,
    Point,
    Site,
    Stack,
    language_model,
)
from mmlens.core.spans import spans_from_token_ids
from mmlens.hooks.language_models import neutral_text
from mmlens.hooks.qwen2_audio import neutral_audio
from mmlens.metrics.perturb import audio_perturbations, token_perturbations

QWEN_VISION_BLOCK = BlockLayout(attn="attn", attn_out_proj="attn.proj", mlp="mlp", norm_mid="norm2")
"""Qwen2-VL / Qwen2.5-VL / Omni vision blocks: ``x + attn(norm1(x))``, then ``+ mlp(norm2(.))``."""

_lm_stack, _lm_points = language_model(
    base="model.language_model", logits="lm_head", n_heads="config.text_config.num_attention_heads"
)


def omni_spans(model, inputs):
    """Image positions are the ``<|IMAGE|>`` placeholders (``config.image_token_id``), audio positions
    the ``<|AUDIO|>`` ones (``config.audio_token_id``); the rest of the real positions (their
    begin/end markers included) are text."""
    config = model.config
    return spans_from_token_ids(
        inputs["input_ids"],
        inputs.get("attention_mask"),
        {"image": config.image_token_id, "audio": config.audio_token_id},
    )


def one_image_per_row(patches: bool):
    """A row splitter (``Adapter.packed_inputs``) for prompts with one image each: per row, its
    patches (``patches=True``: ``t*h*w``) or its one grid row. Other layouts raise (the thinker's
    inputs carry no per-token modality ids to match images to rows by)."""

    def sizes(inputs):
        grid, rows = inputs["image_grid_thw"], inputs["input_ids"].shape[0]
        if grid.shape[0] != rows:
            raise ValueError(
                f"image_grid_thw has {grid.shape[0]} images for {rows} prompts: mmlens splits Qwen2.5-Omni's packed "
                "images by row only with one image per prompt; run the rows one at a time"
            )
        return grid.prod(-1).tolist() if patches else [1] * rows

    return sizes


def neutral_image(model, inputs, spans):
    """Every patch all zeros: the mean image after the processor's normalisation (same grid, so the
    same image tokens)."""
    return {**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])}


QWEN_OMNI = Adapter(
    name="qwen2.5-omni-thinker",
    architectures=("Qwen2_5OmniThinkerForConditionalGeneration",),
    stacks=(
        Stack(
            prefix="vision",
            stage="encoder",
            modality="image",
            blocks="model.visual.blocks",
            layout=QWEN_VISION_BLOCK,
            n_heads="config.vision_config.num_heads",
            axes=ITEMS,
        ),
        Stack(
            prefix="audio",
            stage="encoder",
            modality="audio",
            blocks="model.audio_tower.layers",
            layout=WHISPER_BLOCK,
            n_heads="config.audio_config.encoder_attention_heads",
            axes=ITEMS,
        ),
        _lm_stack,
    ),
    points=(
        Point("vision.embed", "encoder", "image", Site("model.visual.patch_embed"), axes=ITEMS),
        Point("fusion.projector_out", "fusion", "image", Site("model.visual.merger"), axes=ITEMS),
        Point("fusion.audio_projector_out", "fusion", "audio", Site("model.audio_tower.proj"), axes=ITEMS),
        Point(
            "fusion.embeds",
            "fusion",
            None,
            Site("model.language_model", "input", 0, "inputs_embeds"),
            fused_positions=True,
        ),
        *_lm_points,
    ),
    spans=omni_spans,
    neutral={"image": neutral_image, "audio": neutral_audio, "text": neutral_text},
    modality_inputs={
        "image": ("pixel_values", "image_grid_thw"),
        "audio": ("input_features", "feature_attention_mask"),
        "text": ("input_ids", "attention_mask"),
    },
    packed_inputs={"pixel_values": one_image_per_row(patches=True), "image_grid_thw": one_image_per_row(patches=False)},
    perturbations={
        "audio": audio_perturbations("input_features", valid="feature_attention_mask"),
        "text": token_perturbations("input_ids"),
    },
    # The M-RoPE ids [3, batch, seq] are turned into cos/sin [batch, seq, d_head] (the three sections
    # recomposed) before the blocks, which get those as position_embeddings and position_ids=None.
    sequence_kwargs=dict(SEQUENCE_KWARGS),
)
