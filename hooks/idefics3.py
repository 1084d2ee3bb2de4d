"""HF Idefics3 (``Idefics3ForConditionalGeneration``) and SmolVLM / SmolVLM2 (``SmolVLMForConditionalGeneration``,
its own class with the same module tree): SigLIP vision encoder -> pixel-shuffle connector -> Llama text model.

The vision encoder sees every (sub-)image of every prompt as one item (``[images, patches, d_v]``);
all-zero images are dropped by the model as padding, so its points are laid out ``[items, patches, d]``
(axes ``IMAGE_ITEMS``: the real images of every prompt, several per row once an image is split)."""

from __future__ import annotations

from mmlens.core.adapter import CLIP_BLOCK, Adapter, Point, Site, Stack, language_model
from mmlens.hooks.language_models import neutral_text
from mmlens.hooks.llava import IMAGE_ITEMS, PIXEL_RANGE, image_token_spans
from mmlens.metrics.perturb import image_perturbations, token_perturbations

_lm_stack, _lm_points = language_model(
    base="model.text_model", logits="lm_head", n_heads="config.text_config.num_attention_heads"
)


def neutral_image(model, inputs, spans):
    """Each image replaced by a flat image of its own per-channel mean colour.

    (Not all zeros: Idefics3 treats an all-zero image as padding and drops it.)
    """
    pixels = inputs["pixel_values"]
    return {**inputs, "pixel_values": pixels.mean(dim=(-1, -2), keepdim=True).expand_as(pixels).clone()}


def project_vision_layer(model, inputs, hidden):
    """A vision layer's output ``[images, patches, d_v]`` -> LM-space tokens ``[images, tokens, d_lm]``:
    the encoder's post-layernorm, then the pixel-shuffle connector."""
    return model.model.connector(model.model.vision_model.post_layernorm(hidden))


IDEFICS3 = Adapter(
    name="idefics3",
    architectures=("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration"),
    stacks=(
        Stack(
            prefix="vision",
            stage="encoder",
            modality="image",
            blocks="model.vision_model.encoder.layers",
            layout=CLIP_BLOCK,
            n_heads="config.vision_config.num_attention_heads",
            axes=IMAGE_ITEMS,
        ),
        _lm_stack,
    ),
    points=(
        Point("vision.embed", "encoder", "image", Site("model.vision_model.embeddings"), axes=IMAGE_ITEMS),
        Point("fusion.projector_out", "fusion", "image", Site("model.connector"), axes=IMAGE_ITEMS),
        Point(
            "fusion.embeds", "fusion", None, Site("model.text_model", "input", 0, "inputs_embeds"), fused_positions=True
        ),
        *_lm_points,
    ),
    spans=image_token_spans,
    neutral={"image": neutral_image, "text": neutral_text},
    modality_inputs={"image": ("pixel_values", "pixel_attention_mask"), "text": ("input_ids", "attention_mask")},
    perturbations={"image": image_perturbations("pixel_values"), "text": token_perturbations("input_ids")},
    project_encoder=project_vision_layer,
    input_ranges={"pixel_values": PIXEL_RANGE},
)
