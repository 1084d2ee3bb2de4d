"""HF Qwen2-VL (``Qwen2VLForConditionalGeneration``) and Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``):
a ViT over packed patches -> 2x2 patch merger -> Qwen2 LM with multimodal RoPE.

Facts these tables state:

- ``pixel_values`` is packed ``[n_patches, C*T*P*P]`` for every image of the batch, with
  ``image_grid_thw [n_images, 3]``; image ``j`` has ``t*h*w`` patches and ``t*h*w / merge**2``
  placeholder tokens. Rows are split by counting each row's placeholders (``packed_inputs``).
- The vision blocks see ``[n_patches, d]`` (no batch axis: axis 0 runs over the patches of every
  image of the batch, block-diagonal attention via ``cu_seqlens``). In Qwen2.5-VL the patches
  inside the blocks are in window order (``get_vision_window_index``), not raster order.
- The LM blocks get M-RoPE cos/sin; their sequence axes are stated from the end
  (``MROPE_SEQUENCE_KWARGS``), which fits both ``[b, seq, d]`` and ``[3, b, seq, d]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from mmlens.core.adapter import ITEMS, MROPE_SEQUENCE_KWARGS, Adapter, BlockLayout, Point, Site, Stack, language_model
from mmlens.core.spans import ModalitySpans, spans_from_token_ids
from mmlens.hooks.language_models import neutral_text
from mmlens.metrics.perturb import CannotPerturb, token_perturbations

QWEN_VISION_BLOCK = BlockLayout(attn="attn", attn_out_proj="attn.proj", mlp="mlp", norm_mid="norm2")

_lm_stack, _lm_points = language_model(
    base="model.language_model", logits="lm_head", n_heads="config.text_config.num_attention_heads"
)


def image_token_spans(model: nn.Module, inputs: Mapping[str, Tensor]) -> ModalitySpans:
    """Image positions are the ``<|image_pad|>`` placeholders (``config.image_token_id``)."""
    return spans_from_token_ids(
        inputs["input_ids"], inputs.get("attention_mask"), {"image": model.config.image_token_id}
    )


MM_TYPES: dict[str, int] = {"image_grid_thw": 1, "video_grid_thw": 2}
"""``mm_token_type_ids`` value of each grid's placeholders (text 0, image 1, video 2)."""


def _items_per_row(inputs: Mapping[str, Tensor], grid_key: str) -> tuple[list[int], list[int]]:
    """(items per batch row, patches per item) of the packed items of ``grid_key``: each row's
    placeholders (``mm_token_type_ids``) are matched in order with the items' token counts
    ``t*h*w / merge**2``, the merge factor being patches per placeholder over the whole batch."""
    if "mm_token_type_ids" not in inputs:
        raise ValueError(
            f"inputs with {grid_key!r} need 'mm_token_type_ids' (image 1, video 2, text 0), as the processor "
            "returns it: the model computes M-RoPE from it and mmlens splits the packed patches by it"
        )
    placeholders = inputs["mm_token_type_ids"] == MM_TYPES[grid_key]
    if "attention_mask" in inputs:
        placeholders = placeholders & inputs["attention_mask"].bool()
    per_row = placeholders.sum(1).tolist()
    patches = inputs[grid_key].prod(-1).tolist()
    merge2 = sum(patches) // max(sum(per_row), 1)
    counts, j = [], 0
    for need in per_row:
        start = j
        while need > 0 and j < len(patches):
            need -= patches[j] // merge2
            j += 1
        if need != 0:
            raise ValueError(
                f"{grid_key}: a row's placeholders do not cover whole items ({per_row} placeholders per row, "
                f"{patches} patches per item); lay the inputs out as the processor does"
            )
        counts.append(j - start)
    if j != len(patches):
        raise ValueError(f"{grid_key}: {len(patches)} items but the rows' placeholders account for {j}")
    return counts, patches


