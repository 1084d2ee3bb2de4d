"""Tiny random vision-language models of the real transformers classes, for testing each adapter offline.

Each builder makes its model from a tiny config (2 LM layers, d=64, a 2-layer vision tower of d=32) with
weights drawn under ``seed``, and example inputs of batch 2 laid out as the model's processor lays
them out: the placeholder counts come from the processor's or the model's own helper functions
(anyres tiling for LLaVA-NeXT / OneVision, the split-image prompt string for SmolVLM), never from a
hand count. ``mmlens.data.loading`` registers every entry of :data:`TINY_VLMS` (this module does not
import it, so that the two form no import cycle).

Vocabulary 256: ids 0-2 are pad/bos/eos, the top ids are placeholders and layout tokens, text ids lie
between.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from transformers import (
    CLIPVisionConfig,
    GemmaConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PreTrainedModel,
    Qwen2Config,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMVisionConfig,
)
from transformers.models.llava_next import modeling_llava_next
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor
from transformers.models.llava_onevision import modeling_llava_onevision
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor
from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

Inputs = dict[str, torch.Tensor]
Spec = Callable[[int], tuple[type[PreTrainedModel], Any, Callable[[], Inputs]]]
"""``spec(seed) -> (model class, config, example_inputs)``; the registry builds ``model class(config)`` under ``seed``."""
TINY_VLMS: dict[str, tuple[str, Spec]] = {}
"""Registry name -> (one-line description, spec)."""


def register(name: str, description: str) -> Callable[[Spec], Spec]:
    """Decorator adding ``spec`` to :data:`TINY_VLMS` as ``name``."""

    def add(spec: Spec) -> Spec:
        TINY_VLMS[name] = (description, spec)
        return spec

    return add


VOCAB = 256
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
IMAGE_ID = VOCAB - 1
VIDEO_ID = VOCAB - 2
LAYOUT_IDS = {  # SmolVLM's and InternVL's layout tokens (the text around the image placeholders)
    "<fake_token_around_image>": VOCAB - 3,
    "<global-img>": VOCAB - 4,
    "<row_1_col_1>": VOCAB - 5,
    "<row_1_col_2>": VOCAB - 6,
    "<img>": VOCAB - 7,
    "</img>": VOCAB - 8,
    "\n": 10,
}
TEXT_IDS = (11, VOCAB - 8)
TINY_TEXT = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "pad_token_id": PAD_ID,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
}
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
ANYRES_PINPOINTS = [[32, 64], [64, 32], [64, 64]]
ANYRES_IMAGE_SIZE = (16, 60)
"""(height, width) of the original image in the anyres examples: tiled 1 x 2 (+ the base tile), and
so wide that unpadding drops rows of the tiled grid."""


def _text(seed: int, n: int) -> torch.Tensor:
    """Random text ids [2, n]."""
    return torch.randint(*TEXT_IDS, (2, n), generator=torch.Generator().manual_seed(seed))


def _prompt(seed: int, image: list[int], before: int = 3, after: int = 4) -> torch.Tensor:
    """input_ids [2, 1 + before + len(image) + after]: bos, ``before`` text ids, the image ids, ``after`` text ids."""
    text = _text(seed, before + after)
    bos = torch.full((2, 1), BOS_ID)
    return torch.cat([bos, text[:, :before], torch.tensor([image]).expand(2, -1), text[:, before:]], dim=1)


def _pixels(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed + 1))


def tokenize_layout(prompt: str) -> list[int]:
    """A processor's image prompt string (``<image>``, layout tokens, newlines) -> ids of this vocabulary."""
    pieces = re.findall(r"<[^<>]+>|\n", prompt)
    if "".join(pieces) != prompt:
        raise ValueError(f"image prompt {prompt!r} has text outside the layout tokens {sorted(LAYOUT_IDS)}")
    return [IMAGE_ID if piece == "<image>" else LAYOUT_IDS[piece] for piece in pieces]


def anyres_image_tokens(processor_class: type, config: Any, image_size: tuple[int, int], **attributes: Any) -> int:
    """Placeholder count of one anyres image, from the processor's own ``_get_number_of_features``
    (called on a stand-in holding the attributes it reads) minus the CLS it drops for ``"default"``."""
    stand_in = SimpleNamespace(
        image_processor=SimpleNamespace(image_grid_pinpoints=config.image_grid_pinpoints), **attributes
    )
    stand_in._get_unpadded_features = processor_class._get_unpadded_features.__get__(stand_in)
    side = config.vision_config.image_size
    count = processor_class._get_number_of_features(stand_in, *image_size, side, side)
    return count - 1 if config.vision_feature_select_strategy == "default" else count


