"""The wrap-time self-check: does an adapter table describe the model it wraps?

A wrong table (a post-norm block under a pre-norm :class:`BlockLayout`, a ``Site`` on the wrong
value, a bidirectional model declared causal) hooks without error and then returns wrong numbers.
:func:`check_adapter` runs the wrapped model on a tiny probe input (the adapter's
:meth:`Adapter.probe_inputs`) and checks, at one layer per kind of point per stack and at every
single point the probe reaches:

1. ``plain``: a run with every point cached and no edit equals the plain forward bit for bit;
2. ``clean``: writing each recorded activation back (clean-into-clean) reproduces it bit for bit;
3. ``residual``: in a block with a layout, ``resid_pre + attn_out == resid_mid`` and
   ``resid_mid + mlp_out == resid_post``, and adding one delta at ``attn_out`` (``mlp_out``) has the
   same effect on the output as adding it at ``resid_mid`` (``resid_post``);
4. ``causal``: when the adapter says ``causal``, a change to the input embedding at a position
   (the last one, and the last position of each non-text span) leaves every earlier output alone.

The verdict is cached per (model class, adapter object), so a class is probed once per process.
A failure raises :class:`AdapterCheckError` naming the check, the point, the largest difference and
the fix; ``HookedModel(model, check=False)`` skips the check.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from mmlens.core.adapter import Adapter, HookPoint
from mmlens.core.edits import add, apply, replace
from mmlens.core.plan import RunResult

RESIDUAL_TOLERANCE = 1e-4
"""Largest |difference| allowed in the residual and causality checks, relative to the largest
|activation| involved (float rounding of the same sums taken in another order), in float32; lower
precisions get 8 of their machine epsilons (:func:`tolerance`)."""


def tolerance(value: Tensor) -> float:
    """The relative tolerance for ``value``'s dtype: :data:`RESIDUAL_TOLERANCE`, or 8 machine epsilons
    of a coarser float type (bfloat16: 0.06)."""
    eps = torch.finfo(value.dtype).eps if value.is_floating_point() else 0.0
    return max(RESIDUAL_TOLERANCE, 8 * eps)


SKIP_HINT = "(to wrap anyway, at your own risk: HookedModel(model, check=False) / mmlens.wrap(model, check=False))"


class AdapterCheckError(ValueError):
    """The adapter does not reproduce the model at ``point`` (``check`` is which check failed)."""

    def __init__(self, message: str, check: str, point: str | None, difference: float):
        super().__init__(message)
        self.check, self.point, self.difference = check, point, difference


@dataclass(frozen=True)
class CheckReport:
    """What the self-check did.

    Attributes:
        adapter / model_class: what was checked.
        points: the hook points checked (clean-into-clean), in flow order.
        unreached: hook points whose kind the probe did not reach (e.g. an encoder a text-only probe skips).
        causal_positions: fused positions whose input change was shown not to reach earlier positions.
        skipped: why nothing was checked (no probe input), else None.
        seconds: wall time of the check.
    """

    adapter: str
    model_class: str
    points: tuple[str, ...] = ()
    unreached: tuple[str, ...] = ()
    causal_positions: tuple[int, ...] = ()
    skipped: str | None = None
    seconds: float = 0.0


class Runnable(Protocol):
    """What the check reads from the wrapped model (a :class:`mmlens.HookedModel`)."""

    model: nn.Module
    adapter: Adapter
    hook_points: Mapping[str, HookPoint]

    def run(self, inputs: Mapping[str, Any], **kwargs: Any) -> RunResult: ...

    def check_inputs(self, inputs: Any) -> dict: ...


_VERDICTS: dict[tuple[type, int], tuple[Adapter, CheckReport | AdapterCheckError]] = {}


def check_adapter(hm: Runnable, probe: Mapping[str, Any] | None = None) -> CheckReport:
    """Self-check ``hm.adapter`` on ``hm.model`` (cached per model class and adapter object).

    Args:
        probe: inputs to check on; default: ``hm.adapter.probe_inputs(hm.model)``.
    Raises:
        AdapterCheckError: naming the check and point that do not reproduce.
    """
    key = (type(hm.model), id(hm.adapter))
    if key in _VERDICTS:
        verdict = _VERDICTS[key][1]
        if isinstance(verdict, AdapterCheckError):
            raise verdict
        return verdict
    try:
        verdict = _check(hm, probe)
    except AdapterCheckError as err:
        _VERDICTS[key] = (hm.adapter, err)
        raise
    _VERDICTS[key] = (hm.adapter, verdict)  # the adapter is kept so its id is never reused
    return verdict


def forget_verdicts() -> None:
    """Drop every cached verdict (the next wrap of each class checks again)."""
    _VERDICTS.clear()


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off for the check; every module's training flag restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


def _check(hm: Runnable, probe: Mapping[str, Any] | None) -> CheckReport:
    start = time.perf_counter()
    names = {"adapter": hm.adapter.name, "model_class": type(hm.model).__name__}
    inputs = probe if probe is not None else hm.adapter.probe_inputs(hm.model)
    if inputs is None:
        return CheckReport(**names, skipped="no probe input: set Adapter.probe or pass HookedModel(..., check=inputs)")
    inputs = hm.check_inputs(inputs)
    with _eval_mode(hm.model), torch.no_grad():
        clean = _check_plain(hm, inputs)
        chosen = _representatives(hm, clean)
        _check_clean(hm, inputs, clean, chosen)
        _check_residual(hm, inputs, clean)
        positions = _check_causal(hm, inputs, clean) if hm.adapter.causal else ()
    unreached = tuple(sorted({_kind_key(hm.hook_points[n]) for n in hm.hook_points if n not in clean.cache}))
    return CheckReport(
        **names,
        points=tuple(chosen),
        unreached=unreached,
        causal_positions=positions,
        seconds=time.perf_counter() - start,
    )


def _fail(hm: Runnable, check: str, point: str | None, difference: float, what: str, fix: str) -> AdapterCheckError:
    where = f" at {point!r}" if point else ""
    return AdapterCheckError(
        f"adapter {hm.adapter.name!r} does not reproduce {type(hm.model).__name__}{where} ({check} check): {what} "
        f"(max |difference| = {difference:.3g}). Fix: {fix} {SKIP_HINT}",
        check,
        point,
        difference,
    )


def _max_diff(a: Tensor, b: Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def _check_plain(hm: Runnable, inputs: dict) -> RunResult:
    """The wrapped run with every point cached == the plain forward, bit for bit."""
    output = hm.model(**inputs)
    plain = output if isinstance(output, Tensor) else output.logits
    clean = hm.run(inputs, cache=True)
    if not torch.equal(clean.logits, plain):
        raise _fail(
            hm,
            "plain",
            None,
            _max_diff(clean.logits, plain),
            "caching every hook point with no edit changed the output",
            "a Site's hook changed a value it should only read; check each Site's module, io and index",
        )
    return clean


def _kind_key(hp: HookPoint) -> str:
    return f"{hp.prefix}.blocks.*.{hp.kind}" if hp.layer is not None else hp.name


def _representatives(hm: Runnable, clean: RunResult) -> list[str]:
    """One reached point per (stack, kind): the first layer's; every reached single point."""
    chosen: dict[str, str] = {}
    for name, hp in hm.hook_points.items():
        if name in clean.cache:
            chosen.setdefault(_kind_key(hp), name)
    return list(chosen.values())


