"""Cross-modal logit lens: decode every layer and position of a language model's residual stream.

Three decodings, each with its assumption stated:

- :func:`logit_lens` (nostalgebraist 2020): a residual vector ``h`` at any layer is read as if it
  were the last layer's, ``unembed(final_norm(h))``. Assumes intermediate layers share the final
  layer's basis; it is exact at the final layer (equal to the model's own logits). With a
  :class:`TunedLens`, ``h`` first passes through a learned per-layer affine translator
  (Belrose et al. 2023), which drops that assumption. ``final_norm`` picks the lens variant:
  ``True`` (the default, above), ``False`` (``unembed(h)`` at every layer, the literal reading of
  "softmax(lm_head . h)"; its final row is not the model's logits) or ``"naive"`` (raw ``h`` at
  intermediate layers and the normed last state, which is what decoding a Hugging Face model's
  ``output_hidden_states`` with ``lm_head`` gives, since its last hidden state is already normed).
- :func:`nearest_tokens` / :func:`decode_soft_tokens`: a soft token (a graph or image token that
  the fusion layer writes into the LM's input) is read as the vocabulary rows of the LM's input
  embedding matrix closest to it by cosine. Assumes direction carries meaning in the input space;
  the cosine is reported, and a low value says no token is near.
- :func:`decode_encoder_layers`: an encoder layer's output is pushed through the adapter's
  projector (``Adapter.project_encoder``) into the LM's input space and read by nearest tokens.
  Assumes the projector, trained on the encoder's final (selected) layer, also applies to earlier
  layers, i.e. that they share its basis.

Shapes: ``layer`` = embedding output + one row per block (``L + 1``), ``b`` batch, ``pos``
positions, ``k`` top-k, ``d`` model width, ``vocab`` the unembedding's output size.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mmlens.core.adapter import get_module
from mmlens.core.cache import Named
from mmlens.core.edits import Edit
from mmlens.core.inputs import check_count
from mmlens.core.memory import keep_large_blocks_mapped
from mmlens.core.replay import record_points
from mmlens.core.spans import ModalitySpans, Selector
from mmlens.core.unembed import Unembed
from mmlens.core.wrapper import HookedModel
from mmlens.store import atomic_path, write_json
from mmlens.training.loop import RowOrder, StratifiedRowOrder, fit


@dataclass
class LensResult:
    """What :func:`logit_lens` returns: per layer, input row and position, the decoded distribution.

    Attributes:
        lens: ``"logit"`` or ``"tuned"`` (final norm at every layer), ``"logit-raw"``
            (``final_norm=False``) or ``"logit-naive"`` (``final_norm="naive"``).
        layers: row labels of the layer axis: ``"embed"`` then ``"0"`` .. ``"L-1"`` (after block i).
        hooks: the hook point decoded for each layer row.
        top_ids: Long[layer, b, pos, k], top-k token ids (descending probability).
        top_probs: Float[layer, b, pos, k], their probabilities.
        entropy: Float[layer, b, pos], entropy of the decoded distribution, in nats.
        kl_to_final: Float[layer, b, pos], KL(final layer || this layer), in nats (0 at the final layer).
        cosine_to_previous: Float[layer, b, pos], cosine of the residual vector with the previous
            layer's (NaN for the first layer).
        target_ids: Long[b, n_targets] or None; target_probs / target_ranks: Float / Long
            [layer, b, pos, n_targets] (rank 0 = the top token).
        tokens: input token text per [row][pos] of the fused sequence (soft tokens shown as
            ``<graph 0>``, ``<image 3>``, ...; :meth:`HookedModel.position_labels`).
        modalities: modality name per [row][pos] (``"pad"`` for padding).
        spans: the inputs' modality spans.
        decode: token ids -> one text per id.
        decoded: Bool[b, pos], the positions that were decoded (real positions picked by
            ``positions=``); other cells hold ``-1`` ids and NaN values.
        forward: how the residual stream was recorded (:func:`mmlens.core.replay.record_points`):
            ``"shared prefix: ..."`` (positions every row shares computed once, checked against a
            plain forward of one row) or ``"plain forward (why not)"``.
    """

    lens: str
    layers: list[str]
    hooks: list[str]
    top_ids: Tensor
    top_probs: Tensor
    entropy: Tensor
    kl_to_final: Tensor
    cosine_to_previous: Tensor
    target_ids: Tensor | None
    target_probs: Tensor | None
    target_ranks: Tensor | None
    tokens: list[list[str]]
    modalities: list[list[str]]
    spans: ModalitySpans
    decode: Callable[[list[int]], list[str]]
    decoded: Tensor
    forward: str = "plain forward"

    def __repr__(self) -> str:
        n_layer, b, pos, k = self.top_ids.shape
        return f"LensResult(lens={self.lens!r}, layers={n_layer}, batch={b}, pos={pos}, k={k}, modalities={self.spans.modalities})"

    def named(self, field: str) -> Named:
        """One result tensor with named axes, e.g. ``named("kl_to_final")``."""
        values = getattr(self, field)
        dims = ("layer", "batch", "pos", "k" if field.startswith("top_") else "target")[: values.dim()]
        return Named(values, dims, {"layer": list(self.layers)})

    def top_tokens(self, row: int = 0) -> list[list[str]]:
        """Top-1 token text per [layer][pos] of one input row."""
        ids = self.top_ids[:, row, :, 0]
        return [self.decode(layer.tolist()) for layer in ids]

    def table(self, k: int = 1) -> pd.DataFrame:
        """A tidy table: one row per (input, layer, position) of real (non-pad) positions, with the
        top-``k`` tokens and probabilities, entropy, KL to the final layer, residual cosine to the
        previous layer, and each target's probability and rank."""
        n_layer, b, pos, _ = self.top_ids.shape
        grid = torch.stack(torch.meshgrid(torch.arange(n_layer), torch.arange(b), torch.arange(pos), indexing="ij"), -1)
        keep = self.decoded[None].expand(n_layer, b, pos)
        li, bi, pi = grid[keep].unbind(-1)
        data: dict[str, Any] = {
            "input": bi.tolist(),
            "layer": li.tolist(),
            "layer_label": [self.layers[i] for i in li.tolist()],
            "position": pi.tolist(),
            "token": [self.tokens[r][p] for r, p in zip(bi.tolist(), pi.tolist())],
            "modality": [self.modalities[r][p] for r, p in zip(bi.tolist(), pi.tolist())],
        }
        for j in range(k):
            suffix = "" if j == 0 else f"_{j + 1}"
            data[f"top1{suffix}" if j == 0 else f"top{j + 1}"] = self.decode(self.top_ids[..., j][keep].tolist())
            data[f"top1_prob{suffix}" if j == 0 else f"top{j + 1}_prob"] = self.top_probs[..., j][keep].tolist()
        for name in ("entropy", "kl_to_final", "cosine_to_previous"):
            data[name] = getattr(self, name)[keep].tolist()
        if self.target_ids is not None:
            for t in range(self.target_ids.shape[1]):
                data[f"target{t}_prob"] = self.target_probs[..., t][keep].tolist()
                data[f"target{t}_rank"] = self.target_ranks[..., t][keep].tolist()
        return pd.DataFrame(data)

    TENSOR_FIELDS = (  # what save() writes besides the labels (spans and decode come from the model)
        "top_ids",
        "top_probs",
        "entropy",
        "kl_to_final",
        "cosine_to_previous",
        "target_ids",
        "target_probs",
        "target_ranks",
        "decoded",
    )

    def save(self, path: str | Path) -> Path:
        """Write the result's tensors and labels to ``path`` (atomically; ``torch.save`` of plain
        tensors, lists and strings, so :meth:`load` reads it with ``weights_only=True``)."""
        data = {name: getattr(self, name) for name in self.TENSOR_FIELDS}
        data |= {"lens": self.lens, "layers": self.layers, "hooks": self.hooks}
        data |= {"tokens": self.tokens, "modalities": self.modalities, "forward": self.forward}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(data, tmp)
        return path

    @classmethod
    def load(cls, path: str | Path, hooked: HookedModel, inputs: Mapping[str, Any]) -> LensResult:
        """A result written by :meth:`save` for ``inputs``; the spans and the token decoder come from
        ``hooked``. Raises when the inputs' tokens (per row and position) differ from the saved ones."""
        data = torch.load(path, weights_only=True)
        spans = hooked.spans(inputs)
        tokens = hooked.position_labels(inputs, spans)
        if tokens != data["tokens"]:
            rows = (len(data["tokens"]), len(tokens))
            raise ValueError(
                f"{path} holds a lens over other inputs (saved tokens of {rows[0]} rows differ from these "
                f"{rows[1]} rows'); load it with the inputs it was computed on"
            )
        return cls(spans=spans, decode=hooked.token_strings, **data)


