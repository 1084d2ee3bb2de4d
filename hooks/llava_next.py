"""HF LLaVA-NeXT (``LlavaNextForConditionalGeneration``) and LLaVA-OneVision
(``LlavaOnevisionForConditionalGeneration``): a CLIP / SigLIP tower over the anyres tiles of each image ->
projector -> unpadding and newline tokens -> Llama / Qwen2.

The vision tower sees every tile of every image as one item: its points are ``[tiles, patches, d_v]``
(the tiles of row 0 first; axes ``IMAGE_ITEMS``), and ``fusion.projector_out`` is ``[tiles, patches, d_lm]``, before the
model unpads the tiled grid and appends its learned ``image_newline`` vector (a parameter, not a
module output: it has no hook point, but it is part of ``fusion.embeds`` at the image positions).
"""

from __future__ import annotations

import torch

from mmlens.core.adapter import CLIP_BLOCK, Adapter, Point, Site, Stack, language_model
from mmlens.core.spans import spans_from_token_ids
from mmlens.hooks.language_models import neutral_text
from mmlens.hooks.llava import IMAGE_ITEMS, PIXEL_RANGE, check_image_rows, image_token_spans, project_vision_layer
from mmlens.metrics.perturb import image_perturbations, token_perturbations

_lm_stack, _lm_points = language_model(
    base="model.language_model", logits="lm_head", n_heads="config.text_config.num_attention_heads"
)

_VISION = Stack(
    prefix="vision",
    stage="encoder",
    modality="image",
    blocks="model.vision_tower.encoder.layers",
    layout=CLIP_BLOCK,
    n_heads="config.vision_config.num_attention_heads",
    axes=IMAGE_ITEMS,
)
_POINTS = (
    Point("vision.embed", "encoder", "image", Site("model.vision_tower.embeddings"), axes=IMAGE_ITEMS),
    Point("fusion.projector_out", "fusion", "image", Site("model.multi_modal_projector"), axes=IMAGE_ITEMS),
    Point(
        "fusion.embeds", "fusion", None, Site("model.language_model", "input", 0, "inputs_embeds"), fused_positions=True
    ),
    *_lm_points,
)


def neutral_tiles(model, inputs, spans):
    """Every tile all zeros (the mean image after CLIP / SigLIP normalisation). LLaVA-NeXT picks an
    image's tiles from ``image_sizes``, so a zero tile is kept, not dropped as padding."""
    return {**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])}


def onevision_spans(model, inputs):
    """Image positions are ``input_ids == config.image_token_id``. Video placeholders are refused: this
    table has no video modality (no neutral video, no perturbations), so they would count as text."""
    check_image_rows(inputs)
    ids = inputs["input_ids"]
    if bool((ids == model.config.video_token_id).any()):
        raise ValueError(
            "input_ids holds LLaVA-OneVision video tokens (config.video_token_id = "
            f"{model.config.video_token_id}); the mmlens table covers images only: pass images (pixel_values) "
            "or add a 'video' modality to a copy of the table (spans, neutral, modality_inputs)"
        )
    return spans_from_token_ids(ids, inputs.get("attention_mask"), {"image": model.config.image_token_id})


LLAVA_NEXT = Adapter(
    name="llava-next",
    architectures=("LlavaNextForConditionalGeneration",),
    stacks=(_VISION, _lm_stack),
    points=_POINTS,
    spans=image_token_spans,
    neutral={"image": neutral_tiles, "text": neutral_text},
    modality_inputs={"image": ("pixel_values", "image_sizes"), "text": ("input_ids", "attention_mask")},
    perturbations={"image": image_perturbations("pixel_values"), "text": token_perturbations("input_ids")},
    project_encoder=project_vision_layer,
    input_ranges={"pixel_values": PIXEL_RANGE},
)

LLAVA_ONEVISION = Adapter(
    name="llava-onevision",
    architectures=("LlavaOnevisionForConditionalGeneration",),
    stacks=(_VISION, _lm_stack),
    points=_POINTS,
    spans=onevision_spans,
    neutral={"image": neutral_tiles, "text": neutral_text},
    modality_inputs={
        "image": ("pixel_values", "image_sizes", "batch_num_images"),
        "text": ("input_ids", "attention_mask"),
    },
    perturbations={"image": image_perturbations("pixel_values"), "text": token_perturbations("input_ids")},
    project_encoder=project_vision_layer,
    input_ranges={"pixel_values": PIXEL_RANGE},
)
