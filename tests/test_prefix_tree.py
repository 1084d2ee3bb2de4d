"""Prefix trees of masked variants (mmlens.core.prefix_tree): node counts, paths and packing."""

from __future__ import annotations

import pytest
import torch

from mmlens.core.prefix_tree import prefix_trees


def _mask(seq: int, *positions: int) -> torch.Tensor:
    mask = torch.zeros(seq, dtype=torch.bool)
    mask[list(positions)] = True
    return mask


def test_occluding_each_of_13_positions_computes_91_nodes():
    masks = [_mask(13, p) for p in range(13)]
    ((tree, members),) = prefix_trees(masks, last=12, budget=1000)
    assert len(tree) == 13 * 14 // 2 and sorted(members) == list(range(13))
    for variant, node in zip(members, tree.readout.tolist()):
        path = tree.ancestors[node].nonzero()[:, 0]
        assert tree.positions[node] == 12  # every readout is the readout position
        assert tree.positions[path].tolist() == list(range(variant, 13))  # the path runs from the masked position
        assert tree.source[path].tolist() == [1] + [0] * (12 - variant)
        assert set(tree.branch[path].tolist()) == {variant}


def test_variants_sharing_a_masked_prefix_share_its_nodes():
    masks = [_mask(4, 0, 1), _mask(4, 0, 1, 2), _mask(4, 0)]
    ((tree, members),) = prefix_trees(masks, last=3, budget=100)
    # (0 T)(1 F)(2 F)(3 F) for [0], (1 T)(2 F)(3 F) and (2 T)(3 F) below (0 T): 4 + 3 + 2, not 12
    assert len(tree) == 9
    readouts = dict(zip(members, tree.readout.tolist()))
    assert tree.ancestors[readouts[0]].sum() == 4 and tree.ancestors[readouts[1]].sum() == 4
    shared = tree.ancestors[readouts[0]] & tree.ancestors[readouts[1]]
    assert tree.positions[shared].tolist() == [0, 1]  # the masked prefix 0, 1 is computed once
    assert (tree.ancestors & ~tree.ancestors.tril()).sum() == 0  # parents come before their children


def test_trees_respect_the_budget_and_hold_every_variant_once():
    masks = [_mask(13, p) for p in range(13)]
    trees = prefix_trees(masks, last=12, budget=20)
    assert sorted(i for _, members in trees for i in members) == list(range(13))
    assert all(len(tree) <= 20 for tree, _ in trees) and len(trees) > 1
    assert sum(len(tree) for tree, _ in trees) == 91
    alone = prefix_trees(masks[:2], last=12, budget=5)  # a variant longer than the budget gets its own tree
    assert sorted(len(tree) for tree, _ in alone) == [12, 13]


def test_a_mask_changing_nothing_up_to_the_readout_is_refused():
    with pytest.raises(ValueError, match="at or before the readout position 5"):
        prefix_trees([_mask(8, 6)], last=5, budget=10)


def test_variants_share_nodes_only_where_their_sources_agree():
    """Long masks give each position's source: two variants changing position 2 to different sources
    share no node; one that also changes position 5 shares positions 2..4 with the first."""
    a, b, c = (torch.zeros(8, dtype=torch.long) for _ in range(3))
    a[2], b[2], c[2], c[5] = 1, 2, 1, 3
    [(tree, members)] = prefix_trees([a, b, c], 7, 64)
    assert sorted(members) == [0, 1, 2]
    assert len(tree) == 6 + 6 + 3  # a: 2..7; b: 2..7 (another source at 2); c: shares 2..4 with a, then 5..7
    for variant, node in zip(members, tree.readout.tolist()):
        path = tree.ancestors[node].nonzero()[:, 0]
        want = [a, b, c][variant][2:8]
        assert tree.positions[path].tolist() == list(range(2, 8)) and tree.source[path].tolist() == want.tolist()
