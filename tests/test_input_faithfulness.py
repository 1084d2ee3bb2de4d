"""Input-level faithfulness (``faithfulness(level="input")``, ``Adapter.input_units``) on a model whose
answer is known: its output reads only one image patch and one token."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mmlens
from mmlens.core.adapter import BATCH, Adapter, Point, Site
from mmlens.core.spans import ModalitySpans, spans_from_blocks
from mmlens.core.units import graph_units, patch_units, token_units
from mmlens.metrics.desiderata import faithfulness

KEY_PATCH, KEY_TOKEN, PATCHES, TOKENS = 2, 3, 4, 6


class KeyUnits(nn.Module):
    """A 4x4 one-channel image in four 2x2 patches, then six tokens; the logit difference of class 0 over
    class 1 is (pixel sum of patch ``KEY_PATCH``) + (id of token ``KEY_TOKEN``): every other unit is inert."""

    def __init__(self):
        super().__init__()
        self.fuse, self.final_norm = nn.Identity(), nn.Identity()

    def forward(self, pixel_values, input_ids, attention_mask=None):
        patches = pixel_values.unfold(2, 2, 2).unfold(3, 2, 2).flatten(1, 3).flatten(2)  # [b, 4, 4] row-major
        image = torch.stack([patches.sum(-1), torch.zeros_like(patches.sum(-1))], -1)
        text = torch.stack([torch.zeros_like(input_ids), input_ids], -1).float()
        h = self.final_norm(self.fuse(torch.cat([image, text], 1)))  # [b, 4 + T, 2]
        key = h[:, KEY_PATCH, 0] + h[:, PATCHES + KEY_TOKEN, 1]
        return torch.stack([key, torch.zeros_like(key)], -1)


def _spans(model, inputs):
    ids = inputs["input_ids"]
    return spans_from_blocks(ids.shape[0], {"image": PATCHES, "text": ids.shape[1]}, {}, device=ids.device)


def _neutral_image(model, inputs, spans):
    return {**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])}


def _neutral_text(model, inputs, spans):
    return {**inputs, "input_ids": torch.zeros_like(inputs["input_ids"])}


def _adapter(units: bool) -> Adapter:
    return Adapter(
        name="key-units",
        architectures=("KeyUnits",),
        stacks=(),
        points=(
            Point("fusion.embeds", "fusion", None, Site("fuse"), fused_positions=True),
            Point("lm.final_norm", "lm", None, Site("final_norm"), fused_positions=True),
            Point("lm.logits", "lm", None, Site(""), axes=BATCH),
        ),
        spans=_spans,
        neutral={"image": _neutral_image, "text": _neutral_text},
        required_inputs=("pixel_values", "input_ids"),
        modality_inputs={"image": ("pixel_values",), "text": ("input_ids",)},
        readout="mean",
        index_inputs={},
        input_units={
            "image": patch_units("pixel_values", lambda model: 2, _neutral_image),
            "text": token_units("input_ids", _neutral_text),
        }
        if units
        else {},
    )


@pytest.fixture(scope="module")
def known():
    hm = mmlens.wrap(KeyUnits(), adapter=_adapter(units=True))
    x = {"pixel_values": torch.ones(1, 1, 4, 4), "input_ids": torch.tensor([[1, 2, 1, 5, 2, 1]])}
    return hm, x  # logit difference 4 (key patch) + 5 (key token) = 9


def _run(hm, x, explainer, **kw):
    kw = {"fractions": (0.0, 0.2, 0.5, 1.0), "random_draws": 4, "metric": "logit_diff", "progress": False, **kw}
    return faithfulness(hm, x, explainer, level="input", n_resamples=99, **kw)


def test_known_answer_explainer_scores_well_and_controls_worse(known):
    hm, x = known
    good, rand, inv = (_run(hm, x, e) for e in ("occlusion", "random", "inverted"))
    assert good.level == "input" and good.method == "occlusion"
    curves = good.curves.set_index(["scope", "k", "source"])
    assert curves.loc[("image", 0.2, "explanation"), "necessity_drop"] == pytest.approx(4.0)
    assert curves.loc[("text", 0.2, "explanation"), "necessity_drop"] == pytest.approx(5.0)
    # global top 20% of 10 units = the two key units: removing them drops all 9, keeping them keeps all
    assert curves.loc[("global", 0.2, "explanation"), "necessity_drop"] == pytest.approx(9.0)
    assert curves.loc[("global", 0.2, "explanation"), "sufficiency_gap"] == pytest.approx(0.0)
    assert curves.loc[("global", 0.0, "explanation"), "sufficiency_gap"] == pytest.approx(9.0)

    def area(result, scope, source="explanation", measure="auc_necessity_drop"):
        a = result.areas.set_index(["scope", "source"])
        return float(a.loc[(scope, source), measure])

    for scope in ("image", "text", "joint", "global"):
        assert area(good, scope) > area(good, scope, "random") > area(inv, scope), scope
        assert area(good, scope) >= area(rand, scope), scope  # noise may rank a key unit first by chance
        gap = "aoc_sufficiency_gap"
        assert area(good, scope, measure=gap) < area(good, scope, "random", gap) < area(inv, scope, measure=gap)


def test_removing_every_unit_is_the_neutral_reference_and_keeping_all_is_the_input(known):
    hm, x = known
    spans = hm.spans(x)
    for m, units in hm.adapter.input_units.items():
        n = units.count(hm.model, x, spans)
        removed = units.apply(hm.model, x, spans, torch.zeros(n, dtype=torch.bool))
        kept = units.apply(hm.model, x, spans, torch.ones(n, dtype=torch.bool))
        neutral = hm.neutral(x, m)
        assert all(torch.equal(removed[k], neutral[k]) for k in x), m
        assert all(torch.equal(kept[k], x[k]) for k in x), m
    one = hm.adapter.input_units["image"].apply(hm.model, x, spans, torch.tensor([True, True, False, True]))
    expected = x["pixel_values"].clone()
    expected[..., 2:4, 0:2] = 0  # patch 2: rows 2-3, columns 0-1 (row-major 2x2 grid)
    assert torch.equal(one["pixel_values"], expected)


def test_bad_level_and_missing_units_are_refused(known):
    hm, x = known
    with pytest.raises(ValueError, match=r"level must be one of \('embedding', 'input'\), got 'pixels'"):
        faithfulness(hm, x, "occlusion", level="pixels", progress=False)
    bare = mmlens.wrap(KeyUnits(), adapter=_adapter(units=False))
    with pytest.raises(ValueError, match=r"declares no input units for \['image', 'text'\].*level='embedding'"):
        faithfulness(bare, x, "occlusion", level="input", progress=False)
    with pytest.raises(ValueError, match="pass level='input'"):
        faithfulness(hm, x, "occlusion", unit_scores=[{}], progress=False)


def test_given_unit_scores_replace_the_explainer(known):
    hm, x = known
    oracle = {"image": torch.eye(PATCHES)[KEY_PATCH], "text": torch.eye(TOKENS)[KEY_TOKEN]}
    result = _run(hm, x, "occlusion", unit_scores=[oracle])
    reference = _run(hm, x, "occlusion")
    assert result.method == "unit_scores"
    mine, theirs = (r.curves[r.curves.source == "explanation"].reset_index(drop=True) for r in (result, reference))
    assert mine.equals(theirs)
    with pytest.raises(ValueError, match=r"unit_scores\['text'\] must hold 6 scores"):
        _run(hm, x, "occlusion", unit_scores=[{"image": oracle["image"]}])


def test_patch_units_refuse_when_image_positions_are_not_one_per_patch():
    units = patch_units("pixels", lambda model: 2, _neutral_image)
    spans = ModalitySpans({"image": torch.ones(1, 5, dtype=torch.bool)}, torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="5 image positions but 4 vision patches.*CLS"):
        units.positions(None, {"pixels": torch.zeros(1, 3, 4, 4)}, spans)


def test_graph_units_zero_nodes_and_drop_both_directions_of_an_edge():
    units = graph_units("x", "edges", torch.zeros_like)
    x = torch.arange(1.0, 7.0).reshape(3, 2)
    edges = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])  # pairs {0,1} and {1,2}, both directions
    inputs = {"x": x, "edges": edges}
    assert units.count(None, inputs, None) == 3 + 2 and units.positions is None and not units.neutral_exact
    out = units.apply(None, inputs, None, torch.tensor([True, False, True, False, True]))
    assert torch.equal(out["x"], torch.tensor([[1.0, 2.0], [0.0, 0.0], [5.0, 6.0]]))
    assert torch.equal(out["edges"], torch.tensor([[1, 2], [2, 1]]))
