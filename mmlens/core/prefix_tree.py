"""Variants of one input row as one packed sequence: a prefix tree of the positions they recompute.

A variant says, per position, which source its value comes from: 0 is the recorded row's own, any
other number another source (a baseline, a perturbed input's embedding). On a causal LM, a variant
whose first changed position is ``p`` shares every position before ``p`` with the recorded input;
two variants that agree on positions ``p..q`` also share those. A :class:`PrefixTree` holds each
distinct (position, prefix of sources) once: its nodes are the
positions the variants must recompute, and each node attends to the recorded keys and values before
its branch position and to its own ancestors (a tree-attention mask,
:meth:`mmlens.core.replay.BlockReplay.tree_logits`). Occluding each of 13 positions computes
13 + 12 + ... + 1 = 91 nodes instead of 13 x 13 = 169 batched positions; keep/remove masks that
share masked prefixes share their nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class PrefixTree:
    """Packed variants of one row (T nodes, n variants).

    Attributes:
        positions: Long[T], each node's position in the row.
        branch: Long[T], the first position of the node's path: it attends to the recorded keys and
            values of positions before it.
        ancestors: Bool[T, T], ``ancestors[t, u]``: node u lies on node t's path (t itself included).
        source: Long[T], where the node's value comes from (0: the row's own; see the module docstring).
        readout: Long[n], each variant's node at the readout position.
    """

    positions: Tensor
    branch: Tensor
    ancestors: Tensor
    source: Tensor
    readout: Tensor

    def __len__(self) -> int:
        return len(self.positions)

    def with_own_path(self, start: int, end: int) -> PrefixTree:
        """This tree with one more variant after its nodes: the row itself at positions ``start..end``
        (branching at ``start``, nothing changed), read out at ``end``. Its readout must equal the
        recorded run's, so a block that ignores the tree's mask or positions is caught."""
        n, extra = len(self), end - start + 1
        ancestors = torch.zeros(n + extra, n + extra, dtype=torch.bool)
        ancestors[:n, :n] = self.ancestors
        ancestors[n:, n:] = torch.ones(extra, extra, dtype=torch.bool).tril()
        return PrefixTree(
            torch.cat([self.positions, torch.arange(start, end + 1)]),
            torch.cat([self.branch, torch.full((extra,), start)]),
            ancestors,
            torch.cat([self.source, torch.zeros(extra, dtype=torch.long)]),
            torch.cat([self.readout, torch.tensor([n + extra - 1])]),
        )


class _Builder:
    """Nodes keyed by (parent node, source): a path starts at ``("root", first changed position)``."""

    def __init__(self) -> None:
        self.index: dict[tuple, int] = {}
        self.positions: list[int] = []
        self.branch: list[int] = []
        self.parents: list[int] = []
        self.source: list[int] = []
        self.readout: list[int] = []

    def new_nodes(self, bits: list[int], first: int) -> int:
        """How many nodes the path of ``bits`` (sources up to the readout) adds."""
        key: tuple = ("root", first)
        for q in range(first, len(bits)):
            node = self.index.get(key + (bits[q],))
            if node is None:
                return len(bits) - q
            key = (node,)
        return 0

    def add(self, bits: list[int], first: int) -> None:
        key: tuple = ("root", first)
        parent = -1
        for q in range(first, len(bits)):
            node = self.index.get(key + (bits[q],))
            if node is None:
                node = self.index[key + (bits[q],)] = len(self.positions)
                self.positions.append(q)
                self.branch.append(first)
                self.parents.append(parent)
                self.source.append(int(bits[q]))
            key, parent = (node,), node
        self.readout.append(parent)

    def tree(self) -> PrefixTree:
        n = len(self.positions)
        ancestors = np.zeros((n, n), dtype=bool)
        for t, parent in enumerate(self.parents):
            if parent >= 0:
                ancestors[t] = ancestors[parent]
            ancestors[t, t] = True
        return PrefixTree(
            torch.tensor(self.positions, dtype=torch.long),
            torch.tensor(self.branch, dtype=torch.long),
            torch.from_numpy(ancestors),
            torch.tensor(self.source, dtype=torch.long),
            torch.tensor(self.readout, dtype=torch.long),
        )


def prefix_trees(masks: Sequence[Tensor], last: int, budget: int) -> list[tuple[PrefixTree, list[int]]]:
    """Pack ``masks`` (Bool[seq]: positions that change to source 1; or Long[seq]: each position's
    source, 0 unchanged; each changes one at or before ``last``, the readout position) into trees of at most ``budget`` nodes (a variant that alone needs more gets
    its own tree). Returns each tree with the indices of the masks whose readouts it holds, in
    order; masks are grouped so that those sharing prefixes share a tree."""
    rows = [[int(b) for b in mask[: last + 1].tolist()] for mask in masks]
    if not all(any(bits) for bits in rows):
        raise ValueError(f"every mask must change a position at or before the readout position {last}")
    order = sorted(range(len(rows)), key=lambda i: rows[i])
    out: list[tuple[PrefixTree, list[int]]] = []
    builder, members = _Builder(), []
    for i in order:
        first = next(q for q, b in enumerate(rows[i]) if b)
        if members and len(builder.positions) + builder.new_nodes(rows[i], first) > budget:
            out.append((builder.tree(), members))
            builder, members = _Builder(), []
        builder.add(rows[i], first)
        members.append(i)
    if members:
        out.append((builder.tree(), members))
    return out


__all__ = ["PrefixTree", "prefix_trees"]
