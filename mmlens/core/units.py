"""Input units: keep/remove on a modality's raw input, for input-level faithfulness.

An :class:`InputUnits` says, for one modality of one architecture family, what its input units are
(vision patches, text tokens, audio frames, graph nodes and edges), how many one input row has, which
position of the fused sequence a unit's explanation score is read from, and how to set chosen units
to that modality's neutral reference on the raw inputs. Adapters declare them in
``Adapter.input_units`` with the builders here (:func:`patch_units`, :func:`token_units`,
:func:`frame_units`, :func:`graph_units`); the builders take the input keys and the adapter's own
neutral reference, so every architecture fact stays in the adapter table.

Every builder works on one input row (batch 1), as the desiderata do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mmlens.core.spans import ModalitySpans

NeutralFn = Callable[[nn.Module, dict, ModalitySpans], dict]
"""An adapter's neutral reference of one modality: ``(model, inputs, spans) -> inputs``."""
UnitCount = Callable[[nn.Module, Mapping[str, Any], ModalitySpans], int]
UnitPositions = Callable[[nn.Module, Mapping[str, Any], ModalitySpans], Tensor]
UnitMask = Callable[[nn.Module, dict, ModalitySpans, Tensor], dict]


@dataclass(frozen=True)
class InputUnits:
    """Keep/remove on one modality's raw input units (one input row).

    Attributes:
        unit: what a unit is, for messages (``"vision patch"``, ``"token"``, ...).
        count: ``(model, inputs, spans) -> n``: the row's units.
        apply: ``(model, inputs, spans, keep: Bool[n]) -> inputs``: every unit not kept set to the
            modality's neutral reference (or dropped, for edges); other inputs are the same objects.
        positions: ``(model, inputs, spans) -> Long[n]``: the fused-sequence position whose
            explanation score is the unit's score (one LM position per unit); raises ValueError
            naming why when the inputs have no such mapping (e.g. a CLS token or tiles); ``None``:
            no mapping exists (graph nodes reach every graph token), scores per unit must be given.
        neutral_exact: removing every unit gives exactly the adapter's neutral reference of the
            modality (False where that reference is not built on these units, e.g. a graph whose
            neutral keeps its edges).
    """

    unit: str
    count: UnitCount
    apply: UnitMask
    positions: UnitPositions | None = None
    neutral_exact: bool = True


def _one_row(inputs: Mapping[str, Any], key: str) -> Tensor:
    value = inputs[key]
    if value.shape[0] != 1:
        raise ValueError(f"input-level units act on one input row; {key!r} has {value.shape[0]} rows (take hm.rows)")
    return value


def _check_keep(keep: Tensor, n: int, unit: str) -> Tensor:
    keep = torch.as_tensor(keep, dtype=torch.bool).reshape(-1).cpu()
    if keep.numel() != n:
        raise ValueError(f"keep has {keep.numel()} entries for {n} {unit} units of this input")
    return keep


def _span_positions(spans: ModalitySpans, modality: str) -> Tensor:
    return spans.masks[modality][0].cpu().nonzero()[:, 0]


def patch_units(key: str, patch_size: Callable[[nn.Module], int], neutral: NeutralFn, modality: str = "image"):
    """Units: the ``patch_size`` x ``patch_size`` pixel squares of an image ``[1, C, H, W]``, row-major
    (as a ViT's patch embedding flattens them); a removed patch takes the neutral image's pixels there.
    Unit u's score is the u-th ``modality`` position's: one LM token per patch, in order (refused when
    the image positions and the patch count differ, e.g. a kept CLS token or several tiles)."""

    def grid(model: nn.Module, inputs: Mapping[str, Any]) -> tuple[int, int, int]:
        pixels, p = _one_row(inputs, key), int(patch_size(model))
        if pixels.dim() != 4 or pixels.shape[-1] % p or pixels.shape[-2] % p:
            raise ValueError(
                f"{key!r} of shape {tuple(pixels.shape)} is not one image [1, C, H, W] cut into whole "
                f"{p}x{p} patches; input-level units need that layout (use level='embedding')"
            )
        return p, pixels.shape[-2] // p, pixels.shape[-1] // p

    def count(model, inputs, spans) -> int:
        _, gh, gw = grid(model, inputs)
        return gh * gw

    def positions(model, inputs, spans) -> Tensor:
        found, n = _span_positions(spans, modality), count(model, inputs, spans)
        if len(found) != n:
            raise ValueError(
                f"the input has {len(found)} {modality} positions but {n} vision patches: no one-token-per-patch "
                "mapping (a CLS token, pooling or multi-tile images); use level='embedding'"
            )
        return found

    def apply(model, inputs, spans, keep) -> dict:
        p, gh, gw = grid(model, inputs)
        keep = _check_keep(keep, gh * gw, "vision patch").reshape(gh, gw)
        region = keep.logical_not().repeat_interleave(p, 0).repeat_interleave(p, 1).to(inputs[key].device)
        reference = neutral(model, dict(inputs), spans)[key]
        return {**inputs, key: torch.where(region, reference, inputs[key])}

    return InputUnits("vision patch", count, apply, positions)


