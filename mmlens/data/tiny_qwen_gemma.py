"""Tiny random Qwen2-VL, Qwen2.5-VL and Gemma3 models (real transformers classes, seeded weights).

Registered by importing this module (``mmlens.data`` does it). Each ``example_inputs()`` is a batch of 2 laid out as the model's processor lays it out, with as
many image placeholders as the pixel inputs make image tokens:

- Qwen2-VL / Qwen2.5-VL: ``<|vision_start|>`` + ``(t*h*w) / merge**2`` ``<|image_pad|>`` +
  ``<|vision_end|>``; ``pixel_values`` packed ``[n_patches, C*T*P*P]`` (no batch axis) with
  ``image_grid_thw [n_images, 3]``; ``mm_token_type_ids`` 1 on image tokens (for M-RoPE).
- Gemma3: ``<start_of_image>`` + ``mm_tokens_per_image`` image tokens + ``<end_of_image>``;
  ``pixel_values [2, 3, H, W]``; ``token_type_ids`` 1 on image tokens (their bidirectional mask).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
)

from mmlens.data.loading import LoadedModel, register

Inputs = dict[str, torch.Tensor]

VOCAB = 256
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = VOCAB - 1, VOCAB - 2
VISION_START_ID, VISION_END_ID = VOCAB - 3, VOCAB - 4
TEXT_IDS = (3, VOCAB - 4)
QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL = 4, 2, 2
QWEN_GRID = (1, 4, 4)  # (t, h, w) patches of each example image: 16 patches -> 4 image tokens
_QWEN_TEXT = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_QWEN_VISION = {
    "depth": 2,
    "hidden_size": 64,
    "num_heads": 4,
    "patch_size": QWEN_PATCH,
    "spatial_merge_size": QWEN_MERGE,
    "temporal_patch_size": QWEN_TEMPORAL,
}


def _build(model_class: type, config: Any, name: str, seed: int, inputs: Callable[[], Inputs]) -> LoadedModel:
    """``model_class(config)`` with weights drawn under ``seed`` (the global RNG is left untouched)."""
    config.architectures = [model_class.__name__]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return LoadedModel(model, None, None, name, inputs)


def qwen_image_tokens(grid_thw: torch.Tensor, merge: int = QWEN_MERGE) -> list[int]:
    """Image tokens per image, ``t*h*w / merge**2``, from ``image_grid_thw`` Long[n_images, 3]."""
    return (grid_thw.prod(-1) // merge**2).tolist()


def qwen_inputs(seed: int, grids: list[list[tuple[int, int, int]]]) -> Inputs:
    """A batch whose row ``i`` holds the images of ``grids[i]`` (``(t, h, w)`` in patches), each as
    Qwen2-VL's processor writes it, followed by text; rows are right-padded to one length."""
    g = torch.Generator().manual_seed(seed)
    rows, types, patches, thw = [], [], [], []
    for row_grids in grids:
        ids, kinds = [1], [0]
        for grid in row_grids:
            n = qwen_image_tokens(torch.tensor([grid]))[0]
            ids += [VISION_START_ID] + [IMAGE_TOKEN_ID] * n + [VISION_END_ID]
            kinds += [0] + [1] * n + [0]
            patches.append(torch.randn(grid[0] * grid[1] * grid[2], 3 * QWEN_TEMPORAL * QWEN_PATCH**2, generator=g))
            thw.append(grid)
        text = torch.randint(*TEXT_IDS, (4,), generator=g).tolist()
        rows.append(ids + text)
        types.append(kinds + [0] * len(text))
    length = max(len(r) for r in rows)
    pad = [length - len(r) for r in rows]
    return {
        "input_ids": torch.tensor([r + [0] * p for r, p in zip(rows, pad)]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * p for r, p in zip(rows, pad)]),
        "mm_token_type_ids": torch.tensor([t + [0] * p for t, p in zip(types, pad)]),
        "pixel_values": torch.cat(patches),
        "image_grid_thw": torch.tensor(thw),
    }