# -- the residual stream -----------------------------------------------------------------------------


def residual_points(hooked: HookedModel, prefix: str = "lm") -> list[str]:
    """The residual-stream points of stack ``prefix`` in layer order: the input of block 0, then
    every block's output (``resid_post``, or ``out`` for stacks without a block layout)."""
    blocks = [hp for hp in hooked.hook_points.values() if hp.prefix == prefix and hp.layer is not None]
    if not blocks:
        stacks = sorted({hp.prefix for hp in hooked.hook_points.values() if hp.layer is not None})
        raise KeyError(f"{hooked.name} has no block stack {prefix!r}; its stacks are {stacks}")
    kinds = {hp.kind for hp in blocks}
    post = "resid_post" if "resid_post" in kinds else "out"
    names = [f"{prefix}.blocks.0.resid_pre"] if "resid_pre" in kinds else []
    last = max(hp.layer for hp in blocks)
    return names + [f"{prefix}.blocks.{i}.{post}" for i in range(last + 1)]


def layer_labels(hooked: HookedModel, prefix: str = "lm") -> list[str]:
    """The lens's layer-row labels (:attr:`LensResult.layers`): ``"embed"`` then ``"0"`` .. ``"L-1"``."""
    points = [hooked.hook_points[n] for n in residual_points(hooked, prefix)]
    return ["embed" if hp.kind == "resid_pre" else str(hp.layer) for hp in points]


