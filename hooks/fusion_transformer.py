"""mmlens's own fusion transformer (:class:`mmlens.models.FusionTransformer`): an image encoder
and a text encoder, concatenated (image patches first) into a joint transformer classifier."""

from __future__ import annotations

import torch

from mmlens.core.adapter import BATCH, Adapter, BlockLayout, Point, Site, Stack
from mmlens.core.spans import spans_from_blocks
from mmlens.core.units import patch_units, token_units
from mmlens.metrics.perturb import image_perturbations, token_perturbations

FUSION_BLOCK = BlockLayout(attn="attn", attn_out_proj="attn.out_proj", mlp="mlp", norm_mid="ln2")


def block_spans(model, inputs):
    """Image patches occupy the first ``n_patches`` positions, text the rest (minus padding)."""
    ids = inputs["input_ids"]
    return spans_from_blocks(
        ids.shape[0],
        {"image": model.config.n_patches, "text": ids.shape[1]},
        {"text": inputs.get("attention_mask")},
        device=ids.device,
    )


def neutral_image(model, inputs, spans):
    """An all-zero image."""
    return {**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])}


def neutral_text(model, inputs, spans):
    """Every token set to id 0 (the padding id of the synthetic vocabularies)."""
    return {**inputs, "input_ids": torch.zeros_like(inputs["input_ids"])}


def _encoder(prefix: str, modality: str, path: str) -> Stack:
    return Stack(
        prefix=prefix, stage="encoder", modality=modality, blocks=path, layout=FUSION_BLOCK, n_heads="config.n_heads"
    )


FUSION_TRANSFORMER = Adapter(
    name="fusion-transformer",
    architectures=("FusionTransformer",),
    stacks=(
        _encoder("vision", "image", "image_encoder.blocks"),
        _encoder("text", "text", "text_encoder.blocks"),
        Stack(
            prefix="lm", stage="lm", modality=None, blocks="joint_blocks", layout=FUSION_BLOCK, n_heads="config.n_heads"
        ),
    ),
    points=(
        Point("vision.embed", "encoder", "image", Site("image_encoder.patch_embed")),
        Point("text.embed", "encoder", "text", Site("text_encoder.embed")),
        Point("fusion.embeds", "fusion", None, Site("fuse"), fused_positions=True),
        Point("lm.final_norm", "lm", None, Site("final_norm"), fused_positions=True),
        Point("lm.logits", "lm", None, Site("head"), axes=BATCH),  # pooled [b, classes]
    ),
    spans=block_spans,
    neutral={"image": neutral_image, "text": neutral_text},
    required_inputs=("pixel_values", "input_ids"),
    modality_inputs={"image": ("pixel_values",), "text": ("input_ids", "attention_mask")},
    perturbations={"image": image_perturbations("pixel_values"), "text": token_perturbations("input_ids")},
    readout="mean",
    input_units={
        "image": patch_units("pixel_values", lambda model: model.config.patch_size, neutral_image),
        "text": token_units("input_ids", neutral_text),
    },
)
