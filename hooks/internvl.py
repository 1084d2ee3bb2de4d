"""HF InternVL (``InternVLForConditionalGeneration``): InternViT -> pixel shuffle + MLP projector -> Qwen2.

Facts this table encodes:

- InternViT blocks scale each branch by a learned per-channel LayerScale (``lambda_1``, ``lambda_2``:
  parameters, not modules) before adding it to the residual, so no module output is the branch
  that is added: the blocks do not fit a ``BlockLayout`` and expose only ``vision.blocks.{i}.out``.
- The processor's tiles (``crop_to_patches``) are concatenated on ``pixel_values``' first axis
  across the whole batch; only with one tile per prompt is that axis the batch axis, which every
  row-slicing method needs. :func:`internvl_spans` refuses other layouts.
"""

from __future__ import annotations

import torch

from mmlens.core.adapter import Adapter, Point, Site, Stack, language_model
from mmlens.core.spans import spans_from_token_ids
from mmlens.hooks.language_models import neutral_text
from mmlens.hooks.llava import PIXEL_RANGE
from mmlens.metrics.perturb import image_perturbations, token_perturbations

_lm_stack, _lm_points = language_model(
    base="model.language_model", logits="lm_head", n_heads="config.text_config.num_attention_heads"
)


def internvl_spans(model, inputs):
    """Image positions are ``input_ids == config.image_token_id``; raises unless ``pixel_values`` holds
    exactly one tile per prompt (``[batch, C, H, W]``)."""
    ids = inputs["input_ids"]
    pixels = inputs.get("pixel_values")
    if pixels is not None and pixels.shape[0] != ids.shape[0]:
        raise ValueError(
            f"pixel_values has {pixels.shape[0]} tiles for {ids.shape[0]} prompts: InternVL concatenates the tiles "
            "of the whole batch on one axis, so mmlens cannot split it into rows. Process each image as one tile "
            "(processor(..., crop_to_patches=False)), one image per prompt"
        )
    return spans_from_token_ids(ids, inputs.get("attention_mask"), {"image": model.config.image_token_id})


def neutral_image(model, inputs, spans):
    """An all-zero image (the mean image after ImageNet normalisation)."""
    return {**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])}


def project_vision_layer(model, inputs, hidden):
    """An InternViT layer's output ``[tiles, 1 + patches, d_v]`` -> LM-space tokens ``[tiles, tokens, d_lm]``:
    the encoder's final norm (when the model reads the last layer), the CLS drop of the ``"default"``
    strategy, the pixel shuffle and the projector, as ``get_image_features`` does."""
    config = model.config
    if config.vision_feature_layer == -1:
        hidden = model.model.vision_tower.layernorm(hidden)
    if config.vision_feature_select_strategy == "default":
        hidden = hidden[:, 1:]
    side = int(hidden.shape[1] ** 0.5)
    grid = model.model.pixel_shuffle(hidden.reshape(hidden.shape[0], side, side, -1), config.downsample_ratio)
    return model.model.multi_modal_projector(grid.reshape(hidden.shape[0], -1, grid.shape[-1]))


INTERNVL = Adapter(
    name="internvl",
    architectures=("InternVLForConditionalGeneration",),
    stacks=(
        Stack(
            prefix="vision", stage="encoder", modality="image", blocks="model.vision_tower.encoder.layer", layout=None
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
    spans=internvl_spans,
    neutral={"image": neutral_image, "text": neutral_text},
    modality_inputs={"image": ("pixel_values",), "text": ("input_ids", "attention_mask")},
    perturbations={"image": image_perturbations("pixel_values"), "text": token_perturbations("input_ids")},
    project_encoder=project_vision_layer,
    input_ranges={"pixel_values": PIXEL_RANGE},
)
