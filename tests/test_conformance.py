"""Conformance: every adapter passes the same checks, the way transformers' common tests run every model.

A new adapter gets all of it by adding its registry name to ``MODELS`` (one line). Every reference
here is written by hand from public API only (``HookedModel.run`` with full-tensor
:func:`mmlens.replace` edits, ``hm.spans``, ``hm.neutral``, ``hm.rows``), never from the code path
under test: the readout position comes from the spans of the fused sequence, a patched cell is one
plain edited forward, path patching is two runs written out below.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

import mmlens
from mmlens.core.replay import BlockReplay, record_points
from mmlens.methods.explainers import EXPLAINERS, embedding_point, predicted_prob
from mmlens.methods.lens import residual_points
from mmlens.methods.patching import attribution_patch, logit_diff, path_patch, sweep
from mmlens.metrics.desiderata import faithfulness, granger, interaction, stability
from mmlens.metrics.perturb import perturb
from mmlens.runs.cli import main as cli_main

MODELS = [
    "tiny-random-gpt2",
    "tiny-random-phi3",
    "tinystories-656k",
    "tiny-random-llava",
    "tiny-random-idefics3",
    "tea-glm-tiny",
    "tiny-fusion",
    "tiny-random-qwen2-vl",
    "tiny-random-qwen2.5-vl",
    "tiny-random-gemma3",
    "tiny-random-llava-next",
    "tiny-random-llava-onevision",
    "tiny-random-smolvlm",
    "tiny-random-paligemma",
    "tiny-random-internvl",
    "tiny-random-qwen2-audio",
    "tiny-random-voxtral",
    "tiny-random-qwen2.5-omni",
    "tiny-random-mistral3",  # automatic adapter
    "tiny-random-aya-vision",  # automatic adapter
    "tiny-random-vipllava",  # automatic adapter
]
"""Registry names the suite runs on (``mmlens.load_model(name)``, inputs from ``example_inputs()``)."""

TOLERANCE = 1e-4  # replayed / batched forwards vs one plain forward per cell: float round-off only

Metric = Callable[[Tensor], Tensor]


@dataclass
class Case:
    """One model under test: the wrapped model, its example batch, row 0 of it (``clean``), a
    corruption of every modality of ``clean`` (``corrupted``) and a logit-difference metric."""

    name: str
    hm: mmlens.HookedModel
    inputs: dict
    clean: dict
    corrupted: dict
    metric: Metric


def readout(hm: mmlens.HookedModel, logits: Tensor, inputs: dict) -> Tensor:
    """Float[b, vocab]: classifier logits as they are, else each row's last real position of the
    fused sequence, read from the spans (not from any input key)."""
    if logits.dim() == 2:
        return logits
    valid = hm.spans(inputs).valid.to(logits.device)
    last = (valid.long() * torch.arange(valid.shape[1], device=logits.device)).argmax(1)
    return logits[torch.arange(logits.shape[0], device=logits.device), last]


def fires_everywhere(hm: mmlens.HookedModel, inputs: dict) -> bool:
    return set(hm.run(inputs, cache=True).cache) == set(hm.hook_points)


def corrupt_all(hm: mmlens.HookedModel, clean: dict) -> dict:
    """Every modality of ``clean`` corrupted: its neutral reference, or (when the neutral reference
    skips that modality's encoder, so its points would not fire) a strong perturbation of it."""
    x = clean
    for m in hm.spans(clean).modalities:
        neutral = hm.neutral(x, m)
        if fires_everywhere(hm, neutral):
            x = neutral
        else:
            x = perturb(hm, x, m, n=1, scale=1.0, seed=0)[0].inputs
    return x


@pytest.fixture(scope="module", params=MODELS)
def case(request, loaded) -> Case:
    lm = loaded(request.param)
    hm = mmlens.wrap(lm.model, tokenizer=lm.tokenizer, processor=lm.processor)
    inputs = lm.example_inputs()
    clean = hm.rows(inputs, 0)
    top2 = readout(hm, hm.run(clean).logits, clean)[0].topk(2).indices.tolist()
    return Case(request.param, hm, inputs, clean, corrupt_all(hm, clean), logit_diff(*top2))


def metric_of(case: Case, inputs: dict, edits: list | None = None) -> float:
    """The case's metric on one plain (optionally edited) forward, read out by :func:`readout`."""
    logits = case.hm.run(inputs, edits=edits or []).logits
    return float(case.metric(readout(case.hm, logits, inputs))[0])


# -- the forward ------------------------------------------------------------------------------------


def test_wrapped_equals_plain_and_every_point_fires(case):
    with torch.no_grad():
        out = case.hm.model(**case.inputs)
    plain = out if isinstance(out, Tensor) else out.logits
    run = case.hm.run(case.inputs, cache=True)
    assert torch.equal(run.logits, plain)
    assert set(run.cache) == set(case.hm.hook_points), "some hook points never fired"


def test_spans_cover_every_real_position_once(case):
    run = case.hm.run(case.inputs, cache="fusion.embeds" if "fusion.embeds" in case.hm.hook_points else "lm.embed")
    spans = run.spans
    covered = torch.stack([spans.masks[m].long() for m in spans.modalities]).sum(0)
    assert torch.equal(covered, spans.valid.long()), "a real position is in no span or in two"
    fused = next(iter(run.cache.values()))
    assert spans.valid.shape == fused.shape[:2], "spans must index the fused sequence"
    assert spans.valid.any(1).all()


def test_clean_into_clean_at_every_point_is_bit_exact(case):
    run = case.hm.run(case.inputs, cache=True)
    everywhere = case.hm.run(case.inputs, edits=[mmlens.replace(n, v) for n, v in run.cache.items()])
    assert torch.equal(everywhere.logits, run.logits)
    for name, value in run.cache.items():
        assert torch.equal(case.hm.run(case.inputs, edits=[mmlens.replace(name, value)]).logits, run.logits), name


def test_logit_lens_final_layer_is_the_logits(case):
    """The lens's final layer decodes to the model's own logits: at each row's readout position (the
    last real one, from the spans); for a classifier that pools positions, at each real position p,
    to the logits of the run whose final-norm output is position p's everywhere (the pool of equal
    vectors is that vector)."""
    hm, inputs = case.hm, case.inputs
    lens = mmlens.logit_lens(hm, inputs, k=3)
    run = hm.run(inputs, cache="lm.final_norm")
    spans = hm.spans(inputs)
    for row in range(spans.batch_size):
        real = spans.valid[row].nonzero()[:, 0].tolist()
        if run.logits.dim() == 3:
            checks = [(real[-1], run.logits[row, real[-1]])]
        else:
            one, normed = hm.rows(inputs, row), run.cache["lm.final_norm"][row : row + 1]
            edits = [[mmlens.replace("lm.final_norm", normed[:, p : p + 1].expand_as(normed))] for p in real]
            checks = [(p, hm.run(one, edits=e).logits[0]) for p, e in zip(real, edits)]
        for p, logits in checks:
            final = logits.float().softmax(-1).topk(3)
            assert torch.equal(lens.top_ids[-1, row, p], final.indices), (row, p)
            assert torch.allclose(lens.top_probs[-1, row, p], final.values, atol=1e-5), (row, p)
    table = lens.table()
    assert len(table) == len(lens.layers) * int(spans.valid.sum())
    assert (table.modality != "pad").all()


def test_shared_prefix_recording_equals_one_plain_forward(case):
    """Three copies of row 0 made to differ at their last two real positions (an edit before the LM):
    :func:`record_points` computes their shared positions once where the LM replays with reused keys
    and values (exactly then), and equals one plain forward of the batch at every real position."""
    hm = case.hm
    point = embedding_point(hm)
    x = hm.repeat(case.clean, 3)
    shape = hm.run(x, cache=point).cache[point].shape
    delta = torch.zeros(shape)
    last = hm.spans(x).valid[0].nonzero()[-2:, 0]
    delta[1:, last] = torch.randn(2, len(last), shape[-1], generator=torch.Generator().manual_seed(0))
    edit = mmlens.add(point, delta)
    names = residual_points(hm)
    cache, method = record_points(hm, x, names, [edit], min_prefix=1)
    replayable = BlockReplay.supports(hm)
    if replayable:
        replay = BlockReplay(hm)
        with replay.capture():
            run = hm.run(case.clean, cache=replay.final_point)
        replayable = replay.ready(run, case.clean) and replay.reuse_kv
    assert method.startswith("shared prefix") == replayable, method
    plain = hm.run(x, cache=names, edits=[edit]).cache
    valid = hm.spans(x).valid
    for name in names:
        a, b = cache[name][valid].float(), plain[name][valid].float()
        assert float((a - b).abs().max()) <= TOLERANCE * float(b.abs().max()), (name, method)


# -- activation patching ----------------------------------------------------------------------------


@dataclass
class Group:
    """One sweep of a suite: its ``hook``, the point ``names`` it covers, ``axes`` and ``layers``."""

    hook: str
    names: list[str]
    axes: tuple[str, ...]
    layers: list[int] | None


def sweep_groups(hm: mmlens.HookedModel, source: dict) -> list[Group]:
    """Every kind of point once: each block-point kind of each stack (the LM's over all its layers,
    an encoder's at its first layer: the same code path) and each single point (embeddings, fusion,
    final norm, logits); per position where the activation has a position axis, else whole; ``z``
    per (layer, head), and the LM's last-layer ``z`` per (position, head) too."""
    kinds: dict[str, list[str]] = {}
    for name, hp in hm.hook_points.items():
        kinds.setdefault(f"{hp.prefix}.{hp.kind}" if hp.layer is not None else name, []).append(name)
    shapes = {n: v.dim() for n, v in hm.run(source, cache=True).cache.items()}
    groups = []
    for hook, names in kinds.items():
        hp = hm.hook_points[names[0]]
        layers = sorted(hm.hook_points[n].layer for n in names) if hp.layer is not None else None
        if layers is not None and hp.stage == "encoder":
            layers = layers[:1]
        chosen = [n for n in names if layers is None or hm.hook_points[n].layer in layers]
        axes = (("layer",) if layers else ()) + (("position",) if shapes[names[0]] >= 3 else ())
        if hp.kind == "z":
            groups.append(Group(hook, chosen, ("layer", "head"), layers))
            if hp.prefix == "lm":
                last = [n for n in chosen if hm.hook_points[n].layer == layers[-1]]
                groups.append(Group(hook, last, ("layer", "position", "head"), layers[-1:]))
            continue
        groups.append(Group(hook, chosen, axes or ("layer",), layers))
    return groups


def hand_cells(case: Case, names: list[str], source: dict, target: dict, axes: tuple[str, ...]) -> dict:
    """{(layer, position, head): metric} with the cell patched from ``source`` into ``target`` by one
    plain forward each: a full-tensor replace that equals the target activation except at the cell."""
    src = case.hm.run(source, cache=names).cache
    tgt = case.hm.run(target, cache=names).cache
    valid = case.hm.spans(target).valid[0]
    out = {}
    for name in names:
        hp = case.hm.hook_points[name]
        s, t = src[name], tgt[name]
        if "position" in axes:
            positions = valid.nonzero()[:, 0].tolist() if hp.fused_positions else range(t.shape[1])
        else:
            positions = [None]
        for p in positions:
            for h in range(hp.heads) if "head" in axes else [None]:
                value = t.clone()
                index: tuple = (slice(None), slice(None) if p is None else p)
                index += () if h is None else (h,)
                value[index] = s[index]
                out[(hp.layer, p, h)] = metric_of(case, target, [mmlens.replace(name, value)])
    return out


@pytest.fixture(scope="module")
def references(case) -> dict:
    """The hand reference of every sweep group of the case (computed once, shared by both batch sizes)."""
    return {
        (g.hook, g.axes): hand_cells(case, g.names, case.clean, case.corrupted, g.axes)
        for g in sweep_groups(case.hm, case.clean)
    }


@pytest.mark.parametrize("batch_size", [1, 3])
def test_sweep_with_replay_equals_one_plain_forward_per_cell(case, references, batch_size):
    failures, checked, moved = [], 0, 0.0
    for g in sweep_groups(case.hm, case.clean):
        if any("batch" not in case.hm.hook_points[n].axes for n in g.names):
            # a value shared by every row ([nodes, d] of one graph): sweep refuses it, naming the fix
            # (hooked.run with edits: the hand reference's route, which ran in `references`)
            with pytest.raises(ValueError, match="no batch axis.*hooked.run"):
                sweep(case.hm, case.clean, case.corrupted, case.metric, hook=g.hook, axes=g.axes, layers=g.layers)
            continue
        fast = sweep(
            case.hm,
            case.clean,
            case.corrupted,
            case.metric,
            hook=g.hook,
            axes=g.axes,
            layers=g.layers,
            batch_size=batch_size,
            progress=False,
        )
        reference = references[(g.hook, g.axes)]
        assert len(fast.table) == len(reference), (g.hook, g.axes, len(fast.table), len(reference))
        for row in fast.table.itertuples():
            layer = int(row.layer) if g.layers else None
            position = int(row.position) if "position" in g.axes else None
            head = int(row.head) if "head" in g.axes else None
            expected = reference[(layer, position, head)]
            if not abs(row.value - expected) < TOLERANCE:
                failures.append(
                    f"{g.hook} {g.axes} ({fast.method}) cell {(layer, position, head)}: {row.value} vs {expected}"
                )
            checked += 1
        moved = max(moved, float((fast.table.value - fast.corrupted[0]).abs().max()))
    assert moved > 0, "no cell moved the metric: the corruption changes nothing"
    assert not failures, f"{case.name}, batch_size={batch_size}: {len(failures)}/{checked} cells differ:\n" + (
        "\n".join(failures[:20])
    )


def test_attribution_patch_is_exact_on_a_linear_path(case):
    """The metric is linear in lm.final_norm's output (a logit difference through the unembedding),
    so first-order attribution is exact: it equals patching each position by hand."""
    estimate = attribution_patch(
        case.hm, case.clean, case.corrupted, case.metric, hook="lm.final_norm", axes=("position",)
    )
    exact = hand_cells(case, ["lm.final_norm"], case.clean, case.corrupted, ("position",))
    assert len(estimate.table) == len(exact)
    for row in estimate.table.itertuples():
        expected = exact[(None, int(row.position), None)]
        assert abs(row.value - expected) < TOLERANCE, (row.position, row.value, expected)


# -- path patching ----------------------------------------------------------------------------------


def path_cases(hm: mmlens.HookedModel, spans) -> list[tuple[list[mmlens.Where], list[mmlens.Where]]]:
    """(senders, receivers) of every kind: attention, MLP, heads, residual, fusion and encoder points
    as senders; residual, attention, MLP, heads and the final norm as receivers."""
    layers = sorted({hp.layer for hp in hm.hook_points.values() if hp.prefix == "lm" and hp.layer is not None})
    first, last = layers[0], layers[-1]
    assert last > first, "path patching checks need an LM of two blocks or more"
    other = spans.modalities[-1]
    cases = [
        ([mmlens.Where(f"lm.blocks.{first}.attn_out")], [mmlens.Where(f"lm.blocks.{last}.resid_pre")]),
        ([mmlens.Where(f"lm.blocks.{first}.z", heads=0)], [mmlens.Where(f"lm.blocks.{last}.resid_pre")]),
        ([mmlens.Where(f"lm.blocks.{first}.mlp_out")], [mmlens.Where(f"lm.blocks.{last}.attn_out")]),
        ([mmlens.Where(f"lm.blocks.{first}.mlp_out")], [mmlens.Where(f"lm.blocks.{last}.mlp_out")]),
        ([mmlens.Where(f"lm.blocks.{first}.attn_out", at=other)], [mmlens.Where(f"lm.blocks.{last}.z", heads=1)]),
        ([mmlens.Where(f"lm.blocks.{first}.resid_mid")], [mmlens.Where(f"lm.blocks.{last}.resid_mid", at="last")]),
        (
            [mmlens.Where(f"lm.blocks.{first}.mlp_out"), mmlens.Where(f"lm.blocks.{last}.attn_out")],
            [mmlens.Where("lm.final_norm")],
        ),
    ]
    if "fusion.embeds" in hm.hook_points:
        cases.append(([mmlens.Where("fusion.embeds", at=other)], [mmlens.Where(f"lm.blocks.{last}.attn_out")]))
    encoders = [n for n, hp in hm.hook_points.items() if hp.stage == "encoder" and hp.layer is not None]
    if encoders:
        cases.append(([mmlens.Where(encoders[-1])], [mmlens.Where(f"lm.blocks.{first}.mlp_out")]))
    return cases


def select(hm: mmlens.HookedModel, where: mmlens.Where, new: Tensor, old: Tensor, spans) -> Tensor:
    """``old`` with ``new`` at ``where``'s positions (fused-sequence selectors, via the spans) and heads."""
    out = old.clone()
    positions = slice(None) if where.at is None else spans.mask(where.at)[0].nonzero()[:, 0]
    heads = slice(None) if where.heads is None else where.heads
    if where.heads is None:
        out[:, positions] = new[:, positions]
    else:
        out[:, positions, heads] = new[:, positions, heads]
    return out


def hand_path_patch(case: Case, senders: list[mmlens.Where], receivers: list[mmlens.Where]) -> float:
    """Run 1: clean with the senders corrupted and every other attention / MLP output of the LM
    that is not a receiver frozen at its clean value (a head sender's own attention output is not
    frozen: its other heads are held at clean by the sender's write); record the receivers. Run 2:
    clean with the receivers set to those values."""
    hm, spans = case.hm, case.hm.spans(case.clean)
    s_names = [s.hook for s in senders]
    r_names = [r.hook for r in receivers]
    own = {n.replace(".z", ".attn_out") for n in s_names if hm.hook_points[n].kind == "z"}
    frozen = [
        n
        for n, hp in hm.hook_points.items()
        if hp.prefix == "lm" and hp.kind in ("attn_out", "mlp_out") and n not in {*s_names, *r_names, *own}
    ]
    clean = hm.run(case.clean, cache=True).cache
    corrupt = hm.run(case.corrupted, cache=s_names).cache
    run1 = [mmlens.replace(n, clean[n]) for n in frozen]
    run1 += [mmlens.replace(s.hook, select(hm, s, corrupt[s.hook], clean[s.hook], spans)) for s in senders]
    recorded = hm.run(case.clean, edits=run1, cache=r_names).cache
    run2 = [mmlens.replace(r.hook, select(hm, r, recorded[r.hook], clean[r.hook], spans)) for r in receivers]
    return metric_of(case, case.clean, run2)


def test_path_patch_equals_the_two_run_reference(case):
    spans = case.hm.spans(case.clean)
    failures = []
    for senders, receivers in path_cases(case.hm, spans):
        got = path_patch(case.hm, case.clean, case.corrupted, case.metric, senders, receivers)
        expected = hand_path_patch(case, senders, receivers)
        if not abs(got - expected) < TOLERANCE:
            failures.append(f"{[str(s) for s in senders]} -> {[str(r) for r in receivers]}: {got} vs {expected}")
    assert not failures, f"{case.name}:\n" + "\n".join(failures)


# -- explainers and desiderata ----------------------------------------------------------------------

FAST_OPTIONS = {"integrated_gradients": {"steps": 4, "on_failure": "record"}}
"""IG records (rather than raises) an unconverged guard here; the guard's outcome is then checked to be
reported (test_explainers checks that it refines and refuses)."""


@pytest.mark.parametrize("method", sorted(EXPLAINERS))
def test_explain_shares_sum_to_one(case, method):
    explanation = mmlens.explain(case.hm, case.clean, method, **FAST_OPTIONS.get(method, {}))
    shares = explanation.importance()
    total = sum(shares.values())
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5), (method, shares)
    real = case.hm.spans(case.clean).valid
    assert not explanation.scores[real].isnan().any() and explanation.scores[~real].isnan().all()
    if method == "integrated_gradients":
        converged, error = explanation.info["converged"][0], explanation.info["completeness_error"][0]
        assert converged == (error <= explanation.info["allowed_error"][0]), "the guard's outcome is reported"


