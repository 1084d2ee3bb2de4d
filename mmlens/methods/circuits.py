"""Circuits: sets of components, and the "keep" / "remove" interventions on them.

A :class:`Circuit` is a tuple of :class:`Node` s (a hook point, optionally restricted to positions
and heads) plus, optionally, the edges it was found from. Two interventions test it:

- ``keep`` (sufficiency): ablate every component of the *universe* (:func:`components`: one node
  per layer and kind, or per head for ``z``) that the circuit does not contain. A circuit node
  with ``at`` set keeps only those positions; the component's other positions are ablated.
- ``remove`` (necessity): ablate exactly the circuit's nodes.

Ablated entries take a value from an ablation (:data:`ABLATIONS`): ``"zero"``, ``"mean"`` (over a
reference batch), ``"resample"`` (a reference input of the same layout) or ``"neutral"`` (the run
on the adapter's neutral reference of one or every modality). Values come from one cached run of
the reference and are written with :func:`mmlens.replace` edits, so ablated entries are copied
bit for bit and everything else is the plain run's.

Example::

    circuit = Circuit.from_sweep(sweep(hm, clean, corrupted, "kl", hook="z", axes=("layer", "head")), k=3)
    kept = intervene(hm, clean, circuit, "keep", "resample", reference=corrupted)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmlens.core.adapter import HookPoint
from mmlens.core.edits import Edit, Where, replace
from mmlens.core.names import nearest_names
from mmlens.core.spans import ModalitySpans
from mmlens.core.wrapper import CacheFilter, HookedModel, RunResult
from mmlens.methods.patching import Corruption, EdgeScores, SweepResult
from mmlens.store import atomic_write

MODES = ("keep", "remove")
ABLATIONS = ("zero", "mean", "resample", "neutral")
PSEUDO_NODES = ("lm.blocks.0.resid_pre", "lm.final_norm")
"""The input and logits pseudo-nodes of :func:`mmlens.edge_attribution_patch`: edge endpoints, never circuit nodes."""
FORMAT = "mmlens.circuit"
FORMAT_VERSION = 1

Position = str | tuple[int, ...] | None
Reference = Mapping[str, Any] | Corruption


def _int_tuple(value: Any, field: str) -> tuple[int, ...] | None:
    """``value`` (None, an int, or a sequence of ints) as a tuple of ints."""
    if value is None:
        return None
    items = [value] if isinstance(value, int) else list(value) if isinstance(value, (list, tuple)) else None
    if items is None or any(isinstance(i, bool) or not isinstance(i, int) for i in items):
        raise TypeError(f"Node.{field} must be None, an int or a sequence of ints, got {value!r}")
    if not items:
        raise ValueError(f"Node.{field} is empty; use None for all {field}")
    return tuple(items)


@dataclass(frozen=True)
class Node(Where):
    """One circuit component: a :class:`~mmlens.core.edits.Where` in a JSON-friendly form.

    Attributes:
        hook: full hook point name (``"lm.blocks.3.attn_out"``, ``"lm.blocks.3.z"``).
        at: ``None`` (all positions), a span name (``"image"``, ``"last"``; points on the fused
            sequence only) or a tuple of positions.
        heads: ``None`` (all) or a tuple of head indices (per-head ``z`` points only).
    """

    hook: str
    at: Position = None
    heads: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.hook, str) or not self.hook:
            raise TypeError(f"Node.hook must be a hook point name, got {self.hook!r}")
        if not isinstance(self.at, str):
            object.__setattr__(self, "at", _int_tuple(self.at, "at"))
        object.__setattr__(self, "heads", _int_tuple(self.heads, "heads"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: ``{"hook": str, "at": None | str | [int], "heads": None | [int]}``."""
        return {
            "hook": self.hook,
            "at": list(self.at) if isinstance(self.at, tuple) else self.at,
            "heads": list(self.heads) if self.heads is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Node:
        unknown = set(data) - {"hook", "at", "heads"}
        if unknown:
            raise ValueError(f"unknown node fields {sorted(unknown)}; a node has hook, at, heads")
        return cls(data["hook"], data.get("at"), data.get("heads"))


@dataclass
class Circuit:
    """A set of components.

    Attributes:
        nodes: the components the interventions act on.
        edges: (sender, receiver) hook names, as in :class:`mmlens.EdgeScores`; stored and
            serialized. When ``nodes`` is empty, the interventions use the edges' endpoints
            (except :data:`PSEUDO_NODES`) as whole-component nodes (:attr:`effective_nodes`).
        name, description: free text.
    """

    nodes: tuple[Node, ...] = ()
    edges: tuple[tuple[str, str], ...] = ()
    name: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        self.nodes = tuple(self.nodes)
        bad = [n for n in self.nodes if not isinstance(n, Node)]
        if bad:
            raise TypeError(f"Circuit.nodes must be Node objects, got {bad[:3]!r}")
        self.edges = tuple((str(s), str(r)) for s, r in self.edges)

    @property
    def effective_nodes(self) -> tuple[Node, ...]:
        """``nodes``, or the edges' endpoints (minus :data:`PSEUDO_NODES`) when there are none."""
        if self.nodes:
            return self.nodes
        hooks = dict.fromkeys(h for edge in self.edges for h in edge if h not in PSEUDO_NODES)
        return tuple(Node(h) for h in hooks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "name": self.name,
            "description": self.description,
            "nodes": [n.to_dict() for n in self.nodes],
            "edges": [list(e) for e in self.edges],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Circuit:
        if data.get("format") != FORMAT or not isinstance(data.get("version"), int):
            raise ValueError(
                f"not a circuit: expected format {FORMAT!r} with an integer version, "
                f"got format={data.get('format')!r}, version={data.get('version')!r}"
            )
        if data["version"] > FORMAT_VERSION:
            raise ValueError(
                f"circuit format version {data['version']} is newer than this mmlens reads "
                f"({FORMAT_VERSION}); upgrade mmlens"
            )
        return cls(
            nodes=tuple(Node.from_dict(n) for n in data.get("nodes", ())),
            edges=tuple(tuple(e) for e in data.get("edges", ())),
            name=data.get("name", ""),
            description=data.get("description", ""),
        )

    def save(self, path: str | Path) -> Path:
        """Write the circuit as JSON (see :meth:`to_dict`); returns the path."""
        path = Path(path)
        atomic_write(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Circuit:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_sweep(cls, result: SweepResult, k: int, value: str = "normalized", pair: int = 0) -> Circuit:
        """The ``k`` cells of one pair with the largest ``|value|`` (NaN cells skipped) as nodes.

        The hook is ``result.hook`` at the cell's layer (a short name such as ``"z"`` becomes
        ``"lm.blocks.{layer}.z"``), ``at`` the cell's position (as a 1-tuple) or span, ``heads`` its head.
        """
        table = result.table
        if value not in table.columns:
            raise KeyError(f"the sweep table has no column {value!r}; columns: {list(table.columns)}")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        sub = table[table.pair == pair]
        if sub.empty:
            raise ValueError(f"pair {pair} is not in the sweep; pairs: {sorted(set(table.pair))}")
        sub = sub.dropna(subset=[value])
        top = sub.loc[sub[value].abs().sort_values(ascending=False, kind="stable").index].head(k)
        nodes = tuple(_sweep_node(result.hook, row) for row in top.to_dict("records"))
        return cls(
            nodes=nodes,
            name=f"top {k} {result.hook}",
            description=f"the {len(nodes)} cells of a {result.direction} sweep over {result.hook} x "
            f"{'/'.join(result.axes)} with the largest |{value}| (pair {pair})",
        )

    @classmethod
    def from_edges(cls, scores: EdgeScores, k: int, pair: int = 0) -> Circuit:
        """The ``k`` edges of one pair with the largest ``|score|`` (summed over spans when the scores
        are split by span); the nodes are their endpoints except :data:`PSEUDO_NODES`."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        sub = scores.table[scores.table.pair == pair]
        if sub.empty:
            raise ValueError(f"pair {pair} is not in the edge scores; pairs: {sorted(set(scores.table.pair))}")
        summed = sub.groupby(["sender", "receiver"], sort=False).score.sum()
        top = summed.loc[summed.abs().sort_values(ascending=False, kind="stable").index].head(k)
        edges = tuple(top.index)
        hooks = dict.fromkeys(h for edge in edges for h in edge if h not in PSEUDO_NODES)
        return cls(
            nodes=tuple(Node(h) for h in hooks),
            edges=edges,
            name=f"top {k} edges",
            description=f"the {len(edges)} edges with the largest |score| (pair {pair})",
        )


def _sweep_node(hook: str, row: Mapping[str, Any]) -> Node:
    layer = row.get("layer")
    if ".blocks." not in hook and layer is not None and not math.isnan(layer):
        prefix, kind = hook.rsplit(".", 1) if "." in hook else ("lm", hook)
        hook = f"{prefix}.blocks.{int(layer)}.{kind}"
    elif ".blocks." not in hook and "." not in hook:
        raise ValueError(
            f"the sweep over {hook!r} has no layer column (one layer, axes without 'layer'); "
            "sweep with axes including 'layer' or a full hook name"
        )
    at = (int(row["position"]),) if "position" in row else row.get("span")
    heads = (int(row["head"]),) if "head" in row else None
    return Node(hook, at, heads)


def _point(hooked: HookedModel, hook: str) -> HookPoint:
    """The hook point called ``hook``; unknown names raise with the nearest valid names."""
    try:
        return hooked.resolve(hook)
    except KeyError:
        raise KeyError(
            f"circuit node hook {hook!r} is not a hook point of {hooked.name}; nearest valid names: "
            f"{nearest_names(hook, hooked.hook_points)}"
        ) from None


def components(
    hooked: HookedModel, kinds: Sequence[str] = ("attn_out", "mlp_out"), stage: str | Sequence[str] | None = "lm"
) -> list[Node]:
    """The component universe: one node per hook point of each kind in ``stage`` (``None``: every
    stage), in flow order; for kind ``"z"``, one node per head (``heads=(h,)``)."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    stages = None if stage is None else {stage} if isinstance(stage, str) else set(stage)
    points = [hp for hp in hooked.hook_points.values() if stages is None or hp.stage in stages]
    missing = [k for k in kinds if not any(hp.kind == k for hp in points)]
    if missing:
        raise ValueError(
            f"no hook point of kind {missing} in stage {stage!r}; kinds there: {sorted({hp.kind for hp in points})}"
        )
    nodes = []
    for hp in points:
        if hp.kind not in kinds:
            continue
        if hp.kind == "z" and hp.heads:
            nodes += [Node(hp.name, heads=(h,)) for h in range(hp.heads)]
        else:
            nodes.append(Node(hp.name))
    return nodes


@dataclass(frozen=True)
class _Ablate:
    """One planned ablation at ``hp``: positions ``at`` (None: all) or, with ``keep``, all positions
    except those the selectors in ``keep`` pick; heads ``heads`` (None: all)."""

    hp: HookPoint
    at: Position = None
    heads: tuple[int, ...] | None = None
    keep: tuple[Position, ...] = ()


def _checked(hooked: HookedModel, nodes: Iterable[Node]) -> list[tuple[HookPoint, Node]]:
    out = []
    for node in nodes:
        hp = _point(hooked, node.hook)
        if node.heads is not None:
            if not hp.heads:
                raise ValueError(
                    f"node {node} gives heads but {hp.name!r} has no head axis; per-head nodes go on "
                    f"'z' points (e.g. {hp.name.rsplit('.', 1)[0] + '.z'!r})"
                )
            bad = [h for h in node.heads if not 0 <= h < hp.heads]
            if bad:
                raise IndexError(f"node {node}: heads {bad} out of range for the {hp.heads} heads of {hp.name!r}")
        if isinstance(node.at, str) and not hp.fused_positions:
            raise ValueError(
                f"node {node}: {hp.name!r} is inside the {hp.modality or hp.stage} encoder, whose "
                f"positions are its own tokens, so span {node.at!r} does not apply; give positions"
            )
        out.append((hp, Node(hp.name, node.at, node.heads)))
    return out


def _plan(
    hooked: HookedModel, circuit: Circuit, mode: str, kinds: Sequence[str] | None, stage: str | Sequence[str] | None
) -> list[_Ablate]:
    nodes = _checked(hooked, circuit.effective_nodes)
    if mode == "remove":
        return [_Ablate(hp, node.at, node.heads) for hp, node in nodes]
    if kinds is None:
        kinds = tuple(dict.fromkeys(hp.kind for hp, _ in nodes)) or ("attn_out", "mlp_out")
    if stage is None:
        stage = tuple(dict.fromkeys(hp.stage for hp, _ in nodes)) or "lm"
    by_hook: dict[str, list[Node]] = {}
    for _, node in nodes:
        by_hook.setdefault(node.hook, []).append(node)
    whole: dict[str, list] = {}  # hook -> heads to ablate at every position ([None]: the whole point)
    partial: list[_Ablate] = []
    for u in components(hooked, kinds, stage):
        covering = [
            c
            for c in by_hook.get(u.hook, ())
            if c.heads is None or (u.heads is not None and set(u.heads) <= set(c.heads))
        ]
        if not covering:
            whole.setdefault(u.hook, []).extend(u.heads or [None])
        elif all(c.at is not None for c in covering):
            partial.append(_Ablate(hooked.hook_points[u.hook], heads=u.heads, keep=tuple(c.at for c in covering)))
    plan = [_Ablate(hooked.hook_points[h], heads=None if None in heads else tuple(heads)) for h, heads in whole.items()]
    return plan + partial


def _layout_error(spans: ModalitySpans, ref: ModalitySpans, what: str) -> ValueError | None:
    """Why ``ref`` (batch 1 or the inputs' batch) does not share the inputs' layout, or None."""
    (b, s), (rb, rs) = spans.valid.shape, ref.valid.shape
    shapes = f"[batch, seq] = {(b, s)} for the inputs vs {(rb, rs)} for the {what}"
    if rs != s or rb not in (1, b):
        return ValueError(
            f"the {what} has a different layout: {shapes}; use one with the same sequence layout and batch 1 or {b}"
        )
    same = spans.masks.keys() == ref.masks.keys() and all(
        torch.equal(spans.masks[m], ref.masks[m].to(spans.masks[m].device).expand(b, s)) for m in spans.masks
    )
    if not same:
        counts = {
            m: (spans.masks[m].sum(1).tolist(), ref.masks[m].sum(1).tolist()) for m in spans.masks if m in ref.masks
        }
        return ValueError(
            f"the {what}'s modality spans do not line up with the inputs' ({shapes}; positions per "
            f"modality, inputs vs {what}: {counts})"
        )
    return None


def _reference_run(
    hooked: HookedModel,
    inputs: dict,
    spans: ModalitySpans,
    ablation: str,
    names: list[str],
    reference: Reference | None,
    modality: str | None,
) -> tuple[RunResult, bool]:
    """One cached run of the reference at ``names``, and whether it has the inputs' batch and a checked layout."""
    if ablation == "neutral":
        if reference is not None:
            raise ValueError("ablation='neutral' builds its reference from the inputs; drop reference=")
        modalities = (
            [modality] if modality is not None else [m for m in spans.modalities if m in hooked.adapter.neutral]
        )
        if not modalities:
            raise ValueError(
                f"no modality of these inputs ({spans.modalities}) has a neutral reference in adapter "
                f"{hooked.adapter.name!r}"
            )
        ref_inputs = inputs
        for m in modalities:
            ref_inputs = hooked.neutral(ref_inputs, m)
        ref_edits: list[Edit] = []
        what = f"neutral reference of {modalities}"
    else:
        if modality is not None:
            raise ValueError(f"modality= applies to ablation='neutral' only, not {ablation!r}")
        if reference is None:
            raise ValueError(
                f"ablation={ablation!r} needs reference= (inputs, or a mmlens.Corruption: "
                + ("a batch to average over)" if ablation == "mean" else "an input of the same layout)")
            )
        corruption = reference if isinstance(reference, Corruption) else Corruption(dict(reference), [], "reference")
        ref_inputs, ref_edits, what = hooked.check_inputs(corruption.inputs), corruption.edits, "reference"
    ref_spans = hooked.spans(ref_inputs)
    if ablation != "mean":
        error = _layout_error(spans, ref_spans, what)
        if error is not None:
            raise error
        for key, value in inputs.items():
            other = ref_inputs.get(key)
            if isinstance(value, Tensor) and isinstance(other, Tensor) and value.shape[1:] != other.shape[1:]:
                raise ValueError(
                    f"the {what} has a different layout: input {key!r} has shape {tuple(value.shape)} "
                    f"in the inputs vs {tuple(other.shape)} in the {what}"
                )
    run = hooked.run(ref_inputs, cache=names, edits=ref_edits)
    return run, ablation != "mean" and ref_spans.valid.shape == spans.valid.shape


def _value(act: Tensor, shape: tuple[int, ...], ablation: str, valid: Tensor | None, name: str) -> Tensor:
    """The ablation value at one point, of the input's activation ``shape`` (an expanded view)."""
    if ablation == "mean":
        x = act.float()
        if act.dim() >= 3 and act.shape[1] != shape[1]:  # other sequence length: mean over positions too
            x = (x[valid.to(x.device)] if valid is not None else x.flatten(0, 1)).mean(0)[None, None]
        else:
            x = x.mean(0, keepdim=True)
        act = x.to(act.dtype)
    try:
        return act.expand(shape)
    except RuntimeError:
        raise ValueError(
            f"the reference's activation at {name!r} has shape {tuple(act.shape)}, which does not fit "
            f"the inputs' {tuple(shape)}"
        ) from None


def _mask(hp: HookPoint, selectors: tuple[Position, ...], spans: ModalitySpans, lead: tuple[int, int]) -> Tensor:
    """Bool[batch, seq] of the positions any selector picks."""
    if hp.fused_positions:
        masks = [spans.mask(list(s) if isinstance(s, tuple) else s) for s in selectors]
        return torch.stack(masks).any(0)
    out = torch.zeros(lead, dtype=torch.bool)
    for s in selectors:
        out[:, list(s)] = True
    return out


def circuit_edits(
    hooked: HookedModel,
    inputs: Mapping[str, Any],
    circuit: Circuit,
    mode: str = "keep",
    ablation: str = "mean",
    *,
    reference: Reference | None = None,
    modality: str | None = None,
    kinds: Sequence[str] | None = None,
    stage: str | Sequence[str] | None = None,
) -> list[Edit]:
    """The :func:`mmlens.replace` edits of :func:`intervene` (see there), to run or to batch with others.

    Runs the reference once (not for ``"zero"``, nor when nothing is ablated), plus, only for
    encoder points when the reference's batch differs from the inputs', one run of the inputs to
    read those points' shapes.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {list(MODES)}")
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; valid ablations: {list(ABLATIONS)}")
    inputs = hooked.check_inputs(inputs)
    spans = hooked.spans(inputs)
    plan = _plan(hooked, circuit, mode, kinds, stage)
    if not plan:
        return []
    names = list(dict.fromkeys(a.hp.name for a in plan))
    acts: dict[str, Tensor] = {}
    same_batch, ref_valid = False, None
    if ablation != "zero":
        run, same_batch = _reference_run(hooked, inputs, spans, ablation, names, reference, modality)
        acts = {n: run.cache[n] for n in names}
        ref_valid = run.spans.valid if run.spans is not None else None
    # the inputs' activation shapes: [batch, seq] from the spans on the fused sequence, the reference's when it
    # shares the inputs' batch, else (encoder points) read from one run of the inputs
    shapes: dict[str, tuple[int, ...]] = {}
    for n in names:
        hp = hooked.hook_points[n]
        if hp.fused_positions:
            shapes[n] = (*spans.valid.shape, *(acts[n].shape[2:] if n in acts else ()))
        elif same_batch:
            shapes[n] = tuple(acts[n].shape)
    probe = [
        n for n in names if n not in shapes and (ablation != "zero" or any(a.keep for a in plan if a.hp.name == n))
    ]
    if probe:
        probed = hooked.run(inputs, cache=probe)
        shapes.update({n: tuple(probed.cache[n].shape) for n in probe})
    values: dict[str, Tensor | float] = {
        n: _value(acts[n], shapes[n], ablation, ref_valid if hooked.hook_points[n].fused_positions else None, n)
        if n in acts
        else 0.0
        for n in names
    }
    edits = []
    for a in plan:
        at: Any = list(a.at) if isinstance(a.at, tuple) else a.at
        if a.keep:
            ablated = ~_mask(a.hp, a.keep, spans, shapes[a.hp.name][:2])
            if not ablated.any():
                continue
            at = ablated
        edits.append(replace(a.hp.name, values[a.hp.name], at=at, heads=list(a.heads) if a.heads else None))
    return edits


def intervene(
    hooked: HookedModel,
    inputs: Mapping[str, Any],
    circuit: Circuit,
    mode: str = "keep",
    ablation: str = "mean",
    *,
    reference: Reference | None = None,
    modality: str | None = None,
    kinds: Sequence[str] | None = None,
    stage: str | Sequence[str] | None = None,
    cache: CacheFilter = None,
) -> RunResult:
    """Run ``inputs`` with the circuit kept (everything else in the universe ablated) or removed.

    Args:
        inputs: model inputs (dict of tensors), any batch size.
        circuit: its :attr:`Circuit.effective_nodes` are intervened on.
        mode: ``"keep"`` ablates every node of ``components(hooked, kinds, stage)`` the circuit does
            not contain (only the other positions of a component the circuit holds at ``at``);
            ``"remove"`` ablates the circuit's nodes.
        ablation: ``"zero"``; ``"mean"``: the mean over the ``reference`` batch, per position when its
            sequence length is the inputs', else also over its (real) positions; ``"resample"``: the
            ``reference`` activations (same layout, batch 1 or the inputs' batch); ``"neutral"``: the
            run on ``hooked.neutral(inputs, modality)``, or with every modality of the inputs that the
            adapter has a neutral reference for replaced when ``modality`` is None.
        reference: inputs or a :class:`mmlens.Corruption` (run with its edits) for mean/resample.
        kinds, stage: the universe of ``keep`` (default: the kinds and stages of the circuit's nodes;
            ``("attn_out", "mlp_out")`` in ``"lm"`` for an empty circuit). Ignored by ``remove``.
            Give ``z`` (heads) or ``attn_out`` nodes, not both at one layer: ablating ``attn_out``
            overrides what its heads kept.
        cache: hook points to record in the intervened run, as for :meth:`HookedModel.run`.

    Returns:
        The :class:`mmlens.RunResult` of the intervened run (``logits`` Float[batch, seq, vocab]).
    """
    edits = circuit_edits(
        hooked, inputs, circuit, mode, ablation, reference=reference, modality=modality, kinds=kinds, stage=stage
    )
    return hooked.run(inputs, cache=cache, edits=edits)


def cell_count(hooked: HookedModel, circuit: Circuit, inputs: Mapping[str, Any]) -> int:
    """The number of (component, position, head) cells of ``circuit``'s nodes on input row ``inputs``:
    per node, its positions (``at``; all valid positions when None) times its heads (``heads``; all
    of a per-head point when None, else 1)."""
    spans = hooked.spans(inputs)
    total = 0
    for node in circuit.effective_nodes:
        hp = _point(hooked, node.hook)
        if node.at is None:
            positions = int(spans.valid[0].sum()) if hp.fused_positions else 1
        elif isinstance(node.at, str):
            positions = int(spans.mask(node.at)[0].sum())
        else:
            positions = len(node.at)
        heads = len(node.heads) if node.heads is not None else (hp.heads or 1)
        total += positions * heads
    return total


def matched_random_circuit(
    hooked: HookedModel, circuit: Circuit, inputs: Mapping[str, Any], generator: torch.Generator
) -> Circuit:
    """A random circuit matched to ``circuit`` node by node in (component, position, head) cells: each
    node is replaced by a random hook point of the same kind and stage, ``at`` by as many random valid
    positions (a span name is kept), ``heads`` by as many random heads; so the cell count is the
    same (:func:`cell_count`). Nodes are drawn without repeats where the universe allows."""
    valid = hooked.spans(inputs).valid[0].nonzero()[:, 0]
    drawn: list[Node] = []
    for node in circuit.effective_nodes:
        hp = _point(hooked, node.hook)
        pool = [
            p for p in hooked.hook_points.values() if p.kind == hp.kind and p.stage == hp.stage and p.heads == hp.heads
        ]
        for _ in range(20):
            other = pool[int(torch.randint(len(pool), (1,), generator=generator))]
            at = node.at
            if isinstance(node.at, tuple):
                at = tuple(
                    sorted(int(valid[j]) for j in torch.randperm(len(valid), generator=generator)[: len(node.at)])
                )
            heads = node.heads
            if node.heads is not None:
                heads = tuple(sorted(int(h) for h in torch.randperm(hp.heads, generator=generator)[: len(node.heads)]))
            candidate = Node(other.name, at, heads)
            if candidate not in drawn:
                break
        drawn.append(candidate)
    return Circuit(tuple(drawn), name=f"random match of {circuit.name or 'a circuit'}")


def edge_patch(
    hooked: HookedModel,
    clean: Mapping[str, Any],
    corrupted: Mapping[str, Any] | Corruption,
    metric: Callable[[Tensor], Tensor],
    edges: Sequence[tuple[str, str]],
) -> float:
    """Path patching of a set of edges (sender hook, receiver hook): the metric on ``clean`` (batch 1)
    when only the given sender -> receiver paths carry ``corrupted`` activations.

    Per receiver r: a clean run with r's senders at their corrupted values and every other
    ``attn_out``/``mlp_out`` except r held at its clean value records r's value; the final clean
    run sets every receiver to its recorded value. Sender ``lm.blocks.0.resid_pre`` is the input
    embeddings; receiver ``lm.final_norm`` is the read-out. No edges: the clean metric."""
    corruption = corrupted if isinstance(corrupted, Corruption) else Corruption(dict(corrupted), [], "given")
    senders = {r: [s for s, rr in edges if rr == r] for r in dict.fromkeys(rr for _, rr in edges)}
    hooks = list(dict.fromkeys(h for edge in edges for h in edge))
    for h in hooks:
        _point(hooked, h)
    frozen = [n for n, hp in hooked.hook_points.items() if hp.kind in ("attn_out", "mlp_out")]
    clean_run = hooked.run(clean, cache=list(dict.fromkeys(frozen + hooks)))
    corrupt_run = hooked.run(corruption.inputs, cache=hooks, edits=corruption.edits)
    final = []
    for receiver, sources in senders.items():
        edits = [replace(n, clean_run.cache[n]) for n in frozen if n not in sources and n != receiver]
        edits += [replace(s, corrupt_run.cache[s]) for s in sources]
        step = hooked.run(clean, cache=[receiver], edits=edits)
        final.append(replace(receiver, step.cache[receiver]))
    patched = hooked.run(clean, edits=final)
    return float(metric(hooked.readout_logits(patched.logits, clean))[0])


def random_edges(
    hooked: HookedModel, edges: Sequence[tuple[str, str]], generator: torch.Generator
) -> tuple[tuple[str, str], ...]:
    """As many random (sender, receiver) edges as ``edges``, each from a hook point of the same kind as
    its counterpart's sender to one of the same kind as its receiver, the sender earlier in the flow."""
    order = {name: i for i, name in enumerate(hooked.hook_points)}
    out: list[tuple[str, str]] = []
    for sender, receiver in edges:
        kinds = (_point(hooked, sender).kind, _point(hooked, receiver).kind)
        pool = [
            (s, r)
            for s in hooked.hook_points
            if hooked.hook_points[s].kind == kinds[0]
            for r in hooked.hook_points
            if hooked.hook_points[r].kind == kinds[1] and order[s] < order[r] and (s, r) not in out
        ]
        if pool:
            out.append(pool[int(torch.randint(len(pool), (1,), generator=generator))])
    return tuple(out)


__all__ = [
    "ABLATIONS",
    "MODES",
    "PSEUDO_NODES",
    "Circuit",
    "Node",
    "cell_count",
    "circuit_edits",
    "components",
    "edge_patch",
    "intervene",
    "matched_random_circuit",
    "random_edges",
]
