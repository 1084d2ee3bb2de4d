"""Modality spans: which positions of the fused sequence belong to which modality.

A :class:`ModalitySpans` holds one boolean mask ``[batch, seq]`` per modality, computed by the
adapter from the inputs themselves (e.g. LLaVA: ``input_ids == image_token_id``). Every analysis
takes positions through :meth:`ModalitySpans.mask` so that one selector language works
everywhere:

- a modality name: ``"image"``, ``"text"``, ``"graph"``, ... ; ``"all"`` for every real position
- ``"last"`` (last real position of each row), ``"last_<modality>"`` / ``"first_<modality>"``
  (e.g. ``"last_text"``)
- an int (negative counts from the end of the sequence), a list/tuple of ints, a ``slice``
- a boolean tensor ``[seq]`` or ``[batch, seq]``, or a long tensor of positions ``[n]``

Rows may have different layouts (the image at different offsets); masks handle that natively.
Methods that return a dense ``[batch, n]`` index raise a clear error when rows differ in count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

Selector = str | int | slice | list | tuple | Tensor | None


@dataclass
class ModalitySpans:
    """Per-modality position masks of one batch.

    Attributes:
        masks: modality name -> Bool[batch, seq]; the modalities are disjoint.
        valid: Bool[batch, seq], the non-padding positions.
    """

    masks: dict[str, Tensor]
    valid: Tensor

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def seq_len(self) -> int:
        return self.valid.shape[1]

    @property
    def modalities(self) -> list[str]:
        return list(self.masks)

    def __repr__(self) -> str:
        counts = {m: self.masks[m].sum(1).tolist() for m in self.masks}
        return f"ModalitySpans(batch={self.batch_size}, seq={self.seq_len}, counts per row={counts})"

    def _unknown(self, name: str) -> KeyError:
        options = self.modalities + ["all", "last"] + [f"{e}_{m}" for m in self.modalities for e in ("first", "last")]
        return KeyError(f"span {name!r} is not in these inputs; spans here: {options}")

    def mask(self, selector: Selector) -> Tensor:
        """Resolve any selector to a Bool[batch, seq] mask (``None`` means all real positions)."""
        b, s = self.valid.shape
        device = self.valid.device
        if selector is None or (isinstance(selector, str) and selector == "all"):
            return self.valid.clone()
        if isinstance(selector, str):
            if selector in self.masks:
                return self.masks[selector].clone()
            if selector == "last":
                return _edge(self.valid, last=True)
            for edge in ("first_", "last_"):
                if selector.startswith(edge) and selector[len(edge) :] in self.masks:
                    return _edge(self.masks[selector[len(edge) :]], last=edge == "last_")
            raise self._unknown(selector)
        if isinstance(selector, Tensor) and selector.dtype == torch.bool:
            if selector.shape == (s,):
                return selector.to(device).expand(b, s).clone()
            if selector.shape == (b, s):
                return selector.to(device).clone()
            raise ValueError(f"boolean position mask has shape {tuple(selector.shape)}; expected ({s},) or ({b}, {s})")
        positions = as_positions(selector, s)
        out = torch.zeros(b, s, dtype=torch.bool, device=device)
        out[:, positions.to(device)] = True
        return out

    def positions(self, selector: Selector) -> Tensor:
        """Positions selected in each row as Long[batch, n]; rows must select the same count."""
        mask = self.mask(selector)
        counts = mask.sum(1)
        if (counts != counts[0]).any():
            raise ValueError(
                f"selector {selector!r} picks a different number of positions per row ({counts.tolist()}); "
                "use .mask(...) for ragged layouts or index one row at a time"
            )
        return mask.nonzero()[:, 1].view(mask.shape[0], int(counts[0]))

    def modality_of_positions(self) -> list[list[str]]:
        """For each row, the modality name of every position ("pad" for padding)."""
        labels = [["pad"] * self.seq_len for _ in range(self.batch_size)]
        for name, m in self.masks.items():
            for row, pos in m.nonzero().tolist():
                labels[row][pos] = name
        return labels

    def same_layout(self, other: ModalitySpans) -> bool:
        return self.masks.keys() == other.masks.keys() and all(
            self.masks[k].shape == other.masks[k].shape and torch.equal(self.masks[k], other.masks[k])
            for k in self.masks
        )


def _edge(mask: Tensor, last: bool) -> Tensor:
    """Bool[b, s] with only the first/last True of each row kept (rows with none stay empty)."""
    s = mask.shape[1]
    idx = torch.arange(s, device=mask.device).expand_as(mask)
    if last:
        pick = torch.where(mask, idx, -1).max(1).values
    else:
        pick = torch.where(mask, idx, s).min(1).values
    return (idx == pick[:, None]) & mask


def as_positions(selector: Selector, seq_len: int) -> Tensor:
    if isinstance(selector, bool):
        raise TypeError("a bool is not a position; pass a span name, an int, a slice or a mask")
    if isinstance(selector, int):
        items = [selector]
    elif isinstance(selector, slice):
        items = list(range(seq_len))[selector]
    elif isinstance(selector, (list, tuple)):
        items = list(selector)
    elif isinstance(selector, Tensor) and not selector.is_floating_point():
        items = selector.flatten().tolist()
    else:
        raise TypeError(
            f"cannot select positions with {type(selector).__name__}; use a span name "
            "('text', 'image', 'graph', 'last_text', ...), an int, a list of ints, a slice or a bool mask"
        )
    bad = [p for p in items if not -seq_len <= int(p) < seq_len]
    if bad:
        raise IndexError(f"positions {bad} are out of range for a sequence of length {seq_len}")
    return torch.tensor([int(p) % seq_len for p in items], dtype=torch.long)


def spans_from_token_ids(input_ids: Tensor, attention_mask: Tensor | None, token_ids: dict[str, int]) -> ModalitySpans:
    """Spans of a token-spliced model: modality m sits where ``input_ids == token_ids[m]``;
    every other real position is ``"text"``."""
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    masks: dict[str, Tensor] = {}
    other = torch.zeros_like(valid)
    for name, tok in token_ids.items():
        masks[name] = (input_ids == tok) & valid
        other |= masks[name]
    return ModalitySpans(masks={"text": valid & ~other, **masks}, valid=valid)


def spans_from_blocks(
    batch: int, lengths: dict[str, int], masks: dict[str, Tensor | None], device=None
) -> ModalitySpans:
    """Spans of a model that concatenates modality blocks in order (e.g. image patches, then text).

    Args:
        lengths: modality -> number of positions of its block, in sequence order.
        masks: modality -> optional Bool/Long[batch, length] of real (non-padding) positions.
    """
    total = sum(lengths.values())
    valid = torch.zeros(batch, total, dtype=torch.bool, device=device)
    out: dict[str, Tensor] = {}
    start = 0
    for name, n in lengths.items():
        m = torch.zeros(batch, total, dtype=torch.bool, device=device)
        own = masks.get(name)
        m[:, start : start + n] = True if own is None else own.bool().to(m.device)
        out[name] = m
        valid |= m
        start += n
    return ModalitySpans(masks=out, valid=valid)