def test_occlusion_equals_a_hand_computation(case):
    """Occlusion of each position: the metric's drop when that position's LM-input embedding takes its
    modality's neutral reference embedding, one plain forward per position."""
    hm, clean = case.hm, case.clean
    point = "fusion.embeds" if "fusion.embeds" in hm.hook_points else "lm.embed"
    explanation = mmlens.explain(hm, clean, "occlusion")
    packed = mmlens.explain(hm, clean, "occlusion", pack=True)
    forwards = packed.info["forwards"][0]  # every LM that reuses keys/values can pack variants as a prefix tree
    assert forwards.startswith("replay + kv") == (forwards == "replay + kv, prefix tree"), forwards
    metric = predicted_prob(hm, clean)
    embeds = hm.run(clean, cache=point).cache[point]
    value = float(metric(readout(hm, hm.run(clean).logits, clean))[0])
    spans = hm.spans(clean)
    for m in spans.modalities:
        reference = hm.run(hm.neutral(clean, m), cache=point).cache[point]
        for p in spans.masks[m][0].nonzero()[:, 0].tolist():
            occluded = embeds.clone()
            occluded[:, p] = reference[:, p]
            logits = hm.run(clean, edits=[mmlens.replace(point, occluded)]).logits
            expected = value - float(metric(readout(hm, logits, clean))[0])
            for got in (float(explanation.scores[0, p]), float(packed.scores[0, p])):
                assert abs(got - expected) < 1e-5, (m, p, got, expected)


