"""Interop with TransformerLens names (and, below, its TransformerBridge and nnsight)."""

from __future__ import annotations

import re

_TL_BLOCK = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_post",
    "hook_attn_out": "attn_out",
    "hook_mlp_out": "mlp_out",
    "attn.hook_z": "z",
}
_TL_SINGLE = {"hook_embed": "lm.embed", "ln_final.hook_normalized": "lm.final_norm", "unembed.hook_out": "lm.logits"}
_TL_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def from_transformer_lens_name(name: str) -> str | None:
    """Our canonical name for a TransformerLens hook name (``blocks.3.hook_resid_post`` ->
    ``lm.blocks.3.resid_post``), or None when there is no counterpart."""
    if name in _TL_SINGLE:
        return _TL_SINGLE[name]
    match = _TL_RE.match(name)
    if match and match.group(2) in _TL_BLOCK:
        return f"lm.blocks.{match.group(1)}.{_TL_BLOCK[match.group(2)]}"
    return None


def to_transformer_lens_name(name: str) -> str | None:
    """The TransformerLens hook name for one of our LM hook names, or None."""
    for tl, ours in _TL_SINGLE.items():
        if ours == name:
            return tl
    match = re.match(r"^lm\.blocks\.(\d+)\.(\w+)$", name)
    if match:
        for tl, ours in _TL_BLOCK.items():
            if ours == match.group(2):
                return f"blocks.{match.group(1)}.{tl}"
    return None