def anyres_tiles(model_module: Any, config: Any, image_size: tuple[int, int]) -> int:
    """Tiles of one anyres image (the base tile included), from the model's own ``image_size_to_num_patches``."""
    return model_module.image_size_to_num_patches(
        list(image_size), config.image_grid_pinpoints, config.vision_config.image_size
    )


def _anyres_inputs(seed: int, n_tokens: int, n_tiles: int, side: int) -> Inputs:
    ids = _prompt(seed, [IMAGE_ID] * n_tokens)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": _pixels(seed, n_tiles, 3, side, side),
        "image_sizes": torch.tensor([list(ANYRES_IMAGE_SIZE)] * 2),
    }


@register(
    "tiny-random-llava-next",
    "LlavaNextForConditionalGeneration, random weights: CLIP 2x32 (32px tiles, patch 8, anyres 16x60 image -> "
    "3 tiles -> 34 image tokens after unpadding, newlines included) + Llama 2x64",
)
def tiny_llava_next(seed: int) -> tuple[type[PreTrainedModel], Any, Callable[[], Inputs]]:
    vision = CLIPVisionConfig(**TINY_VISION, patch_size=8, image_size=32, projection_dim=32)
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=LlamaConfig(**TINY_TEXT),
        image_token_id=IMAGE_ID,
        image_grid_pinpoints=ANYRES_PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    n_tokens = anyres_image_tokens(
        LlavaNextProcessor,
        config,
        ANYRES_IMAGE_SIZE,
        patch_size=vision.patch_size,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
    )
    n_tiles = anyres_tiles(modeling_llava_next, config, ANYRES_IMAGE_SIZE)

    def inputs() -> Inputs:
        """As LlavaNextProcessor lays out one 16x60 image: input_ids [2, 8 + 34] with the image tokens
        from position 4; pixel_values [2, tiles, 3, 32, 32]; image_sizes [2, 2] (height, width)."""
        return _anyres_inputs(seed, n_tokens, n_tiles, vision.image_size)

    return LlavaNextForConditionalGeneration, config, inputs


@register(
    "tiny-random-llava-onevision",
    "LlavaOnevisionForConditionalGeneration, random weights: SigLIP 2x32 (32px tiles, patch 8, anyres 16x60 "
    "image -> 3 tiles -> 34 image tokens) + Qwen2 2x64",
)
def tiny_llava_onevision(seed: int) -> tuple[type[PreTrainedModel], Any, Callable[[], Inputs]]:
    vision = SiglipVisionConfig(**TINY_VISION, patch_size=8, image_size=32)
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=Qwen2Config(**TINY_TEXT),
        image_token_index=IMAGE_ID,
        video_token_index=VIDEO_ID,
        image_grid_pinpoints=ANYRES_PINPOINTS,
    )
    n_tokens = anyres_image_tokens(
        LlavaOnevisionProcessor,
        config,
        ANYRES_IMAGE_SIZE,
        num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
        vision_aspect_ratio=config.vision_aspect_ratio,
    )
    n_tiles = anyres_tiles(modeling_llava_onevision, config, ANYRES_IMAGE_SIZE)

    def inputs() -> Inputs:
        """As LlavaOnevisionProcessor lays out one 16x60 image per prompt: input_ids [2, 8 + 34] with
        the image tokens from position 4; pixel_values [2, tiles, 3, 32, 32]; image_sizes [2, 2];
        batch_num_images [2] (one image per prompt)."""
        return {**_anyres_inputs(seed, n_tokens, n_tiles, vision.image_size), "batch_num_images": torch.ones(2).long()}

    return LlavaOnevisionForConditionalGeneration, config, inputs