def _qwen_config(config_class: type, **vision: object) -> object:
    text = dict(_QWEN_TEXT)
    return config_class(
        text_config=text,
        vision_config={**_QWEN_VISION, **vision},
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )


@register(
    "tiny-random-qwen2-vl",
    "Qwen2VLForConditionalGeneration, random weights: ViT 2x32 (patch 4, merge 2; packed patches) + Qwen2 2x64",
)
def _tiny_qwen2_vl(name: str, dtype: torch.dtype, seed: int) -> LoadedModel:
    config = _qwen_config(Qwen2VLConfig, embed_dim=32)
    grids = [[QWEN_GRID], [QWEN_GRID]]
    return _build(Qwen2VLForConditionalGeneration, config, name, seed, lambda: qwen_inputs(seed, grids))


@register(
    "tiny-random-qwen2.5-vl",
    "Qwen2_5_VLForConditionalGeneration, random weights: windowed ViT 2x32 (patch 4, merge 2) + Qwen2 2x64",
)
def _tiny_qwen2_5_vl(name: str, dtype: torch.dtype, seed: int) -> LoadedModel:
    config = _qwen_config(
        Qwen2_5_VLConfig,
        hidden_size=32,
        intermediate_size=64,
        out_hidden_size=64,
        window_size=16,
        fullatt_block_indexes=[1],
    )
    grids = [[QWEN_GRID], [QWEN_GRID]]
    return _build(Qwen2_5_VLForConditionalGeneration, config, name, seed, lambda: qwen_inputs(seed, grids))


GEMMA_BOI_ID, GEMMA_EOI_ID, GEMMA_IMAGE_ID = VOCAB - 3, VOCAB - 2, VOCAB - 1
GEMMA_IMAGE_TOKENS = 4  # mm_tokens_per_image: 4x4 patches pooled 2x2


def gemma3_inputs(seed: int, batch: int = 2) -> Inputs:
    """As Gemma3's processor lays out one image per row: bos, 3 text ids, ``<start_of_image>``,
    4 image tokens, ``<end_of_image>``, 4 text ids; ``token_type_ids`` 1 on the image tokens;
    ``pixel_values [batch, 3, 32, 32]``."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(*TEXT_IDS, (batch, 7), generator=g)
    image = torch.tensor([GEMMA_BOI_ID] + [GEMMA_IMAGE_ID] * GEMMA_IMAGE_TOKENS + [GEMMA_EOI_ID])
    ids = torch.cat([torch.full((batch, 1), 2), text[:, :3], image.expand(batch, -1), text[:, 3:]], dim=1)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": (ids == GEMMA_IMAGE_ID).long(),
        "pixel_values": torch.randn(batch, 3, 32, 32, generator=g),
    }


@register(
    "tiny-random-gemma3",
    "Gemma3ForConditionalGeneration, random weights: SigLIP 2x32 (32px, patch 8, pooled to 4 image tokens, "
    "bidirectional among them) + Gemma3 2x64 (sliding + full attention, post-norm branches)",
)
def _tiny_gemma3(name: str, dtype: torch.dtype, seed: int) -> LoadedModel:
    text = Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=256,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=GEMMA_IMAGE_TOKENS,
        boi_token_index=GEMMA_BOI_ID,
        eoi_token_index=GEMMA_EOI_ID,
        image_token_index=GEMMA_IMAGE_ID,
    )
    loaded = _build(Gemma3ForConditionalGeneration, config, name, seed, lambda: gemma3_inputs(seed))
    projection = loaded.model.model.multi_modal_projector.mm_input_projection_weight
    with torch.no_grad():  # transformers initialises it to zeros: images would not reach the LM at all
        projection.copy_(0.1 * torch.randn(projection.shape, generator=torch.Generator().manual_seed(seed)))
    return loaded