def _check_clean(hm: Runnable, inputs: dict, clean: RunResult, chosen: list[str]) -> None:
    """Clean-into-clean at every chosen point at once reproduces the output bit for bit.

    Each point records the value it sees before writing its clean value back, so a wrong write is
    seen downstream even when a later point overwrites it; on a mismatch, the points that ran before
    the first divergence are rerun one at a time, nearest first, to name the one that is wrong."""
    order: list[str] = []
    seen: dict[str, bool] = {}

    def write_back(name: str):
        def fn(act: Tensor, ctx: Any) -> Tensor:
            order.append(name)
            seen[name] = torch.equal(act, clean.cache[name])
            return clean.cache[name]

        return fn

    logits = hm.run(inputs, edits=[apply(n, write_back(n)) for n in chosen]).logits
    if torch.equal(logits, clean.logits) and all(seen.values()):
        return
    first = next((i for i, n in enumerate(order) if not seen[n]), len(order))
    for name in reversed(list(dict.fromkeys(order[: first + 1]))):
        single = hm.run(inputs, edits=[replace(name, clean.cache[name])]).logits
        if not torch.equal(single, clean.logits):
            raise _fail(
                hm,
                "clean",
                name,
                _max_diff(single, clean.logits),
                "writing the recorded activation back changed the output",
                _clean_fix(hm.hook_points[name]),
            )
    raise _fail(
        hm,
        "clean",
        ", ".join(chosen),
        _max_diff(logits, clean.logits),
        "writing every recorded activation back at once changed the output, though each alone does not",
        "check the Sites of these points for values shared between them",
    )