def test_batched_setups_equal_one_row_setups(case):
    """``prepare_rows`` (one batched forward, the recording cut per row) equals ``prepare`` of each row:
    embeddings, logits and values within relative 1e-4, the same replay, and occlusion values from the
    cut recordings within 1e-5 of those from each row's own."""
    from mmlens.methods.setups import BATCHED_SETUPS_AGREE, prepare, prepare_rows
    from mmlens.methods.variants import masked_values

    hm, rows = case.hm, [case.clean, case.corrupted, case.clean]
    try:  # rows join when they share their layout and shared inputs (not so for a graph's neutral)
        joined = hm.spans(case.corrupted).same_layout(hm.spans(case.clean)) and bool(hm.join(rows))
    except ValueError:
        joined = False
    setups = prepare_rows(hm, rows, None, "joint")
    assert BATCHED_SETUPS_AGREE.get(hm.model) is True or not joined  # joined rows: batched, and checked
    for row, got in zip(rows, setups):
        want = prepare(hm, row, None, "joint")
        for a, b in ((got.embeds, want.embeds), (got.logits, want.logits), (got.value, want.value)):
            assert float((a - b).abs().max()) <= 1e-4 * float(b.abs().max()) + 1e-6
        assert (got.replay is None) == (want.replay is None)
        if got.replay is not None:
            assert got.replay.method == want.replay.method
        positions = want.explained[0].nonzero()[:, 0].tolist()[:6]
        masks = [
            torch.zeros(want.explained.shape[1], dtype=torch.bool).index_fill(0, torch.tensor([p]), True)
            for p in positions
        ]
        torch.testing.assert_close(
            masked_values(hm, row, got, masks), masked_values(hm, row, want, masks), rtol=0, atol=1e-5
        )


