"""HF Gemma3 (``Gemma3ForConditionalGeneration``): SigLIP vision tower -> pooled, normed projector ->
Gemma3 LM.

Facts this table states:

- Gemma3's blocks norm each branch before adding it (``GEMMA_BLOCK``): ``attn_out`` is the output of
  ``post_attention_layernorm``, ``resid_mid`` the input of ``pre_feedforward_layernorm``,
  ``mlp_out`` the output of ``post_feedforward_layernorm``.
- With ``token_type_ids``, the image tokens of one image attend to each other in both directions
  (the attention modules still say ``is_causal``): the LM is causal only when no image token is
  marked, so ``causal`` is a function of the inputs and fast paths that assume causality fall back.
- Text embeddings are scaled by ``sqrt(d)`` inside ``embed_tokens`` (``lm.embed`` is after it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from mmlens.core.adapter import CLIP_BLOCK, GEMMA_BLOCK, Adapter, Point, Site, Stack, language_model
from mmlens.core.spans import ModalitySpans, spans_from_token_ids
from mmlens.hooks.language_models import neutral_text
from mmlens.hooks.llava import neutral_image
from mmlens.metrics.perturb import image_perturbations, token_perturbations

_lm_stack, _lm_points = language_model(
    base="model.language_model", logits="lm_head", layout=GEMMA_BLOCK, n_heads="config.text_config.num_attention_heads"
)


def image_token_spans(model: nn.Module, inputs: Mapping[str, Tensor]) -> ModalitySpans:
    """Image positions are the image soft-token placeholders (``config.image_token_id``)."""
    return spans_from_token_ids(
        inputs["input_ids"], inputs.get("attention_mask"), {"image": model.config.image_token_id}
    )


def causal_unless_images(inputs: Mapping[str, Any]) -> bool:
    """Gemma3's LM is causal unless ``token_type_ids`` marks image tokens (1), which then attend to
    each other bidirectionally within each image."""
    types = inputs.get("token_type_ids")
    return types is None or not bool((types == 1).any())


def project_vision_layer(model: nn.Module, inputs: Mapping[str, Tensor], hidden: Tensor) -> Tensor:
    """A vision layer's output ``[images, patches, d_v]`` -> LM-space tokens ``[images, tokens, d_lm]``:
    the tower's post-layernorm, then the pooling projector."""
    return model.model.multi_modal_projector(model.model.vision_tower.post_layernorm(hidden))


GEMMA3 = Adapter(
    name="gemma3",
    architectures=("Gemma3ForConditionalGeneration",),
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
    modality_inputs={"image": ("pixel_values",), "text": ("input_ids", "attention_mask", "token_type_ids")},
    perturbations={"image": image_perturbations("pixel_values"), "text": token_perturbations("input_ids")},
    project_encoder=project_vision_layer,
    causal=causal_unless_images,
)