def _clean_fix(hp: HookPoint) -> str:
    site = f"Site({hp.site.module!r}, {hp.site.io!r}, index={hp.site.index}, kwarg={hp.site.kwarg!r})"
    if hp.kind == "resid_mid":
        return (
            f"the block {hp.block!r} is not of the form mid = x + attn(...); out = mid + mlp(norm_mid(mid)) that "
            "its stack's BlockLayout declares (post-norm blocks such as Gemma's need their own layout); fix the "
            "stack's layout, or set layout=None (only .out points)"
        )
    return f"{hp.name!r} is read at {site}, which is not the value the model goes on to use; point it at that value"


def _first_blocks(hm: Runnable) -> list[str]:
    """``{prefix}.blocks.{i}`` of the first block with a layout in each stack."""
    bases: dict[str, str] = {}
    for name, hp in hm.hook_points.items():
        if hp.kind == "resid_mid":
            bases.setdefault(hp.prefix, name.rsplit(".", 1)[0])
    return list(bases.values())


def _check_residual(hm: Runnable, inputs: dict, clean: RunResult) -> None:
    """In the first block of each stack with a layout: the residual identities on the clean run, then
    the same delta added at attn_out/mlp_out vs at resid_mid/resid_post has the same effect."""
    cache = clean.cache
    blocks = []
    for base in _first_blocks(hm):
        names = {k: f"{base}.{k}" for k in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")}
        if not all(n in cache for n in names.values()):
            continue
        for total, parts in (("resid_mid", ("resid_pre", "attn_out")), ("resid_post", ("resid_mid", "mlp_out"))):
            _residual_identity(hm, names[total], cache[names[total]], cache[names[parts[0]]] + cache[names[parts[1]]])
        blocks.append(names)
    if blocks:
        _same_effect(hm, inputs, clean, blocks)


def _residual_identity(hm: Runnable, name: str, observed: Tensor, expected: Tensor) -> None:
    diff = _max_diff(observed, expected)
    if diff > tolerance(observed) * max(1.0, observed.abs().max().item()):
        hp = hm.hook_points[name]
        raise _fail(
            hm,
            "residual",
            name,
            diff,
            f"{name} is not the sum of the block's residual input and branch output",
            f"the block {hp.block!r} does not compute mid = x + attn(...); out = mid + mlp(norm_mid(mid)) with the "
            "modules its stack's BlockLayout names; fix the layout (post-norm blocks need their own) or set "
            "layout=None",
        )


def _same_effect(hm: Runnable, inputs: dict, clean: RunResult, blocks: list[dict[str, str]]) -> None:
    """A delta added at a branch output and at the residual it feeds must change the output alike
    (all blocks and both branches in one pair of runs; on a mismatch, one pair at a time)."""
    generator = torch.Generator().manual_seed(0)
    pairs = []
    for names in blocks:
        for branch, resid in (("attn_out", "resid_mid"), ("mlp_out", "resid_post")):
            act = clean.cache[names[resid]]
            noise = torch.randn(act.shape, generator=generator)
            pairs.append((names[branch], names[resid], (0.1 * act.float().std() * noise).to(act)))
    if _mismatch(hm, inputs, clean, pairs) is None:
        return
    for branch, resid, delta in pairs:
        diff = _mismatch(hm, inputs, clean, [(branch, resid, delta)])
        if diff is not None:
            raise _fail(
                hm,
                "residual",
                resid,
                diff,
                f"adding the same delta at {branch} and at {resid} changed the output differently",
                f"writes at {resid.rsplit('.', 1)[1]} must reach the block output as the branch's output does; fix "
                "the stack's BlockLayout (norm_mid must be the norm the MLP reads, mlp the branch added to the "
                "residual)",
            )
    raise _fail(
        hm,
        "residual",
        ", ".join(r for _, r, _ in pairs),
        0.0,
        "deltas added at branch outputs and at residuals changed the output differently together",
        "check the stacks' BlockLayouts",
    )


def _mismatch(hm: Runnable, inputs: dict, clean: RunResult, pairs: list[tuple[str, str, Tensor]]) -> float | None:
    """The max |difference| of the outputs with the deltas added at the branches vs at the residuals,
    or None when it is within float rounding of the effect."""
    via_branch = hm.run(inputs, edits=[add(b, d) for b, _, d in pairs]).logits
    via_resid = hm.run(inputs, edits=[add(r, d) for _, r, d in pairs]).logits
    diff = _max_diff(via_branch, via_resid)
    rel = tolerance(clean.logits)
    allowed = rel * max(1.0, clean.logits.abs().max().item()) + max(1e-3, rel) * _max_diff(via_resid, clean.logits)
    return diff if diff > allowed else None


def _embedding_point(hm: Runnable, clean: RunResult) -> str | None:
    """The point whose value is the LM's input sequence: fused embeddings, else token embeddings."""
    for name in ("fusion.embeds", "lm.embed"):
        hp = hm.hook_points.get(name)
        if hp is not None and hp.fused_positions and name in clean.cache:
            return name
    return None


def _probe_positions(clean: RunResult, seq: int) -> list[int]:
    """The last position, and the last position of each non-text span of row 0."""
    positions = {seq - 1}
    if clean.spans is not None:
        for modality, mask in clean.spans.masks.items():
            where = mask[0].nonzero()
            if modality != "text" and len(where):
                positions.add(int(where[-1]))
    return sorted(p for p in positions if p > 0)


def _check_causal(hm: Runnable, inputs: dict, clean: RunResult) -> tuple[int, ...]:
    """A change of the input embedding at position p leaves the outputs at positions < p alone."""
    name = _embedding_point(hm, clean)
    if name is None or clean.logits.dim() != 3:
        return ()
    act = clean.cache[name]
    if act.dim() != 3 or act.shape[1] != clean.logits.shape[1]:
        return ()
    positions = _probe_positions(clean, act.shape[1])
    for p in positions:
        delta = torch.zeros_like(act)
        noise = torch.randn(act[:, p].shape, generator=torch.Generator().manual_seed(p))
        delta[:, p] = (act.float().std().clamp_min(1e-3) * noise).to(act.dtype).to(act.device)
        logits = hm.run(inputs, edits=[add(name, delta)]).logits
        diff = _max_diff(logits[:, :p], clean.logits[:, :p])
        if diff > tolerance(clean.logits) * max(1.0, clean.logits.abs().max().item()):
            raise _fail(
                hm,
                "causal",
                name,
                diff,
                f"the adapter says causal=True, but changing the input at position {p} changed the output at "
                "earlier positions (some positions attend to later ones: bidirectional image tokens, a prefix-LM)",
                "set causal=False in the adapter (replay then recomputes every position instead of reusing keys "
                "and values)",
            )
    return tuple(positions)
