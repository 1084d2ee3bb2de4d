"""HF LLaVA (``LlavaForConditionalGeneration``): CLIP vision tower -> projector -> Llama."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mmlens.core.adapter import CLIP_BLOCK, Adapter, Point, Site, Stack, language_model
from mmlens.core.spans import spans_from_token_ids
from mmlens.core.units import patch_units, token_units
from mmlens.hooks.language_models import neutral_text
from mmlens.metrics.perturb import image_perturbations, token_perturbations

_lm_stack, _lm_points = language_model(
    base="model.language_model", logits="lm_head", n_heads="config.text_config.num_attention_heads"
)


IMAGE_ITEMS: tuple[str, ...] = ("item", "pos")
"""Axes of a vision tower's values ``[items, patches, d]`` whose items are the tiles or sub-images of
every prompt, several per batch row: position selectors index the patches, and methods that patch
one batch row per variant refuse these points instead of patching another row's tile."""


def check_image_rows(inputs: Mapping[str, Tensor]) -> None:
    """Raise unless ``pixel_values``' first axis is the batch axis (one entry per prompt), which
    splitting a batch into rows assumes; several images of one prompt stacked there would hand one
    prompt's image to another row."""
    ids, pixels = inputs["input_ids"], inputs.get("pixel_values")
    if isinstance(pixels, Tensor) and pixels.shape[0] != ids.shape[0]:
        raise ValueError(
            f"pixel_values has {pixels.shape[0]} entries on its first axis for {ids.shape[0]} prompts (input_ids); "
            "mmlens splits a batch into rows on that axis, so pass one image per prompt (a batch of prompts that "
            "each hold one image)"
        )


PIXEL_RANGE = (-20.0, 20.0)
"""Where processor-normalised pixels lie (CLIP: about [-1.8, 2.2]; SigLIP [-1, 1]), with room for
perturbations; raw 0-255 pixels fall outside."""


def image_token_spans(model, inputs):
    """Image positions are where ``input_ids == config.image_token_id`` (LLaVA's placeholder mask);
    raises unless ``pixel_values`` has one entry per prompt (:func:`check_image_rows`)."""
    check_image_rows(inputs)
    return spans_from_token_ids(
        inputs["input_ids"], inputs.get("attention_mask"), {"image": model.config.image_token_id}
    )


def neutral_image(model, inputs, spans):
    """An all-zero image (the mean image after CLIP normalisation)."""
    return {**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])}


def project_vision_layer(model, inputs, hidden):
    """A vision layer's output ``[images, 1 + patches, d_v]`` -> LM-space tokens ``[images, tokens, d_lm]``:
    the feature selection LLaVA applies (``"default"`` drops the CLS token), then its projector."""
    if model.config.vision_feature_select_strategy == "default":
        hidden = hidden[:, 1:]
    return model.model.multi_modal_projector(hidden)


LLAVA = Adapter(
    name="llava",
    architectures=("LlavaForConditionalGeneration",),
    stacks=(
        Stack(
            prefix="vision",
            stage="encoder",
            modality="image",
            blocks="model.vision_tower.encoder.layers",
            layout=CLIP_BLOCK,
            n_heads="config.vision_config.num_attention_heads",
        ),
        _lm_stack,
    ),
    points=(
        Point("vision.embed", "encoder", "image", Site("model.vision_tower.embeddings")),
        Point("fusion.projector_out", "fusion", "image", Site("model.multi_modal_projector")),
        Point(
            "fusion.embeds",
            "fusion",
            None,
            Site("model.language_model", "input", 0, "inputs_embeds"),
            fused_positions=True,
        ),
        *_lm_points,
    ),
    spans=image_token_spans,
    neutral={"image": neutral_image, "text": neutral_text},
    modality_inputs={"image": ("pixel_values",), "text": ("input_ids", "attention_mask")},
    perturbations={"image": image_perturbations("pixel_values"), "text": token_perturbations("input_ids")},
    project_encoder=project_vision_layer,
    input_ranges={"pixel_values": PIXEL_RANGE},
    input_units={
        "image": patch_units("pixel_values", lambda model: model.config.vision_config.patch_size, neutral_image),
        "text": token_units("input_ids", neutral_text),
    },
)