def packed_rows(grid_key: str, patches: bool) -> Callable[[Mapping[str, Tensor]], list[int]]:
    """A row splitter (``Adapter.packed_inputs``): per batch row, its number of items (``patches=False``:
    rows of ``grid_key``) or of patches (``patches=True``: ``sum(t*h*w)`` over its items)."""

    def sizes(inputs: Mapping[str, Tensor]) -> list[int]:
        counts, per_item = _items_per_row(inputs, grid_key)
        if not patches:
            return counts
        bounds = [0, *torch.tensor(counts).cumsum(0).tolist()]
        return [sum(per_item[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    return sizes


def neutral_image(model: nn.Module, inputs: dict, spans: ModalitySpans) -> dict:
    """All-zero patches (the mean image after the processor's normalisation); same grids and tokens."""
    return {**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])}


def _patch_std(inputs: Mapping[str, Tensor]) -> Tensor:
    """Each patch's image's pixel std ``[n_patches, 1]`` (images from ``image_grid_thw``)."""
    pixels, sizes = inputs["pixel_values"].float(), inputs["image_grid_thw"].prod(-1)
    stds = torch.stack([p.std() for p in pixels.split(sizes.tolist())])
    return stds.repeat_interleave(sizes.to(stds.device))[:, None]


def _packed_noise(hooked, inputs: dict, spans: ModalitySpans, scale: float, generator: torch.Generator):
    """Gaussian noise on the packed patches, sigma = ``scale`` x each image's pixel std."""
    if "pixel_values" not in inputs:
        raise CannotPerturb("these inputs have no 'pixel_values'")
    pixels, sigma = inputs["pixel_values"], scale * _patch_std(inputs)

    def draw(i: int) -> tuple[dict, str]:
        noise = torch.randn(pixels.shape, generator=generator).to(pixels.device)
        noisy = (pixels.float() + noise * sigma).to(pixels.dtype)
        return {**inputs, "pixel_values": noisy}, f"Gaussian noise on the packed patches, sigma = {scale} x pixel std"

    return draw


def _packed_brightness(hooked, inputs: dict, spans: ModalitySpans, scale: float, generator: torch.Generator):
    """Each image's patches plus one offset in ``[-scale, scale]`` x that image's pixel std."""
    if "pixel_values" not in inputs:
        raise CannotPerturb("these inputs have no 'pixel_values'")
    pixels, sizes = inputs["pixel_values"], inputs["image_grid_thw"].prod(-1)

    def draw(i: int) -> tuple[dict, str]:
        offset = (torch.rand(len(sizes), generator=generator) * 2 - 1) * scale
        per_patch = offset.repeat_interleave(sizes.cpu())[:, None].to(pixels.device)
        shifted = (pixels.float() + per_patch * _patch_std(inputs)).to(pixels.dtype)
        return {**inputs, "pixel_values": shifted}, f"brightness offset {offset.tolist()} x pixel std per image"

    return draw


def project_vision_layer(model: nn.Module, inputs: Mapping[str, Tensor], hidden: Tensor) -> Tensor:
    """A vision layer's output ``[n_patches, d_v]`` -> LM-space tokens ``[images, tokens, d_lm]``
    through the patch merger (Qwen2.5-VL: back from window order to raster order). Images with
    different token counts are padded with zeros to the largest."""
    visual = model.model.visual
    merged = visual.merger(hidden)
    if hasattr(visual, "window_size"):  # Qwen2.5-VL
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(
            inputs["image_grid_thw"],
            spatial_merge_size=visual.spatial_merge_size,
            window_size=visual.window_size,
            patch_size=visual.patch_size,
            kwargs={},
        )
        merged = merged[torch.argsort(window_index)]
    tokens = (inputs["image_grid_thw"].prod(-1) // visual.spatial_merge_size**2).tolist()
    return nn.utils.rnn.pad_sequence(list(merged.split(tokens)), batch_first=True)


def _qwen_adapter(name: str, architecture: str) -> Adapter:
    return Adapter(
        name=name,
        architectures=(architecture,),
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
            _lm_stack,
        ),
        points=(
            Point("vision.embed", "encoder", "image", Site("model.visual.patch_embed"), axes=ITEMS),
            Point("fusion.projector_out", "fusion", "image", Site("model.visual.merger"), axes=ITEMS),
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
        required_inputs=("input_ids",),
        modality_inputs={
            "image": ("pixel_values", "image_grid_thw"),
            "text": ("input_ids", "attention_mask", "mm_token_type_ids"),
        },
        packed_inputs={
            "pixel_values": packed_rows("image_grid_thw", patches=True),
            "image_grid_thw": packed_rows("image_grid_thw", patches=False),
            "pixel_values_videos": packed_rows("video_grid_thw", patches=True),
            "video_grid_thw": packed_rows("video_grid_thw", patches=False),
        },
        perturbations={
            "image": {"brightness": _packed_brightness, "gaussian_noise": _packed_noise},
            "text": token_perturbations("input_ids"),
        },
        project_encoder=project_vision_layer,
        sequence_kwargs=MROPE_SEQUENCE_KWARGS,
        causal=True,
    )


QWEN2_VL = _qwen_adapter("qwen2-vl", "Qwen2VLForConditionalGeneration")
QWEN2_5_VL = _qwen_adapter("qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration")