def _targets(hooked: HookedModel, targets: Any, batch: int, device: torch.device) -> Tensor | None:
    if targets is None:
        return None
    if isinstance(targets, (str, int)):
        targets = [targets]
    if isinstance(targets, Tensor):
        ids = targets.long()
    else:
        tokenizer = hooked.text_tokenizer
        ids_list = []
        for t in targets:
            if isinstance(t, str):
                if tokenizer is None:
                    raise ValueError(f"target {t!r} is text but {hooked.name} has no tokenizer; pass token ids")
                pieces = tokenizer.encode(t, add_special_tokens=False)
                if len(pieces) != 1:
                    raise ValueError(
                        f"target {t!r} is {len(pieces)} tokens {tokenizer.convert_ids_to_tokens(pieces)}; "
                        "pass a single-token string (e.g. with a leading space) or a token id"
                    )
                ids_list.append(pieces[0])
            else:
                ids_list.append(int(t))
        ids = torch.tensor(ids_list)
    if ids.dim() == 1:
        ids = ids[None].expand(batch, -1)
    if ids.dim() != 2 or ids.shape[0] != batch:
        raise ValueError(
            f"targets must be a list (same for every row) or shaped [batch={batch}, n]; got {tuple(ids.shape)}"
        )
    return ids.to(device)


@torch.no_grad()
def logit_lens(
    hooked: HookedModel,
    inputs: Mapping[str, Any],
    *,
    k: int = 5,
    targets: Any = None,
    tuned: TunedLens | None = None,
    prefix: str = "lm",
    positions: Selector = None,
    max_chunk_mb: float = 256.0,
    final_norm: FinalNorm = True,
    edits: Edit | Sequence[Edit] = (),
    progress: bool = False,
    shared_prefix: bool = True,
) -> LensResult:
    """Decode every residual-stream layer and position of one batch in a single recorded forward.

    Args:
        hooked: the wrapped model.
        inputs: model inputs (a dict of tensors, as for :meth:`HookedModel.run`).
        k: how many top tokens to keep per cell.
        targets: tokens whose probability and rank to track: token ids or single-token strings
            (the same for every row), or a Long[b, n] tensor.
        tuned: a trained :class:`TunedLens` to decode with instead of the plain logit lens.
        prefix: the block stack to decode (``"lm"``).
        positions: which positions to decode (any span selector: a modality, a Bool[b, pos] mask,
            ...; default all real positions). Others are recorded but not decoded, which saves
            the unembedding's cost on long shared prompt prefixes.
        max_chunk_mb: memory budget for one chunk of decoded logits; layers are decoded in batched
            chunks of ``layer x batch`` rows that fit it.
        final_norm: ``True`` (apply the final norm at every layer), ``False`` (never: the literal
            ``softmax(lm_head . h)``) or ``"naive"`` (raw intermediate layers, normed final layer);
            see the module docstring. ``False``/``"naive"`` cannot be combined with ``tuned``.
        edits: edits made during the recorded forward (e.g. other vectors in a span's slots).
        progress: show a progress bar over the decoded chunks (the unembedding dominates the cost).
        shared_prefix: record the positions that every row shares (a common prompt prefix) once and
            replay the rest with their keys and values (:func:`mmlens.core.replay.record_points`:
            checked against one row's plain forward, relative difference at most 1e-4; falls back
            to the plain forward otherwise). ``False``: one plain forward, bit for bit. The result's
            ``forward`` says which ran.

    Returns:
        A :class:`LensResult`; with ``final_norm`` ``True`` or ``"naive"`` its final layer decodes
        to the model's own logits (the edited model's, with ``edits``).
    """
    return logit_lens_variants(
        hooked,
        inputs,
        (final_norm,),
        k=k,
        targets=targets,
        tuned=tuned,
        prefix=prefix,
        positions=positions,
        max_chunk_mb=max_chunk_mb,
        edits=edits,
        progress=progress,
        shared_prefix=shared_prefix,
    )[final_norm]