def test_rebased_draws_equal_their_own_setups(case):
    """``rebased_setups`` (a row that differs only in its LM-input embeddings, as a variant of another
    row's recording) equals ``prepare`` of that row: embeddings, logits and values within relative
    1e-4, and its occlusion, explained together with the recorded row's, within 1e-5 of its own.
    Where it refuses, it says why, and the reason holds (e.g. Qwen2.5-Omni's rotary tables depend on
    the content)."""
    from mmlens.methods.explainers import CannotRebase, explain_row, explain_rows, prepare, rebased_setups

    hm, clean, draw = case.hm, hm_row(case.hm, case.clean), hm_row(case.hm, case.corrupted)
    setup = prepare(hm, clean, None, "joint")
    try:
        rebased = rebased_setups(hm, setup, [draw])
    except CannotRebase as err:
        why = str(err)
        if why.startswith("a row's first LM block call differs"):
            hidden, call = setup.replay.first_block_call(draw)
            assert not setup.replay.matches_first_call(hidden, call)
        else:
            kv = setup.replay is not None and setup.replay.reuse_kv
            assert not kv or not hm.spans(draw).same_layout(setup.spans), why
        return
    want = prepare(hm, draw, setup.metric, "joint")
    got = rebased[0]
    for a, b in (
        (got.embeds, want.embeds),
        (got.logits, want.logits),
        (got.value, want.value),
        (got.baseline, want.baseline),
    ):
        assert float((a - b).abs().max()) <= 1e-4 * float(b.abs().max()) + 1e-6
    together = explain_rows(hm, [setup, got], [clean, draw], "occlusion", "joint", {})
    alone = explain_row(hm, want, draw, "occlusion", "joint", {})
    torch.testing.assert_close(together[1].scores, alone.scores, rtol=0, atol=1e-5, equal_nan=True)