def _token_columns(ids: Tensor, spans: ModalitySpans, modality: str) -> Tensor:
    """Long[n]: the column of ``ids`` of each ``modality`` position of row 0: the position itself when
    ``ids`` spans the fused sequence, else its rank among the positions no other modality holds (ids
    that cover only the text and padding positions, in order)."""
    text = _span_positions(spans, modality)
    if ids.shape[1] == spans.seq_len:
        return text
    soft = torch.zeros(spans.seq_len, dtype=torch.bool)
    for name, mask in spans.masks.items():
        if name != modality:
            soft |= mask[0].cpu()
    rank = (~soft).long().cumsum(0) - 1
    return rank[text]


def token_units(key: str, neutral: NeutralFn, modality: str = "text"):
    """Units: the ``modality`` tokens of ``ids = inputs[key]`` ``[1, T]`` (fused-aligned, or text and
    padding only); a removed token takes the neutral reference's id. Unit u's score is the u-th
    ``modality`` position's (the token itself)."""

    def count(model, inputs, spans) -> int:
        return int(spans.masks[modality][0].sum())

    def positions(model, inputs, spans) -> Tensor:
        return _span_positions(spans, modality)

    def apply(model, inputs, spans, keep) -> dict:
        ids = _one_row(inputs, key)
        columns = _token_columns(ids, spans, modality)
        removed = columns[~_check_keep(keep, len(columns), "token")].to(ids.device)
        out = ids.clone()
        out[0, removed] = neutral(model, dict(inputs), spans)[key][0, removed]
        return {**inputs, key: out}

    return InputUnits("token", count, apply, positions)


def frame_units(
    key: str, valid: str, frames_per_token: int, tokens: Callable[[int], int], neutral: NeutralFn, modality="audio"
):
    """Units: runs of ``frames_per_token`` feature frames of ``inputs[key]`` ``[1, ..., frames]``, one per
    audio token (``tokens(real frames)`` of them, real frames from the mask ``inputs[valid]``); the
    last unit also holds every later frame (the padding), so removing all is the neutral audio exactly.
    A removed unit's frames take the neutral reference's. Unit u's score is the u-th ``modality``
    position's (the encoder's receptive fields overlap a little across the runs' borders)."""

    def count(model, inputs, spans) -> int:
        return tokens(int(_one_row(inputs, valid).sum()))

    def positions(model, inputs, spans) -> Tensor:
        found, n = _span_positions(spans, modality), count(model, inputs, spans)
        if len(found) != n:
            raise ValueError(f"the input has {len(found)} {modality} positions but its frames make {n} tokens")
        return found

    def apply(model, inputs, spans, keep) -> dict:
        features = _one_row(inputs, key)
        keep = _check_keep(keep, count(model, inputs, spans), "audio frames")
        owner = (torch.arange(features.shape[-1]) // frames_per_token).clamp_max(len(keep) - 1)
        region = (~keep)[owner].to(features.device)
        reference = neutral(model, dict(inputs), spans)[key]
        return {**inputs, key: torch.where(region, reference, features)}

    return InputUnits("audio frames", count, apply, positions)


def edge_pairs(edges: Tensor) -> Tensor:
    """Long[E]: the index of each column's unordered node pair among the sorted distinct pairs of
    ``edges`` ``[2, E]`` (both directions of a pair share it)."""
    low, high = edges.min(0).values, edges.max(0).values
    _, pair = torch.unique(torch.stack([low, high]), dim=1, return_inverse=True)
    return pair.cpu()


def graph_units(features: str, edges: str, neutral_features: Callable[[Tensor], Tensor]):
    """Units: the nodes of the row's graph (rows of ``inputs[features]`` ``[nodes, d]``), then its
    undirected edges (node pairs of ``inputs[edges]`` ``[2, E]``, both directions together). A removed
    node's features take ``neutral_features(features)``'s row; a removed edge is dropped. No unit has
    an LM position of its own (every node can reach every graph token): scores per unit must be given.
    Removing every unit is the edgeless graph of neutral features, not the adapter's neutral graph."""

    def graph(inputs: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        if features not in inputs or edges not in inputs:
            raise ValueError(
                f"input-level graph units need the graph ({features!r}, {edges!r}); these inputs have "
                f"{sorted(inputs)} (use level='embedding')"
            )
        return inputs[features], inputs[edges]

    def count(model, inputs, spans) -> int:
        x, e = graph(inputs)
        return x.shape[0] + (int(edge_pairs(e).max()) + 1 if e.shape[1] else 0)

    def apply(model, inputs, spans, keep) -> dict:
        x, e = graph(inputs)
        keep = _check_keep(keep, count(model, inputs, spans), "node or edge")
        nodes, pairs = keep[: x.shape[0]].to(x.device), keep[x.shape[0] :]
        kept_edges = pairs[edge_pairs(e)].to(e.device) if e.shape[1] else torch.zeros(0, dtype=torch.bool)
        new_x = torch.where(nodes[:, None], x, neutral_features(x))
        return {**inputs, features: new_x, edges: e[:, kept_edges]}

    return InputUnits("node or edge", count, apply, None, neutral_exact=False)


__all__ = ["InputUnits", "edge_pairs", "frame_units", "graph_units", "patch_units", "token_units"]