@torch.no_grad()
def logit_lens_variants(
    hooked: HookedModel,
    inputs: Mapping[str, Any],
    variants: Sequence[FinalNorm] = (True, False, "naive"),
    **options: Any,
) -> dict[FinalNorm, LensResult]:
    """:func:`logit_lens` under several ``final_norm`` variants from ONE recorded forward:
    ``{variant: LensResult}``, each equal to ``logit_lens(..., final_norm=variant)``.

    The forward is shared, and so is the unembedding product wherever two variants read the same
    vectors (``False`` and ``"naive"`` share every intermediate layer), so three variants cost
    about two decodings. ``options`` are :func:`logit_lens`'s keyword arguments (``k``,
    ``targets``, ``tuned``, ``prefix``, ``positions``, ``max_chunk_mb``, ``edits``, ``progress``,
    ``shared_prefix``). Runs without
    autograd: nothing of the lens is differentiated, and a graph kept alive by the per-cell
    statistics would hold every chunk's logits.
    """
    _check_variant_options(variants, options)
    tuned = options.get("tuned")
    names = residual_points(hooked, options.get("prefix", "lm"))
    unembed = Unembed(hooked)
    keep_large_blocks_mapped()
    k = options.get("k", 5)
    check_count("k", k, 1, unembed.vocab_size, "k top tokens are kept per cell, at most the vocabulary")
    edits = options.get("edits", ())
    cache, forward = record_points(
        hooked,
        inputs,
        names,
        [edits] if isinstance(edits, Edit) else list(edits),
        shared_prefix=options.get("shared_prefix", True),
    )
    spans = hooked.spans(inputs)
    hidden = torch.stack([cache[n] for n in names])  # Float[layer, b, pos, d]
    target_ids = _targets(hooked, options.get("targets"), hidden.shape[1], hidden.device)
    decoded = spans.mask(options.get("positions")) & spans.valid
    stats = _decode_cells(
        _Reader(unembed),
        list(variants),
        hidden,
        decoded.to(hidden.device),
        k,
        target_ids,
        tuned,
        options.get("max_chunk_mb", 256.0),
        options.get("progress", False),
    )
    shared = {
        "layers": layer_labels(hooked, options.get("prefix", "lm")),
        "hooks": names,
        "cosine_to_previous": _cosine_to_previous(hidden, decoded.cpu()),
        "target_ids": None if target_ids is None else target_ids.cpu(),
        "tokens": hooked.position_labels(inputs, spans),
        "modalities": spans.modality_of_positions(),
        "spans": spans,
        "decode": hooked.token_strings,
        "decoded": decoded.cpu(),
        "forward": forward,
    }
    out = {}
    for variant in variants:
        full = {key: _scatter(values, decoded.cpu(), hidden.shape[1:3]) for key, values in stats[variant].items()}
        out[variant] = LensResult(
            lens="tuned" if tuned is not None else _LENS_NAMES[variant],
            top_ids=full["ids"],
            top_probs=full["probs"],
            entropy=full["entropy"],
            kl_to_final=full["kl"],
            target_probs=full.get("tprob"),
            target_ranks=full.get("trank"),
            **shared,
        )
    return out


def _check_variant_options(variants: Sequence[FinalNorm], options: Mapping[str, Any]) -> None:
    """Raise on options :func:`logit_lens` does not take, unknown variants, or a tuned lens with a raw variant."""
    keywords = {"k", "targets", "tuned", "prefix", "positions", "max_chunk_mb", "edits", "progress", "shared_prefix"}
    unknown = sorted(set(options) - keywords)
    if unknown:
        raise TypeError(f"logit_lens_variants got unknown options {unknown}; it takes logit_lens's keywords")
    bad = [v for v in variants if v not in (True, False, "naive")]
    if bad or not variants:
        raise ValueError(f"final_norm variants must be True, False or 'naive', got {list(variants)!r}")
    if options.get("tuned") is not None and any(v is not True for v in variants):
        raise ValueError(
            f"a tuned lens decodes through the final norm; got final_norm variants {list(variants)!r} (use True)"
        )


FinalNorm = bool | Literal["naive"]
"""The logit-lens variant: final norm at every layer (True), at none (False), or at the last only ("naive")."""

_LENS_NAMES: dict[Any, str] = {True: "logit", False: "logit-raw", "naive": "logit-naive"}


class _Reader:
    """Residual vectors -> logits, read through the final norm (``normed=True``) or not."""

    def __init__(self, unembed: Unembed):
        self.unembed = unembed

    def __call__(self, h: Tensor, normed: bool) -> Tensor:
        return self.unembed(h) if normed else self.unembed.unembed(h)

    @staticmethod
    def normed(variant: FinalNorm, last: bool) -> bool:
        """Whether ``variant`` reads a layer through the final norm (``last``: the final layer)."""
        return variant is True or (last and variant == "naive")