def hm_row(hm, inputs):
    """The first row of ``inputs``."""
    return hm.rows(inputs, 0)


def finite(frame) -> bool:
    numbers = frame.select_dtypes("number")
    return bool(numbers.notna().to_numpy().all() and (numbers.abs() < math.inf).to_numpy().all())


def test_desiderata_run_and_are_finite(case):
    hm, clean = case.hm, case.clean
    options = {"options": {"integrated_gradients": {"steps": 4, "on_failure": "record"}}, "progress": False}
    g = granger(hm, clean, ["occlusion", "integrated_gradients"], **options)
    assert len(g.influence) and finite(g.influence)
    f = faithfulness(hm, clean, "occlusion", fractions=(0.0, 0.5, 1.0), random_draws=1, progress=False)
    assert len(f.curves) and finite(f.curves) and finite(f.areas)
    s = stability(hm, clean, ["occlusion"], n=1, progress=False)
    kept = s.samples[s.samples.kept] if len(s.samples) else s.samples
    assert finite(kept.drop(columns=["ratio", "epsilon"], errors="ignore")), s.samples
    if "epsilon" in kept.columns:  # the embedding-ball draws' radius; not defined for input-space draws
        assert kept.epsilon.notna().eq(kept.source.eq("embedding")).all(), kept
    modalities = hm.spans(case.inputs).modalities
    if len(modalities) == 2:
        result = interaction(hm, case.inputs, progress=False)
        assert finite(result.per_input) and math.isfinite(result.mean_interaction)
    else:
        with pytest.raises(ValueError, match="two modalities"):
            interaction(hm, case.inputs, progress=False)


