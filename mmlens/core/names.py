"""Hook-point names: TransformerLens aliases and the one nearest-name suggester.

- :func:`from_transformer_lens_name` / :func:`to_transformer_lens_name` translate hook names, so
  ``blocks.3.hook_resid_post`` works wherever ``lm.blocks.3.resid_post`` does.
- :func:`nearest_names` suggests valid names for a mistyped one (every "did you mean" in mmlens).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

# TL name inside a block -> our kind. The first TL name of each kind is the canonical one
# (``to_transformer_lens_name``); the others are bridge aliases of the same tensor (verified equal
# in tests/test_interop.py against ``TransformerBridge.run_with_cache``).
TL_BLOCK: dict[str, str] = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_post",
    "hook_attn_out": "attn_out",
    "hook_mlp_out": "mlp_out",
    "attn.hook_z": "z",
    "hook_in": "resid_pre",
    "ln2.hook_in": "resid_mid",
    "hook_out": "resid_post",
    "attn.hook_out": "attn_out",
    "mlp.hook_out": "mlp_out",
    "attn.o.hook_in": "z",
}
# TL block-stack prefix -> ours.
TL_STACKS: dict[str, str] = {"blocks": "lm", "vision_encoder.encoder_layers": "vision"}
# ``ln_final.hook_normalized`` is NOT our ``lm.final_norm``: the bridge fires it before the norm's
# weight is applied, ``ln_final.hook_out`` after (= the norm module's output).
TL_SINGLE: dict[str, str] = {
    "hook_embed": "lm.embed",
    "ln_final.hook_out": "lm.final_norm",
    "unembed.hook_out": "lm.logits",
    "hook_unembed": "lm.logits",
    "vision_encoder.hook_vision_embed": "vision.embed",
    "vision_projector.hook_vision_proj_out": "fusion.projector_out",
}
_TL_RE = re.compile(r"^(blocks|vision_encoder\.encoder_layers)\.(\d+)\.(.+)$")
_OURS_RE = re.compile(r"^(lm|vision)\.blocks\.(\d+)\.(\w+)$")


def from_transformer_lens_name(name: str) -> str | None:
    """Our canonical name for a TransformerLens hook name (``blocks.3.hook_resid_post`` ->
    ``lm.blocks.3.resid_post``, ``vision_encoder.encoder_layers.0.hook_out`` ->
    ``vision.blocks.0.resid_post``), or None when there is no counterpart."""
    if name in TL_SINGLE:
        return TL_SINGLE[name]
    match = _TL_RE.match(name)
    if match and match.group(3) in TL_BLOCK:
        return f"{TL_STACKS[match.group(1)]}.blocks.{match.group(2)}.{TL_BLOCK[match.group(3)]}"
    return None


def to_transformer_lens_name(name: str) -> str | None:
    """The (canonical) TransformerLens hook name for one of our hook names, or None."""
    for tl, ours in TL_SINGLE.items():
        if ours == name:
            return tl
    match = _OURS_RE.match(name)
    if match:
        stack = next(tl for tl, ours in TL_STACKS.items() if ours == match.group(1))
        for tl, ours in TL_BLOCK.items():
            if ours == match.group(3):
                return f"{stack}.{match.group(2)}.{tl}"
    return None


def nearest_names(name: str, names: Sequence[str], n: int = 5, cutoff: float = 0.4, fallback: bool = True) -> list[str]:
    """Up to ``n`` of ``names`` closest to ``name`` (difflib similarity >= ``cutoff``, in [0, 1]);
    when none is that close, the first ``n`` of ``names`` (``fallback``) or none."""
    names = list(names)
    close = difflib.get_close_matches(name, names, n=n, cutoff=cutoff)
    return close or (names[:n] if fallback else [])


def unknown_hook_error(name: str, names: Sequence[str]) -> KeyError:
    """The error for an unknown hook point, naming the nearest valid ones."""
    return KeyError(f"unknown hook point {name!r}; nearest valid names: {nearest_names(name, names)}")
