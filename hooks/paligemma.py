"""HF PaliGemma (``PaliGemmaForConditionalGeneration``): SigLIP -> linear projector -> Gemma, with the
image tokens first and a prefix (image + prompt) that attends bidirectionally.

Facts this table encodes:

- ``token_type_ids == 0`` marks the prefix; the model builds a block mask in which every prefix
  position attends to every other one (and the text config sets ``use_bidirectional_attention``), so
  ``causal=False``: replay must not reuse earlier positions' keys and values.
- The LM is Gemma 1 (``GemmaDecoderLayer``: pre-norms only, the Llama block layout). Gemma's
  embedding scale ``sqrt(d)`` is inside ``embed_tokens`` (``lm.embed`` is scaled); the image
  features are spliced in unscaled. PaliGemma 2 (a Gemma 2 LM with post-norms on both branches) does
  not fit this layout and is refused by :func:`paligemma_spans`.
- Position ids are ``[1, seq]`` (1-based), cut on axis 1 like the default.
"""

from __future__ import annotations

import torch

from mmlens.core.adapter import CLIP_BLOCK, Adapter, Point, Site, Stack, language_model
from mmlens.core.spans import spans_from_token_ids
from mmlens.hooks.language_models import neutral_text
from mmlens.hooks.llava import PIXEL_RANGE, check_image_rows
from mmlens.metrics.perturb import image_perturbations, token_perturbations

_lm_stack, _lm_points = language_model(
    base="model.language_model", logits="lm_head", n_heads="config.text_config.num_attention_heads"
)
GEMMA_1 = "gemma"


def paligemma_spans(model, inputs):
    """Image positions are ``input_ids == config.image_token_id``; raises for a PaliGemma 2 (Gemma 2 LM)
    and for several images per prompt (:func:`check_image_rows`)."""
    text_type = model.config.text_config.model_type
    if text_type != GEMMA_1:
        raise ValueError(
            f"this PaliGemma's language model is {text_type!r}; the mmlens 'paligemma' table describes Gemma 1 "
            "blocks (pre-norms only). A Gemma 2 / 3 LM has post-norms on both branches: register a copy of the "
            "table whose LM stack uses a BlockLayout for them"
        )
    check_image_rows(inputs)
    return spans_from_token_ids(
        inputs["input_ids"], inputs.get("attention_mask"), {"image": model.config.image_token_id}
    )


def neutral_image(model, inputs, spans):
    """An all-zero image (mid-grey after SigLIP's [-1, 1] normalisation)."""
    return {**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])}


def project_vision_layer(model, inputs, hidden):
    """A SigLIP layer's output ``[images, patches, d_v]`` -> LM-space tokens ``[images, patches, d_lm]``:
    the encoder's post-layernorm (the model reads ``last_hidden_state``), then the projector."""
    return model.model.multi_modal_projector(model.model.vision_tower.post_layernorm(hidden))


PALIGEMMA = Adapter(
    name="paligemma",
    architectures=("PaliGemmaForConditionalGeneration",),
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
    spans=paligemma_spans,
    neutral={"image": neutral_image, "text": neutral_text},
    modality_inputs={"image": ("pixel_values",), "text": ("input_ids", "attention_mask", "token_type_ids")},
    perturbations={"image": image_perturbations("pixel_values"), "text": token_perturbations("input_ids")},
    project_encoder=project_vision_layer,
    input_ranges={"pixel_values": PIXEL_RANGE},
    causal=False,
)