def test_input_level_faithfulness_or_a_clear_refusal(case):
    """Adapters that declare input units for every modality: keeping every unit is the input, removing
    every unit is the modality's neutral reference (where the adapter says so; else only the modality's
    inputs change), and faithfulness(level="input")'s remove-all cell equals one plain forward of that
    input. Adapters that do not: faithfulness(level="input") refuses, naming the missing modalities."""
    hm, clean = case.hm, case.clean
    spans, table = hm.spans(clean), hm.adapter.input_units
    kw = {"fractions": (0.0, 1.0), "random_draws": 1, "level": "input", "n_resamples": 9, "progress": False}
    if not all(m in table for m in spans.modalities):
        with pytest.raises(ValueError, match="declares no input units"):
            faithfulness(hm, clean, "occlusion", **kw)
        return
    logits = readout(hm, hm.run(clean).logits, clean)
    target = int(logits[0].argmax())
    removed_all, scores = {}, {}
    for m in spans.modalities:
        units = table[m]
        n = units.count(hm.model, clean, spans)
        kept = units.apply(hm.model, clean, spans, torch.ones(n, dtype=torch.bool))
        assert all(torch.equal(kept[k], v) for k, v in clean.items() if isinstance(v, Tensor)), m
        removed_all[m] = units.apply(hm.model, clean, spans, torch.zeros(n, dtype=torch.bool))
        changed = {k for k, v in clean.items() if isinstance(v, Tensor) and not torch.equal(removed_all[m][k], v)}
        assert changed and changed <= set(hm.adapter.modality_inputs[m]), (m, changed)
        if units.neutral_exact:
            neutral = hm.neutral(clean, m)
            assert all(torch.equal(removed_all[m][k], neutral[k]) for k in neutral), m
        scores[m] = torch.randn(n, generator=torch.Generator().manual_seed(0))
    needs_scores = any(table[m].positions is None for m in spans.modalities)
    if needs_scores:
        with pytest.raises(ValueError, match="pass unit_scores"):
            faithfulness(hm, clean, "occlusion", **kw)
    result = faithfulness(hm, clean, "occlusion", unit_scores=[scores] if needs_scores else None, **kw)
    assert result.level == "input" and finite(result.curves) and finite(result.areas)
    curves = result.curves.set_index(["scope", "k", "source"])
    for m in spans.modalities:
        by_hand = readout(hm, hm.run(removed_all[m]).logits, removed_all[m]).float().softmax(-1)[0, target]
        assert abs(curves.loc[(m, 1.0, "explanation"), "f_remove"] - float(by_hand)) < 1e-5, m


# -- the command line -------------------------------------------------------------------------------


def test_cli_hooks_json_lists_stages_and_encoder_modalities(case):
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli_main(["hooks", case.name, "--json"]) == 0
    rows = json.loads(out.getvalue())
    assert {r["name"] for r in rows} == set(case.hm.hook_points)
    assert all(r["shape"] for r in rows), "every hook point has a measured shape"
    stages = {r["stage"] for r in rows}
    modalities = set(case.hm.spans(case.inputs).modalities)
    assert {r["modality"] for r in rows if r["stage"] == "lm"} == {"fused"}
    if modalities == {"text"}:
        assert stages == {"lm"}
        return
    assert stages == {"encoder", "fusion", "lm"}
    encoders = {r["modality"] for r in rows if r["stage"] == "encoder"}
    assert modalities - {"text"} <= encoders <= modalities, (encoders, modalities)
    assert {r["modality"] for r in rows if r["stage"] == "fusion"} <= modalities | {"fused"}
