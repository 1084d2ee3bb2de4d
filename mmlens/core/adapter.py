"""Adapters: a declarative table per architecture family.

An :class:`Adapter` says, for one family of models, where every canonical hook point lives
(module path + which value of that module), how modality spans are found from the inputs, and
what a neutral reference of each modality is. Nothing else is architecture-specific: the one
hook layer in :mod:`mmlens.core.wrapper` reads the table. The registry lives here too:
:func:`register_adapter` adds a table, :func:`find_adapter` picks one by model class (importing
``mmlens`` registers the built-in tables of ``mmlens.hooks``). Every field is documented in
``docs/adding-an-architecture.md``.

Canonical names (``{prefix}`` is ``lm`` for the language model / joint transformer and the
modality for an encoder: ``vision``, ``graph``, ``text``, ...)::

    {prefix}.blocks.{i}.resid_pre    block input                       [batch, pos, d]
    {prefix}.blocks.{i}.resid_mid    after attention, before the MLP   [batch, pos, d]
    {prefix}.blocks.{i}.resid_post   block output                      [batch, pos, d]
    {prefix}.blocks.{i}.attn_out     attention branch output           [batch, pos, d]
    {prefix}.blocks.{i}.z            per-head attention output, before the output
                                     projection                        [batch, pos, head, d_head]
    {prefix}.blocks.{i}.mlp_out      MLP branch output                 [batch, pos, d]
    {prefix}.blocks.{i}.out          output of a non-residual layer (e.g. a GNN conv)

plus single points such as ``lm.embed``, ``lm.final_norm``, ``lm.logits``, ``vision.embed``,
``fusion.projector_out`` and ``fusion.embeds`` (the LM's input embeddings after splicing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmlens.core.spans import ModalitySpans
from mmlens.core.units import InputUnits

Stage = Literal["encoder", "fusion", "lm"]
STAGES: tuple[str, ...] = ("encoder", "fusion", "lm")
BATCH_POS: tuple[str, ...] = ("batch", "pos")
"""Axes of a value laid out ``[batch, pos, ...]`` (blocks, embeddings: the default)."""
ITEMS: tuple[str, ...] = ("item",)
"""Axes of a value laid out ``[items, ...]`` with no batch axis (a GNN's ``[nodes, d]``, packed patches)."""
BATCH: tuple[str, ...] = ("batch",)
"""Axes of a value laid out ``[batch, features]`` with no position axis (pooled logits, a flat projector output)."""


@dataclass(frozen=True)
class SeqArg:
    """Where a keyword argument of an LM block call carries the sequence: its ``seq`` axis and its
    ``batch`` axis (``None``: it has none). Negative axes count from the end, so one entry fits both
    ``position_ids`` ``[batch, seq]`` and M-RoPE's ``[3, batch, seq]`` (``SeqArg(seq=-1, batch=-2)``).
    A tuple of tensors (``position_embeddings = (cos, sin)``) is cut element by element."""

    seq: int
    batch: int | None = 0


SEQUENCE_KWARGS: Mapping[str, SeqArg] = {
    "position_ids": SeqArg(seq=1),
    "cache_position": SeqArg(seq=0, batch=None),
    "position_embeddings": SeqArg(seq=1),
}
MROPE_SEQUENCE_KWARGS: Mapping[str, SeqArg] = {
    "position_ids": SeqArg(seq=-1, batch=-2),
    "cache_position": SeqArg(seq=0, batch=None),
    "position_embeddings": SeqArg(seq=-2, batch=-3),
}
"""Sequence arguments of blocks with multimodal RoPE (Qwen2-VL): positions ``[3, batch, seq]`` or
``[batch, seq]``, cos/sin ``[3, batch, seq, d_head]`` or ``[batch, seq, d_head]``."""

RowSizes = Callable[[Mapping[str, Any]], list[int]]
"""``inputs -> sizes``: how many entries along the leading axis of a packed input belong to each row."""


@dataclass(frozen=True)
class Site:
    """A value a module sees: its output (element ``index`` if it returns a tuple) or one input
    (keyword ``kwarg`` if passed by keyword, else positional ``index``)."""

    module: str
    io: Literal["output", "input"] = "output"
    index: int = 0
    kwarg: str | None = None


@dataclass(frozen=True)
class BlockLayout:
    """Module names inside one residual block, relative to the block.

    The block must compute ``mid = x + A`` and ``out = mid + M`` with ``A = post_attn_norm(attn(...))``
    and ``M = post_mlp_norm(mlp(norm_mid(mid)))``, where a post-norm left ``None`` is the identity
    (Llama: ``A = attn(...)``; Gemma 2/3 norm each branch before adding it). ``attn_out`` is then
    ``A`` (the output of ``post_attn_norm``, else of ``attn``), ``mlp_out`` is ``M``, the input of
    ``norm_mid`` is the mid residual stream, and the input of ``attn_out_proj`` the per-head outputs
    concatenated along the last axis.
    """

    attn: str = "self_attn"
    attn_out_proj: str = "self_attn.o_proj"
    mlp: str = "mlp"
    norm_mid: str = "post_attention_layernorm"
    post_attn_norm: str | None = None
    post_mlp_norm: str | None = None

    @property
    def attn_branch(self) -> str:
        """The module whose output is added to the residual after attention."""
        return self.post_attn_norm or self.attn

    @property
    def mlp_branch(self) -> str:
        """The module whose output is added to the residual after the MLP."""
        return self.post_mlp_norm or self.mlp


LLAMA_BLOCK = BlockLayout()
GEMMA_BLOCK = BlockLayout(
    norm_mid="pre_feedforward_layernorm",
    post_attn_norm="post_attention_layernorm",
    post_mlp_norm="post_feedforward_layernorm",
)
GPT2_BLOCK = BlockLayout(attn="attn", attn_out_proj="attn.c_proj", mlp="mlp", norm_mid="ln_2")
CLIP_BLOCK = BlockLayout(attn="self_attn", attn_out_proj="self_attn.out_proj", mlp="mlp", norm_mid="layer_norm2")
WHISPER_BLOCK = BlockLayout(
    attn="self_attn", attn_out_proj="self_attn.out_proj", mlp="fc2", norm_mid="final_layer_norm"
)
"""Whisper-style encoder layers (Qwen2-Audio, Voxtral, Qwen2.5-Omni's audio tower): pre-norm
``self_attn_layer_norm`` / ``final_layer_norm``, and an MLP ``fc1 -> act -> fc2`` that is no module of
its own, so ``mlp_out`` is the output of ``fc2``."""


@dataclass(frozen=True)
class Stack:
    """A stack of blocks in one stage.

    Attributes:
        prefix: namespace of its hook points (``lm``, ``vision``, ``graph``, ...).
        stage: ``encoder``, ``fusion`` or ``lm``.
        modality: what the positions of this stack are (``None``: the fused multimodal sequence).
        blocks: dotted path of the ``nn.ModuleList`` of blocks.
        layout: module names inside a block; ``None`` for plain layers (only ``.out`` points).
        n_heads: dotted attribute path (from the root model) of the head count, for ``z``.
        axes: the leading axes of its values that position selectors index: :data:`BATCH_POS`
            (``[batch, pos, d]``) or :data:`ITEMS` (``[items, d]``, e.g. a GNN's nodes).
    """

    prefix: str
    stage: Stage
    modality: str | None
    blocks: str
    layout: BlockLayout | None = LLAMA_BLOCK
    n_heads: str | None = None
    axes: tuple[str, ...] = BATCH_POS


@dataclass(frozen=True)
class Point:
    """A single named hook point outside the block stacks (``axes`` as in :class:`Stack`, or
    :data:`BATCH` for ``[batch, features]`` values)."""

    name: str
    stage: Stage
    modality: str | None
    site: Site
    fused_positions: bool = False
    axes: tuple[str, ...] = BATCH_POS


@dataclass(frozen=True)
class HookPoint:
    """A resolved hook point of one model instance.

    ``fused_positions`` is True when axis 1 indexes the fused sequence, so modality spans apply.
    ``heads`` is the head count for per-head points (the value is viewed as [.., head, d_head]).
    ``block``/``mlp`` are set for ``resid_mid``, whose write must also reach the block output;
    ``attn`` for ``attn_out``: the attention module itself (whose output may be normed before it is
    added, so it can differ from ``site.module``).
    ``axes`` names the value's leading axes that selectors index (:data:`BATCH_POS`, :data:`ITEMS`
    or :data:`BATCH`); a per-head value has its head axis right after them.
    """

    name: str
    stage: str
    modality: str | None
    site: Site
    kind: str
    layer: int | None = None
    prefix: str | None = None
    fused_positions: bool = False
    heads: int | None = None
    block: str | None = None
    mlp: str | None = None
    attn: str | None = None
    axes: tuple[str, ...] = BATCH_POS

    @property
    def position_axis(self) -> int | None:
        """The axis that positions index (``pos`` or ``item``), or None when the value has none."""
        return next((i for i, a in enumerate(self.axes) if a in ("pos", "item")), None)


SpanFinder = Callable[[nn.Module, Mapping[str, torch.Tensor]], ModalitySpans]
IndexBound = Callable[[nn.Module, Mapping[str, Any]], "int | None"]
"""``(model, inputs) -> n``: an index input must lie in ``[0, n)`` (None: no bound known)."""


def vocabulary_size(model: nn.Module, inputs: Mapping[str, Any]) -> int | None:
    """Rows of ``model``'s input embedding table (transformers' ``get_input_embeddings``), if it has one."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(embeddings, "num_embeddings", None)


NeutralInput = Callable[[nn.Module, dict, ModalitySpans], dict]
Perturbation = Callable[..., Callable[[int], tuple[dict, str]]]
"""``(hooked, inputs, spans, scale, generator) -> draw`` with ``draw(i) -> (perturbed inputs, description)``;
see :data:`mmlens.metrics.perturb.Prepare`."""


@dataclass(frozen=True)
class Adapter:
    """The table that makes one architecture family hookable.

    Attributes:
        name: short adapter name.
        architectures: model class names it applies to (matched against the class and its bases).
        stacks: block stacks of every stage.
        points: single hook points.
        spans: ``(model, inputs) -> ModalitySpans``.
        neutral: modality -> ``(model, inputs, spans) -> inputs`` with that modality set to a neutral
            reference.
        nested: paths of submodules that carry their own adapter (e.g. the LM inside a graph-language
            model); their hook points are included with module paths prefixed by the submodule path.
        required_inputs: input keys without which the forward cannot run.
        project_encoder: ``(model, inputs, hidden) -> Float[items, tokens, d_lm]``: how one encoder
            layer's output reaches the LM's input space (the projector), for cross-modal decoding.
        readout: the positions the output is read from: ``"last"`` (a causal LM's final position)
            or ``"mean"`` (a classifier head that pools every real position); the attention
            explainers score the attention from these positions.
        shared_inputs: input keys without a leading batch axis (a whole graph's ``[nodes, d]``
            features, its ``[2, edges]`` edge list): every row of a batch uses them whole, so row
            selection and repetition pass them through unchanged.
        modality_inputs: modality -> the input keys that carry it (what a perturbation or a neutral
            reference of that modality changes).
        packed_inputs: input key -> ``inputs -> sizes``: keys whose leading axis packs the items of
            every row one after another (Qwen2-VL's patches ``[n_patches, C*T*P*P]`` with
            ``image_grid_thw [n_images, 3]``), with how many entries belong to each row; row
            selection and repetition cut and tile them by these sizes.
        sequence_kwargs: keyword arguments of an LM block call that carry the sequence axis: name ->
            :class:`SeqArg` (its sequence and batch axes; a plain int ``n`` is ``SeqArg(n)``, or
            ``SeqArg(0, None)`` for ``0``). Replay cuts them to the replayed positions.
        causal: whether every position of the fused sequence attends only to earlier positions in
            every LM block; replay with reuse of earlier positions' keys/values (and any other fast
            path that assumes it) is exact only then. A callable ``inputs -> bool`` when it depends
            on the inputs (Gemma3: image tokens attend to each other both ways); see :meth:`is_causal`.
        token_ids: the input key of the token ids, ``[batch, seq]`` aligned with the fused sequence
            (placeholders at soft positions) or ``[batch, n]`` covering only its text and padding
            positions, in order (soft tokens concatenated around the text); ``None``: no token
            labels. :meth:`position_token_ids` aligns them.
        perturbations: modality -> kind -> preparer of a small meaning-preserving perturbation
            (which input key it changes, with which primitive and layout; built with
            :func:`mmlens.metrics.perturb.image_perturbations` and its siblings); every modality
            here must be in ``modality_inputs``.
        index_inputs: input keys that hold indices into a table -> ``(model, inputs) -> size`` of
            that table (token ids < the vocabulary; node ids < the node count); checked before a run.
        input_ranges: input keys -> the ``(low, high)`` interval their (floating) values lie in when
            the processor made them (normalised pixels): raw 0-255 pixels are refused.
        input_units: modality -> :class:`mmlens.core.units.InputUnits`: its raw input units (vision
            patches, tokens, audio frames, graph nodes and edges), how many a row has, the LM position
            each unit's score is read from, and how to set chosen units to the modality's neutral
            reference (input-level faithfulness; built with :func:`mmlens.core.units.patch_units` and
            its siblings); a modality without an entry has no input level.
        probe: ``model -> inputs``: a tiny valid input (every modality present) for the wrap-time
            self-check (:mod:`mmlens.core.selfcheck`); default: the model's ``dummy_inputs`` (a
            Hugging Face model's small text batch), else no check.
    """

    name: str
    architectures: tuple[str, ...]
    stacks: tuple[Stack, ...]
    points: tuple[Point, ...]
    spans: SpanFinder
    neutral: Mapping[str, NeutralInput] = field(default_factory=dict)
    nested: tuple[str, ...] = ()
    required_inputs: tuple[str, ...] = ("input_ids",)
    project_encoder: Callable[[nn.Module, Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor] | None = None
    readout: str = "last"
    shared_inputs: tuple[str, ...] = ()
    modality_inputs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    packed_inputs: Mapping[str, RowSizes] = field(default_factory=dict)
    sequence_kwargs: Mapping[str, SeqArg | int] = field(default_factory=lambda: dict(SEQUENCE_KWARGS))
    causal: bool | Callable[[Mapping[str, Any]], bool] = True
    perturbations: Mapping[str, Mapping[str, Perturbation]] = field(default_factory=dict)
    index_inputs: Mapping[str, IndexBound] = field(default_factory=lambda: {"input_ids": vocabulary_size})
    input_ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    token_ids: str | None = "input_ids"
    input_units: Mapping[str, InputUnits] = field(default_factory=dict)
    probe: Callable[[nn.Module], dict] | None = None

    def probe_inputs(self, model: nn.Module) -> dict | None:
        """The self-check's input for ``model``: ``probe(model)``, else the first row of the model's
        ``dummy_inputs`` (a Hugging Face model's text batch, ``[1, 5]``), else None (nothing to check on)."""
        if self.probe is not None:
            return self.probe(model)
        dummy = getattr(model, "dummy_inputs", None)
        if not isinstance(dummy, Mapping) or not dummy:
            return None
        return {k: v[:1] if isinstance(v, Tensor) and v.dim() > 1 else v for k, v in dummy.items()}

    def select_rows(self, inputs: Mapping[str, Any], rows: int | slice | Tensor | list[int]) -> dict[str, Any]:
        """The inputs of some rows of a batch: batched tensors indexed on their first axis (an int
        keeps the axis: row ``i`` is a batch of one), packed inputs cut to those rows' entries,
        shared inputs and non-tensors unchanged."""
        index = slice(rows, rows + 1) if isinstance(rows, int) else rows
        out = {k: v[index] if self._batched(k, v) else v for k, v in inputs.items()}
        for key, sizes in self._row_sizes(inputs).items():
            value = inputs[key]
            starts = [0, *torch.tensor(sizes).cumsum(0).tolist()]
            picked = torch.arange(len(sizes))[index].reshape(-1).tolist()
            pieces = [value[starts[r] : starts[r + 1]] for r in picked]
            out[key] = torch.cat(pieces) if pieces else value[:0]
        return out

    def repeat_rows(self, inputs: Mapping[str, Any], n: int) -> dict[str, Any]:
        """Inputs of batch 1 repeated to batch ``n`` (shared inputs unchanged; a packed input, all of it
        row 0's, is tiled ``n`` times; copies, not expanded views: some models ``view`` their inputs,
        e.g. SmolVLM its images)."""
        out = {}
        for k, v in inputs.items():
            if (k in self.packed_inputs and isinstance(v, Tensor)) or self._batched(k, v):
                out[k] = v.repeat(n, *([1] * (v.dim() - 1)))
            else:
                out[k] = v
        return out

    def join_rows(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """One batch of several inputs (the inverse of :meth:`select_rows`): batched and packed
        tensors concatenated on their first axis, shared inputs and non-tensors taken from the first
        row, which they must equal in every row."""
        first = rows[0]
        if any(row.keys() != first.keys() for row in rows):
            raise ValueError(f"rows to join have different keys: {[sorted(row) for row in rows]}")
        out: dict[str, Any] = {}
        for key, value in first.items():
            values = [row[key] for row in rows]
            if (key in self.packed_inputs and isinstance(value, Tensor)) or self._batched(key, value):
                out[key] = torch.cat(values)
            elif all(_same_value(value, v) for v in values[1:]):
                out[key] = value
            else:
                raise ValueError(f"rows to join differ in the shared input {key!r}; join only rows that share it")
        return out

    def _batched(self, key: str, value: Any) -> bool:
        return (
            isinstance(value, Tensor)
            and value.dim() > 0
            and key not in self.shared_inputs
            and key not in self.packed_inputs
        )

    def _row_sizes(self, inputs: Mapping[str, Any]) -> dict[str, list[int]]:
        """Each present packed input's per-row sizes, checked to cover its leading axis."""
        out = {}
        for key, sizes_of in self.packed_inputs.items():
            value = inputs.get(key)
            if not isinstance(value, Tensor):
                continue
            sizes = [int(s) for s in sizes_of(inputs)]
            if sum(sizes) != value.shape[0]:
                raise ValueError(
                    f"adapter {self.name!r}: packed input {key!r} has {value.shape[0]} entries but its rows "
                    f"account for {sizes} (sum {sum(sizes)}); make the placeholders in the inputs match the "
                    "packed items (as the model's processor lays them out)"
                )
            out[key] = sizes
        return out

    def is_causal(self, inputs: Mapping[str, Any]) -> bool:
        """Whether the LM attends causally on these inputs (``causal``, called on them if callable)."""
        return bool(self.causal(inputs)) if callable(self.causal) else bool(self.causal)

    def sequence_arg(self, name: str) -> SeqArg | None:
        """The :class:`SeqArg` of block keyword argument ``name`` (None: it carries no sequence)."""
        axis = self.sequence_kwargs.get(name)
        if axis is None or isinstance(axis, SeqArg):
            return axis
        return SeqArg(seq=axis, batch=0 if axis != 0 else None)

    def position_token_ids(self, inputs: Mapping[str, Any], spans: ModalitySpans) -> Tensor:
        """Long[b, seq]: the token id at each text or padding position of the fused sequence, ``-1``
        at soft (non-text) positions and everywhere when the inputs carry no token ids."""
        out = torch.full(spans.valid.shape, -1, dtype=torch.long)
        ids = inputs.get(self.token_ids) if self.token_ids else None
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            return out
        soft = torch.zeros_like(spans.valid)
        for name, mask in spans.masks.items():
            if name != "text":
                soft |= mask
        textual = ~soft.cpu()
        if ids.shape[1] == spans.seq_len:
            return torch.where(textual, ids.cpu(), out)
        counts = textual.sum(1)
        if ids.shape[0] != spans.batch_size or (counts != ids.shape[1]).any():
            raise ValueError(
                f"adapter {self.name!r}: input {self.token_ids!r} has shape {tuple(ids.shape)} but the fused "
                f"sequence has {counts.tolist()} text/padding positions per row (of {spans.seq_len}); "
                "the adapter's spans must mark every soft position, or set Adapter.token_ids"
            )
        out[textual] = ids.cpu().flatten()
        return out

    def readout_mask(self, spans: ModalitySpans) -> Tensor:
        """Bool[b, seq]: the positions of the fused sequence the output is read from: each row's last
        real position (``readout="last"``) or every real position (``readout="mean"``)."""
        if self.readout == "mean":
            return spans.valid.clone()
        if self.readout == "last":
            return spans.mask("last")
        raise ValueError(f"adapter {self.name!r}: readout must be 'last' or 'mean', got {self.readout!r}")

    def readout_logits(self, logits: Tensor, spans: ModalitySpans) -> Tensor:
        """The logits the output is read from: ``Float[b, seq, vocab] -> Float[b, vocab]`` at each row's
        last real position of the fused sequence (from ``spans``, whatever the attention mask covers);
        classifier logits ``Float[b, classes]`` (the model pooled itself) pass through."""
        if logits.dim() == 2:
            return logits
        if logits.dim() != 3 or logits.shape[:2] != spans.valid.shape:
            raise ValueError(
                f"adapter {self.name!r}: logits of shape {tuple(logits.shape)} do not line up with the spans' "
                f"[batch, seq] = {tuple(spans.valid.shape)}; the adapter's spans must cover the fused sequence"
            )
        if self.readout != "last":
            raise ValueError(
                f"adapter {self.name!r} reads out with readout={self.readout!r} but the model returns per-position "
                "logits; set readout='last' (a causal LM) or return pooled logits [batch, classes]"
            )
        last = self.readout_mask(spans).to(logits.device)
        if not bool((last.sum(1) == 1).all()):
            raise ValueError(f"adapter {self.name!r}: a row has no real position to read the output from")
        return logits[last]

    def _check_modalities(self) -> None:
        """Every modality with perturbations or input units (and, once ``modality_inputs`` is given, with a neutral
        reference) names its input keys in ``modality_inputs``."""
        tables = {
            "perturbations": self.perturbations,
            "input_units": self.input_units,
            **({"neutral": self.neutral} if self.modality_inputs else {}),
        }
        for what, table in tables.items():
            unknown = sorted(set(table) - set(self.modality_inputs))
            if unknown:
                raise ValueError(
                    f"adapter {self.name!r}: {what} names modalities {unknown} that modality_inputs "
                    f"does not ({sorted(self.modality_inputs)}); add their input keys there"
                )

    def matches(self, model: nn.Module) -> bool:
        return any(cls.__name__ in self.architectures for cls in type(model).__mro__)

    def hook_points(self, model: nn.Module) -> dict[str, HookPoint]:
        """Expand the table against a model instance; every module path is checked to exist."""
        self._check_modalities()
        points: dict[str, HookPoint] = {}
        for child_path in self.nested:
            child = get_module(model, child_path, self.name)
            for hp in find_adapter(child).hook_points(child).values():
                points[hp.name] = replace(
                    hp,
                    site=replace(hp.site, module=_join(child_path, hp.site.module)),
                    block=hp.block and _join(child_path, hp.block),
                    mlp=hp.mlp and _join(child_path, hp.mlp),
                    attn=hp.attn and _join(child_path, hp.attn),
                )
        for stack in self.stacks:
            blocks = get_module(model, stack.blocks, self.name)
            if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
                raise TypeError(
                    f"adapter {self.name!r}: {stack.blocks!r} is a {type(blocks).__name__}, not a ModuleList"
                )
            heads = int(get_attr(model, stack.n_heads, self.name)) if stack.n_heads else None
            for i in range(len(blocks)):
                for hp in _block_points(stack, i, heads):
                    get_module(model, hp.site.module, self.name)
                    points[hp.name] = hp
        for p in self.points:
            get_module(model, p.site.module, self.name)
            points[p.name] = HookPoint(
                name=p.name,
                stage=p.stage,
                modality=p.modality,
                site=p.site,
                kind=p.name.rsplit(".", 1)[-1],
                prefix=p.name.split(".", 1)[0],
                fused_positions=p.fused_positions,
                axes=p.axes,
            )
        return _in_flow_order(points)


ADAPTERS: list[Adapter] = []
"""The registered adapters, most recent first (the built-in tables are registered by ``mmlens.hooks``)."""


def register_adapter(adapter: Adapter) -> Adapter:
    """Make ``adapter`` available to :func:`find_adapter` (later registrations win)."""
    if not isinstance(adapter, Adapter):
        raise TypeError(f"register_adapter takes an mmlens.Adapter, got {type(adapter).__name__}")
    ADAPTERS.insert(0, adapter)
    return adapter


AutoBuilder = Callable[[nn.Module], "Adapter"]
"""``model -> Adapter`` derived from the model itself; raises :class:`AutoAdapterError` naming a fact
it cannot find."""

AUTO_BUILDERS: list[AutoBuilder] = []
"""Builders :func:`find_adapter` tries when no table matches (``mmlens.hooks`` registers
:func:`mmlens.hooks.auto.auto_adapter`)."""


class AutoAdapterError(LookupError):
    """An automatic adapter cannot be derived: ``fact`` is what could not be found."""

    def __init__(self, message: str, fact: str):
        super().__init__(message)
        self.fact = fact


def find_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``'s class: a registered table (an explicit table always wins), else one
    derived by an automatic builder (named ``auto:<Class>``); raises with how to write one when
    neither works."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    reasons = []
    for build in AUTO_BUILDERS:
        try:
            return build(model)
        except AutoAdapterError as err:
            reasons.append(str(err))
    known = sorted({a for ad in ADAPTERS for a in ad.architectures})
    why = "".join(f"\nNo automatic adapter either: {r}" for r in reasons)
    raise LookupError(
        f"no mmlens adapter for {type(model).__name__}. Supported classes: {known}. To add one, write a table "
        "mmlens.Adapter(name=..., architectures=('YourClass',), stacks=(...), points=(...), spans=...) and call "
        "mmlens.register_adapter(...) (docs/adding-an-architecture.md); list module paths with "
        f"[n for n, _ in model.named_modules()]{why}"
    )


def _in_flow_order(points: dict[str, HookPoint]) -> dict[str, HookPoint]:
    """Order points as data flows: encoder -> fusion -> lm; within a prefix embed, blocks, the rest."""
    prefixes = list(dict.fromkeys(hp.prefix for hp in points.values()))

    def key(item: tuple[int, HookPoint]) -> tuple:
        i, hp = item
        part = 0 if hp.kind == "embed" else 1 if hp.layer is not None else 2
        return STAGES.index(hp.stage), prefixes.index(hp.prefix), part, hp.layer or 0, i

    return {hp.name: hp for _, hp in sorted(enumerate(points.values()), key=key)}


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if child else parent


def _block_points(stack: Stack, i: int, heads: int | None) -> list[HookPoint]:
    block = f"{stack.blocks}.{i}"
    common = {
        "stage": stack.stage,
        "modality": stack.modality,
        "layer": i,
        "prefix": stack.prefix,
        "fused_positions": stack.modality is None,
        "axes": stack.axes,
    }
    name = f"{stack.prefix}.blocks.{i}"
    if stack.layout is None:
        return [HookPoint(name=f"{name}.out", site=Site(block), kind="out", **common)]
    lay = stack.layout
    out = [
        HookPoint(name=f"{name}.resid_pre", site=Site(block, "input", 0, "hidden_states"), kind="resid_pre", **common),
        HookPoint(
            name=f"{name}.attn_out",
            site=Site(f"{block}.{lay.attn_branch}"),
            kind="attn_out",
            attn=f"{block}.{lay.attn}",
            **common,
        ),
        HookPoint(
            name=f"{name}.resid_mid",
            site=Site(f"{block}.{lay.norm_mid}", "input", 0, "hidden_states"),
            kind="resid_mid",
            block=block,
            mlp=f"{block}.{lay.mlp_branch}",
            **common,
        ),
        HookPoint(name=f"{name}.mlp_out", site=Site(f"{block}.{lay.mlp_branch}"), kind="mlp_out", **common),
        HookPoint(name=f"{name}.resid_post", site=Site(block), kind="resid_post", **common),
    ]
    if heads is not None:
        out.insert(
            2,
            HookPoint(
                name=f"{name}.z", site=Site(f"{block}.{lay.attn_out_proj}", "input", 0), kind="z", heads=heads, **common
            ),
        )
    return out


def get_module(model: nn.Module, path: str, adapter: str = "?") -> nn.Module:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError as err:
        raise AttributeError(
            f"adapter {adapter!r} names module {path!r}, which {type(model).__name__} does not have; "
            "fix the adapter table (list the model's modules with [n for n, _ in model.named_modules()])"
        ) from err


def get_attr(obj: object, path: str, adapter: str = "?") -> object:
    for part in path.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"adapter {adapter!r}: attribute path {path!r} not found (missing {part!r})")
        obj = getattr(obj, part)
    return obj


def language_model(
    base: str,
    logits: str,
    layout: BlockLayout = LLAMA_BLOCK,
    n_heads: str = "config.num_attention_heads",
    blocks: str = "layers",
    embed: str = "embed_tokens",
    final_norm: str = "norm",
) -> tuple[Stack, tuple[Point, ...]]:
    """The table rows of a decoder-only language model whose body lives at ``base``.

    Returns the block stack and the ``lm.embed``, ``lm.final_norm`` and ``lm.logits`` points.
    """
    path = (lambda name: f"{base}.{name}") if base else (lambda name: name)
    stack = Stack(prefix="lm", stage="lm", modality=None, blocks=path(blocks), layout=layout, n_heads=n_heads)
    points = (
        Point("lm.embed", "lm", None, Site(path(embed)), fused_positions=True),
        Point("lm.final_norm", "lm", None, Site(path(final_norm)), fused_positions=True),
        Point("lm.logits", "lm", None, Site(logits), fused_positions=True),
    )
    return stack, points


def _same_value(a: Any, b: Any) -> bool:
    """Whether two input values are equal (tensors: same shape and entries)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a is b or a == b
