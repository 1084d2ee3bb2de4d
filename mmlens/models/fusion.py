"""A small image-text fusion transformer, built from scratch so every component is known.

Image patches and text tokens are encoded separately, tagged with a modality embedding,
concatenated (image first) and run through joint bidirectional blocks; a masked mean-pool over the
valid positions feeds a classification head.

Shapes: ``b`` batch, ``T`` text length, ``P`` image patches, ``d`` ``d_model``, ``h`` heads.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


@dataclass
class FusionConfig:
    """Sizes of a :class:`FusionTransformer`."""

    image_size: int = 16
    patch_size: int = 4
    channels: int = 3
    vocab_size: int = 64
    max_text_len: int = 16
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 128
    n_image_layers: int = 2
    n_text_layers: int = 2
    n_joint_layers: int = 2
    n_classes: int = 4

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")

    @property
    def n_patches(self) -> int:
        """Patches per image, ``(image_size // patch_size) ** 2``."""
        return (self.image_size // self.patch_size) ** 2


@dataclass
class FusionOutput:
    """Output of :class:`FusionTransformer`: ``logits`` ``[b, n_classes]``."""

    logits: Tensor


class Attention(nn.Module):
    """Bidirectional multi-head self-attention with a key padding mask.

    ``out_proj`` receives the heads concatenated, ``[b, seq, h * d_head]`` with head ``i`` at
    ``[..., i * d_head:(i + 1) * d_head]``, so a forward pre-hook on it sees per-head outputs.

    With ``return_weights`` set (off by default) the pattern is computed explicitly and ``forward``
    returns ``(out, weights)``, ``weights`` ``[b, h, seq_q, seq_k]``, as transformers' eager
    attention modules do (the attention explainers switch it on).
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not a multiple of n_heads {n_heads}")
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.return_weights = False

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """``x`` ``[b, seq, d]``, ``key_mask`` ``[b, seq]`` bool (True = attend) -> ``[b, seq, d]``
        (and the weights ``[b, h, seq, seq]`` when ``return_weights``)."""
        q, k, v = (
            rearrange(proj(x), "b s (h e) -> b h s e", h=self.n_heads)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        if not self.return_weights:
            heads = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
            return self.out_proj(rearrange(heads, "b h s e -> b s (h e)"))
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        weights = scores.softmax(-1)
        return self.out_proj(rearrange(weights @ v, "b h s e -> b s (h e)")), weights


class Block(nn.Module):
    """Pre-norm transformer block: ``h = x + attn(ln1(x))``; ``out = h + mlp(ln2(h))``."""

    def __init__(self, d_model: int, n_heads: int, d_mlp: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            OrderedDict(fc1=nn.Linear(d_model, d_mlp), act=nn.GELU(), fc2=nn.Linear(d_mlp, d_model))
        )

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """``x`` ``[b, seq, d]``, ``key_mask`` ``[b, seq]`` bool (True = attend) -> ``[b, seq, d]``."""
        attn = self.attn(self.ln1(x), key_mask)
        h = x + (attn[0] if isinstance(attn, tuple) else attn)
        return h + self.mlp(self.ln2(h))


class ImageEncoder(nn.Module):
    """Linear embedding of non-overlapping patches + learned positions, then ``Block``s."""

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = nn.Linear(config.channels * config.patch_size**2, config.d_model)
        self.pos_embed = nn.Parameter(torch.randn(config.n_patches, config.d_model) * 0.02)
        self.blocks = nn.ModuleList(
            Block(config.d_model, config.n_heads, config.d_mlp) for _ in range(config.n_image_layers)
        )

    def forward(self, pixel_values: Tensor) -> Tensor:
        """``pixel_values`` ``[b, channels, image_size, image_size]`` -> ``[b, P, d]``, patches in
        row-major order."""
        c, size = self.config.channels, self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (c, size, size):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}, expected "
                f"[batch, {c}, {size}, {size}]; resize the images or build the model with a "
                "FusionConfig whose channels and image_size match them"
            )
        p = self.config.patch_size
        patches = rearrange(pixel_values, "b c (gh p1) (gw p2) -> b (gh gw) (p1 p2 c)", p1=p, p2=p)
        x = self.patch_embed(patches) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x


class TextEncoder(nn.Module):
    """Token + learned position embeddings, then ``Block``s that ignore padded keys."""

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embed = nn.Parameter(torch.randn(config.max_text_len, config.d_model) * 0.02)
        self.blocks = nn.ModuleList(
            Block(config.d_model, config.n_heads, config.d_mlp) for _ in range(config.n_text_layers)
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``input_ids`` ``[b, T]`` long, ``attention_mask`` ``[b, T]`` (1 = token, 0 = padding)
        -> ``[b, T, d]``."""
        length = input_ids.shape[1]
        if length > self.config.max_text_len:
            raise ValueError(
                f"input_ids has {length} tokens but max_text_len is {self.config.max_text_len}; "
                "truncate the text or raise FusionConfig.max_text_len"
            )
        key_mask = None
        if attention_mask is not None:
            key_mask = attention_mask.bool()
            if not key_mask.any(dim=1).all():
                raise ValueError("attention_mask has a row with no valid token; every text needs at least one")
        x = self.embed(input_ids) + self.pos_embed[:length]
        for block in self.blocks:
            x = block(x, key_mask)
        return x


class FusionTransformer(nn.Module):
    """Image and text encoders, joint blocks over ``[image patches; text tokens]``, pooled head.

    ``fuse`` (an ``nn.Identity``) sees the joint input sequence ``[b, P + T, d]`` once, image
    positions ``0..P-1`` first, so a hook can read or replace it.
    """

    def __init__(self, config: FusionConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else FusionConfig()
        cfg = self.config
        self.image_encoder = ImageEncoder(cfg)
        self.text_encoder = TextEncoder(cfg)
        self.modality_embed = nn.Embedding(2, cfg.d_model)
        self.fuse = nn.Identity()
        self.joint_blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads, cfg.d_mlp) for _ in range(cfg.n_joint_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> FusionOutput:
        """``pixel_values`` ``[b, c, H, W]``, ``input_ids`` ``[b, T]``, ``attention_mask`` ``[b, T]``
        (1 = token, 0 = padding) -> :class:`FusionOutput` with ``logits`` ``[b, n_classes]``."""
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"batch sizes differ: {pixel_values.shape[0]} images, {input_ids.shape[0]} texts; "
                "pass one image per text"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        img = self.image_encoder(pixel_values)
        txt = self.text_encoder(input_ids, attention_mask)
        n_img, n_txt = img.shape[1], txt.shape[1]
        modality = torch.cat([input_ids.new_zeros(n_img), input_ids.new_ones(n_txt)])
        x = self.fuse(torch.cat([img, txt], dim=1) + self.modality_embed(modality))
        image_mask = attention_mask.new_ones(img.shape[0], n_img, dtype=torch.bool)
        key_mask = torch.cat([image_mask, attention_mask.bool()], dim=1)
        for block in self.joint_blocks:
            x = block(x, key_mask)
        x = self.final_norm(x)
        weights = key_mask[..., None].to(x.dtype)
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1)
        return FusionOutput(logits=self.head(pooled))
