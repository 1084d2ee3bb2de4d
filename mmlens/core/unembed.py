"""The one reader of a language model's output head: ``unembed(final_norm(h))``.

The logit lens decodes every layer's residual stream with it, and the replay engine
(:mod:`mmlens.core.replay`) turns its replayed final residual into logits with it. Both use the
model's own modules, found through the adapter's ``lm.final_norm`` and ``lm.logits`` points.
"""

from __future__ import annotations

from torch import Tensor, nn

from mmlens.core.adapter import get_module
from mmlens.core.wrapper import HookedModel

POINTS: tuple[str, str] = ("lm.final_norm", "lm.logits")
"""The hook points whose modules make the reader."""


class Unembed:
    """``unembed(final_norm(h))``: Float[..., d] residual vectors -> Float[..., vocab] logits.

    Attributes:
        norm: the LM's final normalisation module; unembed: its output head.
    """

    def __init__(self, hooked: HookedModel):
        missing = [n for n in POINTS if n not in hooked.hook_points]
        if missing:
            raise KeyError(
                f"reading logits from the residual stream needs hook points {missing}, which adapter "
                f"{hooked.adapter.name!r} does not define; add them to its table (see mmlens.language_model)"
            )
        self.norm: nn.Module = get_module(hooked.model, hooked.hook_points["lm.final_norm"].site.module)
        self.unembed: nn.Module = get_module(hooked.model, hooked.hook_points["lm.logits"].site.module)

    @staticmethod
    def available(hooked: HookedModel) -> bool:
        """Whether ``hooked``'s adapter names the final norm and the unembedding."""
        return all(n in hooked.hook_points for n in POINTS)

    @property
    def vocab_size(self) -> int | None:
        """Rows of the output head (``out_features`` of a linear head), when it says."""
        return getattr(self.unembed, "out_features", None)

    def __call__(self, h: Tensor) -> Tensor:
        return self.unembed(self.norm(h))


__all__ = ["POINTS", "Unembed"]
