"""Tiny random models of multimodal classes that mmlens wraps with an automatic adapter (no table).

Each is the real transformers class built from a small config with seeded random weights, and its
``example_inputs()`` is a batch of 2 laid out as the class's processor lays out one image: the
image placeholders (and the layout tokens around them) match what the pixels produce. See
:mod:`mmlens.hooks.auto` for how the adapters are derived.
"""

from __future__ import annotations

import torch
from transformers import (
    AyaVisionConfig,
    AyaVisionForConditionalGeneration,
    CLIPVisionConfig,
    LlamaConfig,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
    PreTrainedModel,
    SiglipVisionConfig,
    VipLlavaConfig,
    VipLlavaForConditionalGeneration,
)

from mmlens.data.loading import TINY_TEXT_CONFIG, LoadedModel, register

VOCAB = 256
IMAGE_TOKEN_ID = VOCAB - 1
LAYOUT_IDS = (VOCAB - 2, VOCAB - 3, VOCAB - 4)  # processor layout tokens (break / end / start ...)
TEXT_IDS = (3, VOCAB - 4)
TEXT_CONFIG = TINY_TEXT_CONFIG
VISION_CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def tiny_model(model_class: type[PreTrainedModel], config, name: str, seed: int, inputs) -> LoadedModel:
    """``model_class(config)`` with weights drawn under ``seed`` (the global RNG is left untouched)."""
    config.architectures = [model_class.__name__]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return LoadedModel(model, None, None, name, inputs)


def image_batch(seed: int, image: list[int], size: int) -> dict[str, torch.Tensor]:
    """input_ids ``[2, 8 + len(image)]``: bos, 3 random text ids, the image's tokens, 4 text ids; an
    all-ones attention_mask; pixel_values ``[2, 3, size, size]``."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(*TEXT_IDS, (2, 7), generator=generator)
    bos = torch.full((2, 1), TEXT_CONFIG["bos_token_id"])
    ids = torch.cat([bos, text[:, :3], torch.tensor([image]).expand(2, -1), text[:, 3:]], dim=1)
    pixels = torch.randn(2, 3, size, size, generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


@register(
    "tiny-random-mistral3",
    "Mistral3ForConditionalGeneration (automatic adapter), random weights: Pixtral 2x32 (32px, patch 8, "
    "merge 2 -> 4 image tokens) + Mistral 2x64",
)
def tiny_mistral3(name: str, dtype: torch.dtype, seed: int) -> LoadedModel:
    vision = PixtralVisionConfig(**VISION_CONFIG, patch_size=8, image_size=32, head_dim=8)
    config = Mistral3Config(
        vision_config=vision,
        text_config=MistralConfig(**TEXT_CONFIG),
        image_token_index=IMAGE_TOKEN_ID,
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )
    img, brk, end = IMAGE_TOKEN_ID, LAYOUT_IDS[0], LAYOUT_IDS[1]

    def inputs() -> dict[str, torch.Tensor]:
        """As the Pixtral processor lays out a 2x2-token image: [IMG] [IMG] [IMG_BREAK] [IMG] [IMG]
        [IMG_END] at positions 4..9 of input_ids [2, 14]; pixel_values [2, 3, 32, 32]; image_sizes [2, 2]."""
        batch = image_batch(seed, [img, img, brk, img, img, end], 32)
        return {**batch, "image_sizes": torch.tensor([[32, 32], [32, 32]])}

    return tiny_model(Mistral3ForConditionalGeneration, config, name, seed, inputs)


@register(
    "tiny-random-aya-vision",
    "AyaVisionForConditionalGeneration (automatic adapter), random weights: SigLIP 2x32 (32px, patch 8, "
    "pixel shuffle 2 -> 4 image tokens) + Llama 2x64",
)
def tiny_aya_vision(name: str, dtype: torch.dtype, seed: int) -> LoadedModel:
    vision = SiglipVisionConfig(**VISION_CONFIG, patch_size=8, image_size=32)
    config = AyaVisionConfig(
        vision_config=vision, text_config=LlamaConfig(**TEXT_CONFIG), image_token_index=IMAGE_TOKEN_ID
    )
    start, tile_global, end = LAYOUT_IDS[2], LAYOUT_IDS[1], LAYOUT_IDS[0]

    def inputs() -> dict[str, torch.Tensor]:
        """As AyaVisionProcessor lays out one untiled image: <|START_OF_IMG|> TILE_GLOBAL, 4 image
        patches (positions 6..9), <|END_OF_IMG|> in input_ids [2, 15]; pixel_values [2, 3, 32, 32]."""
        return image_batch(seed, [start, tile_global, *[IMAGE_TOKEN_ID] * 4, end], 32)

    return tiny_model(AyaVisionForConditionalGeneration, config, name, seed, inputs)


@register(
    "tiny-random-vipllava",
    "VipLlavaForConditionalGeneration (automatic adapter), random weights: CLIP 2x32 (32px, patch 8 -> 16 "
    "image tokens, features of layers -1 and 0) + Llama 2x64",
)
def tiny_vipllava(name: str, dtype: torch.dtype, seed: int) -> LoadedModel:
    vision = CLIPVisionConfig(**VISION_CONFIG, patch_size=8, image_size=32, projection_dim=32)
    config = VipLlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**TEXT_CONFIG),
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layers=[-1, 0],
    )

    def inputs() -> dict[str, torch.Tensor]:
        """As the LLaVA processor lays out one image: 16 image tokens at positions 4..19 of input_ids
        [2, 24]; pixel_values [2, 3, 32, 32]."""
        return image_batch(seed, [IMAGE_TOKEN_ID] * 16, 32)

    return tiny_model(VipLlavaForConditionalGeneration, config, name, seed, inputs)