@register(
    "tiny-random-smolvlm",
    "SmolVLMForConditionalGeneration, random weights: SigLIP 2x32 (32px, patch 8, pixel shuffle 2 -> 4 tokens "
    "per sub-image; an image split 1x2 + global) + Llama 2x64",
)
def tiny_smolvlm(seed: int) -> tuple[type[PreTrainedModel], Any, Callable[[], Inputs]]:
    vision = SmolVLMVisionConfig(**TINY_VISION, patch_size=8, image_size=32)
    config = SmolVLMConfig(
        vision_config=vision, text_config=LlamaConfig(**TINY_TEXT), image_token_id=IMAGE_ID, scale_factor=2
    )
    seq_len = (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2
    layout = get_image_prompt_string(
        image_rows=1,
        image_cols=2,
        image_seq_len=seq_len,
        fake_token_around_image="<fake_token_around_image>",
        image_token="<image>",
        global_image_token="<global-img>",
    )
    image = tokenize_layout(layout)

    def inputs() -> Inputs:
        """As SmolVLMProcessor lays out one image split into 1 x 2 sub-images plus the global image:
        input_ids [2, 8 + 22] (image layout from position 4); pixel_values [2, 3, 3, 32, 32] (the two
        sub-images, then the global one); pixel_attention_mask [2, 3, 32, 32] (all pixels real)."""
        ids = _prompt(seed, image)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": _pixels(seed, 3, 3, vision.image_size, vision.image_size),
            "pixel_attention_mask": torch.ones(2, 3, vision.image_size, vision.image_size, dtype=torch.long),
        }

    return SmolVLMForConditionalGeneration, config, inputs


@register(
    "tiny-random-paligemma",
    "PaliGemmaForConditionalGeneration, random weights: SigLIP 2x32 (32px, patch 8 -> 16 image tokens) + "
    "Gemma 2x64; the image + prompt prefix attends bidirectionally",
)
def tiny_paligemma(seed: int) -> tuple[type[PreTrainedModel], Any, Callable[[], Inputs]]:
    vision = SiglipVisionConfig(**TINY_VISION, patch_size=8, image_size=32, vision_use_head=False)
    text = GemmaConfig(**TINY_TEXT, head_dim=16)
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_ID,
        projection_dim=text.hidden_size,
        hidden_size=text.hidden_size,
        vocab_size=VOCAB,
    )
    n_tokens = config.text_config.num_image_tokens

    def inputs() -> Inputs:
        """As PaliGemmaProcessor lays out one image and a prompt (no suffix): input_ids [2, 16 + 9] = 16 image
        tokens, bos, 7 text ids, newline; token_type_ids [2, 25] all 0 (the whole prefix attends
        bidirectionally); pixel_values [2, 3, 32, 32]."""
        text_ids = _text(seed, 7)
        ids = torch.cat(
            [
                torch.full((2, n_tokens), IMAGE_ID),
                torch.full((2, 1), BOS_ID),
                text_ids,
                torch.full((2, 1), LAYOUT_IDS["\n"]),
            ],
            dim=1,
        )
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "token_type_ids": torch.zeros_like(ids),
            "pixel_values": _pixels(seed, 3, vision.image_size, vision.image_size),
        }

    return PaliGemmaForConditionalGeneration, config, inputs


@register(
    "tiny-random-internvl",
    "InternVLForConditionalGeneration, random weights: InternViT 2x32 (64px, patch 8, pixel shuffle 0.5 -> 16 "
    "image tokens, one tile per image) + Qwen2 2x64",
)
def tiny_internvl(seed: int) -> tuple[type[PreTrainedModel], Any, Callable[[], Inputs]]:
    vision = InternVLVisionConfig(**TINY_VISION, patch_size=(8, 8), image_size=(64, 64))
    n_tokens = int((64 // 8) ** 2 * 0.5**2)
    config = InternVLConfig(
        vision_config=vision, text_config=Qwen2Config(**TINY_TEXT), image_token_id=IMAGE_ID, image_seq_length=n_tokens
    )

    def inputs() -> Inputs:
        """As InternVLProcessor lays out one image as a single tile (``crop_to_patches=False``): input_ids
        [2, 8 + 18] = ..., <img>, 16 <IMG_CONTEXT> tokens (positions 5..20), </img>, ...; pixel_values
        [2, 3, 64, 64] (one tile per prompt, so the tiles are the batch axis)."""
        ids = _prompt(seed, [LAYOUT_IDS["<img>"]] + [IMAGE_ID] * n_tokens + [LAYOUT_IDS["</img>"]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": _pixels(seed, 3, 64, 64)}

    return InternVLForConditionalGeneration, config, inputs