def _decode_cells(
    reader: _Reader,
    variants: list[FinalNorm],
    hidden: Tensor,
    where: Tensor,
    k: int,
    target_ids: Tensor | None,
    tuned: TunedLens | None,
    max_chunk_mb: float,
    progress: bool = False,
) -> dict[FinalNorm, dict[str, Tensor]]:
    """Decode the residual vectors ``hidden`` Float[layer, b, pos, d] at the cells ``where`` Bool[b, pos]
    under each variant; per variant, each statistic as [layer, cells, ...] on the CPU.

    Cells are taken in chunks whose logits fit ``max_chunk_mb``. Per chunk, each final-layer reading
    (normed or raw) is computed once; per layer, each distinct reading once, with its own statistics
    (top-k, entropy, targets); only the KL to the final layer is per variant."""
    n_layer = hidden.shape[0]
    picked = hidden[:, where]
    n_cells = picked.shape[1]
    cell_batch = where.nonzero()[:, 0]
    final_readings = sorted({_Reader.normed(v, True) for v in variants})
    readings = sorted({_Reader.normed(v, False) for v in variants})
    vocab = reader(picked[-1, :1], True).shape[-1]
    per_chunk = max(1, int(max_chunk_mb * 2**20 // (vocab * 4 * (3 * len(readings) + 2 * len(final_readings)))))
    keys = ("ids", "probs", "entropy", "kl", "tprob", "trank")
    out = {v: {key: [[] for _ in range(n_layer)] for key in keys} for v in variants}
    chunks = range(0, n_cells, per_chunk)
    for start in tqdm(chunks, desc="logit lens: decoding", unit="chunk", disable=not progress, leave=False):
        cells = slice(start, min(start + per_chunk, n_cells))
        targets = target_ids[cell_batch[cells]] if target_ids is not None else None
        finals = {normed: _Distribution(reader(picked[-1, cells], normed)) for normed in final_readings}
        for layer in range(n_layer):
            last = layer == n_layer - 1
            if last:
                decoded = finals
            else:
                h = picked[layer, cells]
                if tuned is not None:
                    h = tuned.translate(h, torch.full((h.shape[0],), layer, device=h.device))
                decoded = {normed: _Distribution(reader(h, normed)) for normed in readings}
            own = {normed: dist.statistics(k, targets) for normed, dist in decoded.items()}
            for v in variants:
                this = _Reader.normed(v, last)
                kl = decoded[this].kl_from(finals[_Reader.normed(v, True)])
                for key, value in {**own[this], "kl": kl}.items():
                    out[v][key][layer].append(value)
    return {
        v: {
            key: torch.stack([torch.cat(chunks) for chunks in by_layer]).cpu()
            for key, by_layer in stats.items()
            if by_layer[0]
        }
        for v, stats in out.items()
    }


_EXP_FLOOR = -80.0
"""Log-probabilities below this get probability 0 (exp(-80) = 1.8e-35; what they would add to an
entropy or KL is below float32's resolution): torch's exp is several times slower on arguments whose
result is subnormal, which raw-lens logits (spread over hundreds of nats) produce for most tokens."""


class _Distribution:
    """One reading's logits Float[cells, vocab] with their log-softmax and probabilities."""

    def __init__(self, logits: Tensor):
        self.logits = logits.float()
        self.logp = self.logits.log_softmax(-1)
        self.probs = self.logp.clamp_min(_EXP_FLOOR).exp_().masked_fill_(self.logp < _EXP_FLOOR, 0.0)

    def statistics(self, k: int, targets: Tensor | None) -> dict[str, Tensor]:
        """Top-k ids and probabilities, entropy (nats) and, with ``targets`` Long[cells, n], the
        targets' probabilities and ranks."""
        top_logp, top_i = self.logp.topk(k, dim=-1)  # by log-probability: no ties among underflowed tokens
        stats = {"ids": top_i, "probs": top_logp.exp(), "entropy": -torch.linalg.vecdot(self.probs, self.logp)}
        if targets is not None:
            stats["tprob"] = self.probs.gather(-1, targets)
            stats["trank"] = (self.logits[..., None, :] > self.logits.gather(-1, targets)[..., None]).sum(-1)
        return stats

    def kl_from(self, final: _Distribution) -> Tensor:
        """KL(final || this) per cell, in nats (clamped at 0 against round-off)."""
        return torch.linalg.vecdot(final.probs, final.logp - self.logp).clamp_min(0.0)


def _scatter(values: Tensor, decoded: Tensor, shape: tuple[int, int]) -> Tensor:
    """Per-cell values [layer, cells, ...] -> [layer, b, pos, ...], ``-1`` / NaN at cells not decoded."""
    fill = -1 if values.dtype == torch.long else float("nan")
    full = torch.full((values.shape[0], *shape, *values.shape[2:]), fill, dtype=values.dtype)
    full[:, decoded] = values
    return full


def _cosine_to_previous(hidden: Tensor, decoded: Tensor) -> Tensor:
    """Float[layer, b, pos]: cosine of each residual vector with the previous layer's (NaN for the
    first layer and at cells not decoded)."""
    n_layer, b, pos, _ = hidden.shape
    cosine = torch.full((n_layer, b, pos), float("nan"))
    picked = hidden[:, decoded.to(hidden.device)].float()  # only the decoded cells: [layer, cells, d]
    cosine[1:, decoded] = F.cosine_similarity(picked[1:], picked[:-1], dim=-1).cpu()
    return cosine


# -- cross-modal decodings --------------------------------------------------------------------------


def _embedding_matrix(hooked: HookedModel) -> Tensor:
    if "lm.embed" not in hooked.hook_points:
        raise KeyError(
            f"nearest-token decoding needs the LM's input embedding (hook point 'lm.embed'), which adapter "
            f"{hooked.adapter.name!r} does not define"
        )
    module = get_module(hooked.model, hooked.hook_points["lm.embed"].site.module)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise TypeError(f"'lm.embed' is a {type(module).__name__} without a [vocab, d] weight matrix")
    return weight


@torch.no_grad()
def nearest_tokens(hooked: HookedModel, vectors: Tensor, k: int = 5) -> tuple[Tensor, Tensor]:
    """The ``k`` rows of the LM's input-embedding matrix closest to each vector by cosine.

    Args:
        vectors: Float[..., d] in the LM's input space.

    Returns:
        ``(ids, cosines)``, both ``[..., k]``, best first.
    """
    weight = _embedding_matrix(hooked)
    if vectors.shape[-1] != weight.shape[1]:
        raise ValueError(f"vectors have width {vectors.shape[-1]} but the LM's embeddings have width {weight.shape[1]}")
    unit_rows = F.normalize(weight.float(), dim=-1)
    sims = F.normalize(vectors.float().to(weight.device), dim=-1) @ unit_rows.T
    cos, ids = sims.topk(k, dim=-1)
    return ids.cpu(), cos.cpu()


def _nearest_table(hooked: HookedModel, vectors: Tensor, k: int, index: dict[str, list]) -> pd.DataFrame:
    ids, cos = nearest_tokens(hooked, vectors, k)
    decode = hooked.token_strings
    rows = []
    for i in range(ids.shape[0]):
        texts = decode(ids[i].tolist())
        for rank in range(k):
            rows.append(
                {
                    **{key: values[i] for key, values in index.items()},
                    "rank": rank,
                    "token_id": int(ids[i, rank]),
                    "token": texts[rank],
                    "cosine": float(cos[i, rank]),
                }
            )
    return pd.DataFrame(rows)


@torch.no_grad()
def decode_soft_tokens(
    hooked: HookedModel, inputs: Mapping[str, Any], modality: str | None = None, k: int = 5
) -> pd.DataFrame:
    """Nearest vocabulary tokens of each non-text position of the LM's input (``fusion.embeds``).

    Returns a table with one row per (input, position, rank): ``input, position, modality, rank,
    token_id, token, cosine``. ``modality`` restricts to one span (default: every non-text span).
    """
    if "fusion.embeds" not in hooked.hook_points:
        raise KeyError(f"adapter {hooked.adapter.name!r} has no 'fusion.embeds' point (the LM's fused input)")
    run = hooked.run(inputs, cache="fusion.embeds")
    spans = run.spans
    wanted = [modality] if modality else [m for m in spans.modalities if m != "text"]
    for m in wanted:
        if m not in spans.masks:
            raise KeyError(f"span {m!r} is not in these inputs; spans here: {spans.modalities}")
    embeds = run.cache["fusion.embeds"]
    index: dict[str, list] = {"input": [], "position": [], "modality": []}
    picked = []
    for m in wanted:
        for row, p in spans.masks[m].nonzero().tolist():
            index["input"].append(row)
            index["position"].append(p)
            index["modality"].append(m)
            picked.append(embeds[row, p])
    if not picked:
        raise ValueError(f"no positions of {wanted} in these inputs")
    table = _nearest_table(hooked, torch.stack(picked), k, index)
    return table.sort_values(["input", "position", "rank"], ignore_index=True)


@torch.no_grad()
def decode_encoder_layers(
    hooked: HookedModel, inputs: Mapping[str, Any], k: int = 5, prefix: str | None = None
) -> pd.DataFrame:
    """Each encoder layer's output pushed through the projector into the LM's input space
    (``Adapter.project_encoder``) and read by its nearest vocabulary tokens.

    Returns a table with one row per (layer, item, token slot, rank): ``layer, item`` (image or
    prompt), ``slot`` (the soft token's index among that item's), ``rank, token_id, token, cosine``.
    """
    project = hooked.adapter.project_encoder
    if project is None:
        raise ValueError(
            f"adapter {hooked.adapter.name!r} does not say how encoder outputs reach the LM "
            "(set Adapter.project_encoder)"
        )
    encoder_prefixes = sorted(
        {hp.prefix for hp in hooked.hook_points.values() if hp.stage == "encoder" and hp.layer is not None}
    )
    if prefix is None:
        if len(encoder_prefixes) != 1:
            raise ValueError(f"{hooked.name} has encoder stacks {encoder_prefixes}; pass prefix= to choose one")
        prefix = encoder_prefixes[0]
    names = [n for n in residual_points(hooked, prefix) if hooked.hook_points[n].kind != "resid_pre"]
    run = hooked.run(inputs, cache=names)
    model_inputs = hooked.check_inputs(inputs)
    tables = []
    for name in names:
        tokens = project(hooked.model, model_inputs, run.cache[name])
        n_items, n_slots, _ = tokens.shape
        index = {
            "layer": [hooked.hook_points[name].layer] * (n_items * n_slots),
            "item": [i for i in range(n_items) for _ in range(n_slots)],
            "slot": [s for _ in range(n_items) for s in range(n_slots)],
        }
        tables.append(_nearest_table(hooked, tokens.reshape(n_items * n_slots, -1), k, index))
    return pd.concat(tables, ignore_index=True)


# -- tuned lens -------------------------------------------------------------------------------------


class TunedLens(nn.Module):
    """Belrose et al. (2023): one affine translator per layer, ``h -> h + A_l h + b_l`` (identity at
    initialisation), trained so that ``unembed(final_norm(translator_l(h_l)))`` matches the final
    layer's distribution (KL(final || lens)). The final layer keeps no translator.

    Args:
        d_model: residual width ``d``.
        n_layers: number of residual layers decoded (``L + 1`` rows, as in :class:`LensResult`).
    """

    def __init__(self, d_model: int, n_layers: int):
        super().__init__()
        self.d_model = d_model
        self.n_layers = n_layers
        self.translators = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(n_layers - 1))
        self.history: dict[str, list[float]] = {}
        for t in self.translators:
            nn.init.zeros_(t.weight)
            nn.init.zeros_(t.bias)

    def translate(self, h: Tensor, layer_of_row: Tensor) -> Tensor:
        """Rows ``h`` Float[rows, ..., d] of layers ``layer_of_row`` Long[rows] -> translated rows."""
        out = h.clone()
        for layer in layer_of_row.unique().tolist():
            if layer >= self.n_layers - 1:
                continue
            rows = layer_of_row == layer
            out[rows] = h[rows] + self.translators[layer](h[rows])
        return out

    def fit(
        self,
        hooked: HookedModel,
        batches: Iterable[Mapping[str, Any]],
        *,
        steps: int = 100,
        tokens_per_step: int = 64,
        lr: float = 1e-3,
        max_tokens: int = 4096,
        seed: int = 0,
        positions: Selector | Callable[[Mapping[str, Any]], Selector] = None,
        balance: bool = False,
        progress: bool = True,
    ) -> list[float]:
        """Train the translators on the recorded positions of ``batches`` (dicts of model inputs).

        Each step samples ``tokens_per_step`` recorded positions and sums the KL over all layers;
        Adam with learning rate ``lr``. ``positions`` picks the positions to train on (a span
        selector, or a function of a batch returning one; default every real position);
        ``balance`` draws every modality equally often per step (a lens trained on pooled
        positions otherwise learns mostly the majority modality). Returns the loss per step (nats,
        summed over layers); :attr:`history` keeps it with the per-modality terms (``kl_<modality>``).
        """
        names = residual_points(hooked)
        if len(names) != self.n_layers:
            raise ValueError(
                f"this tuned lens has {self.n_layers} layers but {hooked.name} has {len(names)} residual layers"
            )
        decoder = Unembed(hooked)
        keep_large_blocks_mapped()
        hidden, groups, modalities = self._record(hooked, batches, names, positions, progress)
        generator = torch.Generator().manual_seed(seed)
        if hidden.shape[1] > max_tokens:
            keep = torch.randperm(hidden.shape[1], generator=generator)[:max_tokens]
            hidden, groups = hidden[:, keep], groups[keep]
        self.to(hidden.device)
        for p in decoder.norm.parameters():
            p.requires_grad_(False)
        layers = torch.arange(self.n_layers - 1, device=hidden.device)

        def step(rows: Tensor, index: int) -> dict[str, Tensor]:
            h = hidden[:, rows.to(hidden.device)]
            with torch.no_grad():
                target = decoder(h[-1]).float().log_softmax(-1)
            logp = decoder(self.translate(h[:-1], layers)).float().log_softmax(-1)
            kl = (target.exp() * (target - logp)).sum(-1)  # Float[layer, rows]
            terms = {f"kl_{m}": kl[:, groups[rows] == g].mean(-1).sum().detach() for g, m in enumerate(modalities)}
            return {"loss": kl.mean(-1).sum(), **terms}

        order = (
            StratifiedRowOrder(groups, tokens_per_step, generator)
            if balance
            else RowOrder(hidden.shape[1], tokens_per_step, generator, replacement=True)
        )
        self.history = fit(
            step, self.parameters(), steps=steps, lr=lr, order=order, progress=progress, desc="tuned lens"
        ).history
        return self.history.get("loss", [])

    @staticmethod
    def _record(
        hooked: HookedModel,
        batches: Iterable[Mapping[str, Any]],
        names: list[str],
        positions: Selector | Callable[[Mapping[str, Any]], Selector],
        progress: bool,
    ) -> tuple[Tensor, Tensor, list[str]]:
        """Residuals Float[layer, cells, d] at the picked positions of every batch, each cell's
        modality index Long[cells] and the modality names."""
        stacks, labels = [], []
        with torch.no_grad():
            for inputs in tqdm(batches, desc="tuned lens: recording", unit="batch", disable=not progress):
                cache, _ = record_points(hooked, inputs, names)
                spans = hooked.spans(inputs)
                picked = spans.mask(positions(inputs) if callable(positions) else positions) & spans.valid
                hidden = torch.stack([cache[n] for n in names])
                stacks.append(hidden[:, picked.to(hidden.device)])
                of = spans.modality_of_positions()
                labels += [of[r][p] for r, p in picked.nonzero().tolist()]
        modalities = sorted(set(labels))
        groups = torch.tensor([modalities.index(m) for m in labels], dtype=torch.long)
        return torch.cat(stacks, dim=1).float(), groups, modalities

    def save(self, path: str | Path) -> Path:
        """Write the translators (``.pt``) and their shape (``.json`` beside it)."""
        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save(self.state_dict(), tmp)
        write_json(path.with_suffix(".json"), {"d_model": self.d_model, "n_layers": self.n_layers})
        return path

    @classmethod
    def load(cls, path: str | Path) -> TunedLens:
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        lens = cls(meta["d_model"], meta["n_layers"])
        lens.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return lens

    @classmethod
    def for_model(cls, hooked: HookedModel) -> TunedLens:
        """An identity-initialised tuned lens sized for ``hooked``'s language model."""
        names = residual_points(hooked)
        d = getattr(Unembed(hooked).norm, "weight", None)
        if d is None:
            raise TypeError("cannot infer the residual width from the final norm; use TunedLens(d_model, n_layers)")
        return cls(d.shape[0], len(names)).to(hooked.device)


def compare_lenses(logit: LensResult, tuned: LensResult, exclude_first: bool = True) -> pd.DataFrame:
    """Mean KL to the final layer per modality and layer for both lenses on the same inputs, and
    the fraction by which the tuned lens lowers it: ``modality, layer, layer_label, kl_logit,
    kl_tuned, reduction``."""
    if logit.top_ids.shape != tuned.top_ids.shape:
        raise ValueError("the two results decode different inputs (shapes differ); run both lenses on the same batch")
    rows = []
    for m in logit.spans.modalities:
        mask = modality_mask(logit, m, exclude_first)
        if not mask.any():
            continue
        for i, label in enumerate(logit.layers[:-1]):
            a = float(logit.kl_to_final[i][mask].mean())
            t = float(tuned.kl_to_final[i][mask].mean())
            rows.append(
                {
                    "modality": m,
                    "layer": i,
                    "layer_label": label,
                    "kl_logit": a,
                    "kl_tuned": t,
                    "reduction": 1 - t / a if a > 0 else float("nan"),
                }
            )
    return pd.DataFrame(rows)


def modality_mask(result: LensResult, modality: str, exclude_first: bool) -> Tensor:
    """Bool[b, pos]: the decoded positions of ``modality``, without each row's first real position
    when ``exclude_first``."""
    spans = result.spans
    mask = spans.masks[modality].cpu() & result.decoded
    if exclude_first:
        first = spans.valid.cpu().float().argmax(1)
        mask[torch.arange(mask.shape[0]), first] = False
    return mask


__all__: Sequence[str] = (
    "LensResult",
    "TunedLens",
    "compare_lenses",
    "decode_encoder_layers",
    "decode_soft_tokens",
    "logit_lens",
    "logit_lens_variants",
    "modality_mask",
    "nearest_tokens",
    "residual_points",
)
