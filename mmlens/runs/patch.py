"""Config-driven, resumable patching runs: what ``mmlens patch CONFIG`` runs.

A config file (TOML, YAML or JSON; see :mod:`mmlens.runs.config`) names a model, input pairs (or
rows of the model's example inputs), an optional corruption, the sweep and the metric::

    [model]
    name = "smollm2-135m-instruct"        # registry name, hub id or folder; device, dtype optional
    [inputs]
    pairs = [{ clean = "...John gave a drink to", corrupted = "...Mary gave a drink to" }]
    # or: example = [0]                   # rows of the model's example_inputs() as clean inputs
    [corruption]                          # for pairs without an explicit corrupted input
    modality = "image"                    # method = "neutral" | "noise" | "swap"; noise = 3.0; swap_row
    [patch]
    hook = "resid_pre"                    # axes, direction, batch_size, layers, replay, skip_unchanged
    [metric]
    kind = "logit_diff"                   # answer/wrong; "logprob"/"prob" with target; or "kl"
    answer = " Mary"
    wrong = " John"
    [output]
    dir = "runs/patch_smollm2"            # format = "csv" | "parquet"; plots; plot_value
    seed = 0                              # top level: model seed (tiny random models) and noise seed

:meth:`PatchConfig.from_file` parses and checks the file without the model (every error names its
field as a dotted path, e.g. ``metric.kind``); :func:`prepare` loads the model and checks what
needs it (hook names, layers, single-token answers, equal token counts); :func:`run_patch` runs the
sweep in chunks (one per input pair and, for block points swept over layers, per layer: each is one
:func:`mmlens.methods.patching.sweep` call with the layer's full hook name) and adds every finished
chunk to ``chunks.jsonl`` in the output folder (a :class:`mmlens.runs.record.Record`). A rerun with
the same config continues after the last finished chunk; a different config in the same folder is
refused unless ``overwrite=True``.

Output folder: ``results.csv`` (or ``.parquet``; the table of :class:`mmlens.methods.patching.SweepResult`),
``meta.json`` (config, its hash, versions, seed, timings, baseline metrics per pair, chunk counts),
``heatmap_pair{i}.png`` / ``.svg`` and ``chunks.jsonl`` (the resumable record).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pandas as pd
from pydantic import AfterValidator, BeforeValidator, Field, StrictBool, StrictStr
from pydantic_core import PydanticCustomError

from mmlens.core.adapter import HookPoint
from mmlens.core.wrapper import HookedModel
from mmlens.data.images import GENERATED, image_problem
from mmlens.data.loading import LoadedModel, tokenizer_of
from mmlens.methods.patching import (
    AXES,
    Corruption,
    SweepResult,
    check_same_layout,
    corrupt,
    logit_diff,
    logprob,
    prob,
    sweep,
)
from mmlens.methods.patching import points as hook_points
from mmlens.plots import plot_patching, save_figure
from mmlens.runs.config import (
    ConfigError,
    Count,
    Folder,
    Index,
    ModelConfig,
    Number,
    Rows,
    RunConfig,
    Section,
    Token,
    encode_text,
)
from mmlens.runs.executors import Executor, RayExecutor, SerialExecutor, compute_missing
from mmlens.runs.record import Record, ResumeError
from mmlens.store import atomic_path, atomic_write, output_lock, versions

CHUNKS_FILE = "chunks.jsonl"
META_FILE = "meta.json"
FORMATS = ("csv", "parquet")
METRIC_TOKENS = {"logit_diff": ("answer", "wrong"), "logprob": ("target",), "prob": ("target",), "kl": ()}
"""The tokens each metric kind takes."""


# --- the config ------------------------------------------------------------------------------------


def _axes(axes: tuple[str, ...]) -> tuple[str, ...]:
    if axes not in AXES:
        valid = ", ".join(str(list(a)) for a in sorted(AXES))
        raise PydanticCustomError(
            "axes",
            "{axes} is not a supported combination; use one of {valid}",
            {"axes": str(list(axes)), "valid": valid},
        )
    return axes


def _distinct_sorted(layers: tuple[int, ...]) -> tuple[int, ...]:
    if len(set(layers)) != len(layers):
        raise PydanticCustomError("repeated", "has repeated layers: {layers}", {"layers": str(list(layers))})
    return tuple(sorted(layers))


class PairConfig(Section):
    """One clean/corrupted pair. Texts go through the tokenizer (or, with an image, the processor);
    ``image`` / ``corrupted_image`` are ``generated:COLOR[-SHAPE]`` or a file path (relative paths
    from the config file's folder). Without ``corrupted``/``corrupted_image`` the [corruption]
    section makes the corrupted input. ``answer``/``wrong``/``target`` override the [metric] ones."""

    clean: StrictStr
    corrupted: StrictStr | None = None
    image: StrictStr | None = None
    corrupted_image: StrictStr | None = None
    answer: Token | None = None
    wrong: Token | None = None
    target: Token | None = None

    @property
    def explicit(self) -> bool:
        """Whether the pair gives its corrupted input."""
        return self.corrupted is not None or self.corrupted_image is not None


class PatchInputs(Section):
    """``[inputs]``: exactly one of ``pairs`` and ``example`` (rows of the model's ``example_inputs()``)."""

    pairs: Annotated[tuple[PairConfig, ...], Field(min_length=1)] = ()
    example: Rows = ()


class CorruptionConfig(Section):
    """``[corruption]``: how to corrupt ``modality`` for pairs without a corrupted input."""

    modality: StrictStr
    method: Literal["neutral", "noise", "swap"] = "neutral"
    noise: Annotated[Number, Field(gt=0)] = 3.0
    swap_row: Index | None = None


class SweepConfig(Section):
    """``[patch]``: the arguments of :func:`mmlens.methods.patching.sweep`, and which layers."""

    hook: StrictStr = "resid_pre"
    axes: Annotated[
        tuple[StrictStr, ...], BeforeValidator(lambda v: [v] if isinstance(v, str) else v), AfterValidator(_axes)
    ] = ("layer", "position")
    direction: Literal["denoise", "noise"] = "denoise"
    batch_size: Count = 8
    layers: Annotated[Rows, AfterValidator(_distinct_sorted)] | None = None
    replay: StrictBool = True
    skip_unchanged: StrictBool = True


class MetricConfig(Section):
    """``[metric]``: the metric kind and its tokens (single-token strings or token ids)."""

    kind: Literal["logit_diff", "logprob", "prob", "kl"]
    answer: Token | None = None
    wrong: Token | None = None
    target: Token | None = None


class OutputConfig(Section):
    """``[output]``: where the results go, in which format, and the heatmaps."""

    dir: Folder
    format: Literal["csv", "parquet"] = "csv"
    plots: StrictBool = True
    plot_value: Literal["normalized", "value"] = "normalized"


class PatchConfig(RunConfig):
    """A ``mmlens patch`` config file (module docstring)."""

    model: ModelConfig
    inputs: PatchInputs
    patch: SweepConfig = SweepConfig()
    metric: MetricConfig
    output: OutputConfig
    corruption: CorruptionConfig | None = None

    def input_files(self) -> dict[str, Path]:
        """The image files of the pairs."""
        specs = [s for p in self.inputs.pairs for s in (p.image, p.corrupted_image) if s is not None]
        return {s: self.resolve(s) for s in specs if not s.startswith(GENERATED)}

    def check(self) -> None:
        """Rules across fields: one source of inputs, images that exist, one corruption source per
        pair, the metric's tokens, a parquet engine."""
        if bool(self.inputs.pairs) == bool(self.inputs.example):
            raise ConfigError(
                "inputs",
                "give exactly one of inputs.pairs (a list of {clean = ..., corrupted = ...}) "
                "and inputs.example (rows of the model's example inputs, e.g. [0])",
            )
        for i, pair in enumerate(self.inputs.pairs):
            if pair.corrupted_image is not None and pair.image is None:
                raise ConfigError(
                    f"inputs.pairs[{i}].corrupted_image", "needs an image for the clean input too (set image)"
                )
            for key in ("image", "corrupted_image"):
                problem = image_problem(getattr(pair, key), self.folder) if getattr(pair, key) else None
                if problem:
                    raise ConfigError(f"inputs.pairs[{i}].{key}", problem)
        _check_corruption(self)
        _check_metric_tokens(self)
        if self.output.format == "parquet" and not has_parquet_engine():
            raise ConfigError(
                "output.format",
                "'parquet' needs pyarrow or fastparquet, and neither is installed "
                "(pip install pyarrow); or use format = 'csv'",
            )


def has_parquet_engine() -> bool:
    """Whether pandas can write parquet here."""
    return any(importlib.util.find_spec(m) is not None for m in ("pyarrow", "fastparquet"))


def _check_corruption(config: PatchConfig) -> None:
    """Every pair has one corruption source, and the [corruption] options fit its method."""
    c, inputs = config.corruption, config.inputs
    if c is not None:
        if "noise" in c.model_fields_set and c.method != "noise":
            raise ConfigError("corruption.noise", f"only applies to method = 'noise' (method is {c.method!r})")
        if c.swap_row is not None and c.method != "swap":
            raise ConfigError("corruption.swap_row", f"only applies to method = 'swap' (method is {c.method!r})")
        if c.method == "swap" and c.swap_row is None:
            raise ConfigError(
                "corruption.swap_row",
                "method = 'swap' needs the example row whose modality is swapped in (an integer >= 0)",
            )
    if inputs.example:
        if c is None:
            raise ConfigError(
                "corruption",
                "inputs.example gives clean inputs only; add a [corruption] section "
                "(modality, method) to make the corrupted ones",
            )
        return
    if c is not None and c.method == "swap":
        raise ConfigError(
            "corruption.method",
            "'swap' works with inputs.example (and corruption.swap_row); with "
            "inputs.pairs, give the swapped input as corrupted / corrupted_image",
        )
    users = [i for i, p in enumerate(inputs.pairs) if not p.explicit]
    if users and c is None:
        raise ConfigError(
            f"inputs.pairs[{users[0]}].corrupted",
            "missing: give corrupted (text) or corrupted_image, or add a [corruption] section",
        )
    if c is not None and not users:
        raise ConfigError("corruption", "no pair uses it (every pair gives its corrupted input); remove the section")


def _check_metric_tokens(config: PatchConfig) -> None:
    """The metric has the tokens it needs (in [metric] or on every pair) and no others."""
    metric, inputs = config.metric, config.inputs
    needs = METRIC_TOKENS[metric.kind]
    for key in ("answer", "wrong", "target"):
        where = [("metric", getattr(metric, key))] + [
            (f"inputs.pairs[{i}]", getattr(p, key)) for i, p in enumerate(inputs.pairs)
        ]
        for path, value in where:
            if value is not None and key not in needs:
                wanted = " and ".join(needs) if needs else "no tokens"
                raise ConfigError(f"{path}.{key}", f"metric.kind = {metric.kind!r} takes {wanted}, not {key}")
        if key not in needs or getattr(metric, key) is not None:
            continue
        missing = [i for i, p in enumerate(inputs.pairs) if getattr(p, key) is None]
        if inputs.example or len(missing) == len(inputs.pairs):
            field = f"metric.{key}"
        elif missing:
            field = f"inputs.pairs[{missing[0]}].{key}"
        else:
            continue
        raise ConfigError(
            field,
            f"missing: metric.kind = {metric.kind!r} needs {' and '.join(needs)} (each a "
            "single-token string or a token id), in [metric] or on every pair",
        )


# --- preparing: the model-dependent checks ------------------------------------------------------------


@dataclass
class PreparedPair:
    """One pair's model inputs, corruption and metric."""

    clean: dict
    corrupted: dict | Corruption
    metric: Callable | str
    metric_tokens: dict[str, dict]
    corruption: str


@dataclass
class Chunk:
    """One unit of work: all cells of ``pair`` at ``hook`` (a full name for one layer, or the config's hook)."""

    key: str
    pair: int
    layer: int | None
    hook: str


@dataclass
class Prepared:
    """A config with its model loaded, its pairs built and its chunks planned."""

    config: PatchConfig
    loaded: LoadedModel
    hooked: HookedModel
    pairs: list[PreparedPair]
    chunks: list[Chunk]
    per_layer: bool
    add_layer_column: bool
    seconds: dict[str, float]


def prepare(config: PatchConfig) -> Prepared:
    """Load the model and build every pair's inputs and metric; raises :class:`ConfigError` (with the
    config file in the message) for what only the model can check."""
    try:
        start = time.perf_counter()
        loaded, hooked = config.model.load(config.seed)
        seconds = {"load_model": time.perf_counter() - start}
        start = time.perf_counter()
        points, per_layer = _resolve_hook(hooked, config.patch)
        pairs = _prepare_pairs(config, loaded, hooked, points)
        chunks = _plan_chunks(points, per_layer, len(pairs))
        seconds["prepare_inputs"] = time.perf_counter() - start
    except ConfigError as err:
        raise err.with_source(config.source) from None
    # sweep labels the layer of a lone point only when "layer" is an axis, a multi-layer sweep always
    add_layer = per_layer and "layer" not in config.patch.axes
    return Prepared(config, loaded, hooked, pairs, chunks, per_layer, add_layer, seconds)


def _resolve_hook(hooked: HookedModel, patch: SweepConfig) -> tuple[list[HookPoint], bool]:
    """The hook points to patch, and whether they are one block point swept over (a subset of) layers."""
    try:
        points = hook_points(hooked, patch.hook)
    except (KeyError, ValueError) as err:
        kinds = sorted(
            {
                f"{hp.prefix}.{hp.kind}" if hp.prefix != "lm" else hp.kind
                for hp in hooked.hook_points.values()
                if hp.layer is not None
            }
        )
        raise ConfigError(
            "patch.hook",
            f"{patch.hook!r} is not a hook point of {hooked.name}: {_message(err)}. Block "
            f"points swept over layers: {', '.join(kinds)}; full names: `mmlens hooks "
            f"{hooked.name}`",
        ) from None
    if "head" in patch.axes and not all(hp.heads for hp in points):
        raise ConfigError(
            "patch.axes", f"a head axis needs a per-head point (e.g. hook = 'z'); {patch.hook!r} has none"
        )
    if patch.layers is None:
        return points, len(points) > 1
    available = [hp.layer for hp in points if hp.layer is not None]
    if len(points) < 2 and not available:
        raise ConfigError(
            "patch.layers",
            f"hook {patch.hook!r} is a single point without layers; patch.layers "
            "applies to block points swept over layers (e.g. 'resid_pre')",
        )
    bad = [layer for layer in patch.layers if layer not in available]
    if bad:
        raise ConfigError(
            "patch.layers",
            f"layers {bad} do not exist for hook {patch.hook!r}; it has layers {min(available)}..{max(available)}",
        )
    return [hp for hp in points if hp.layer in patch.layers], patch.hook not in hooked.hook_points


def _message(err: Exception) -> str:
    return err.args[0] if isinstance(err, KeyError) and err.args else str(err)


def _plan_chunks(points: list[HookPoint], per_layer: bool, n_pairs: int) -> list[Chunk]:
    """One chunk per pair and layer when the hook is a block point swept over layers, else one per pair."""
    chunks = []
    for pair in range(n_pairs):
        if per_layer:
            chunks += [Chunk(f"pair{pair}/layer{hp.layer}", pair, hp.layer, hp.name) for hp in points]
        else:
            chunks.append(Chunk(f"pair{pair}", pair, points[0].layer, points[0].name))
    return chunks


def _prepare_pairs(
    config: PatchConfig, loaded: LoadedModel, hooked: HookedModel, points: list[HookPoint]
) -> list[PreparedPair]:
    if config.inputs.example:
        return _example_pairs(config, loaded, hooked, points)
    out = []
    for i, pair in enumerate(config.inputs.pairs):
        path = f"inputs.pairs[{i}]"
        clean = encode_text(loaded, pair.clean, pair.image, config.folder, (f"{path}.clean", f"{path}.image"))
        if pair.explicit:
            text = pair.corrupted if pair.corrupted is not None else pair.clean
            image = pair.corrupted_image if pair.corrupted_image is not None else pair.image
            corrupted = encode_text(
                loaded, text, image, config.folder, (f"{path}.corrupted", f"{path}.corrupted_image")
            )
        else:
            corrupted = _make_corruption(config, hooked, clean, None, path)
        out.append(_finish_pair(config, loaded, hooked, points, clean, corrupted, pair, path))
    return out


def _example_pairs(
    config: PatchConfig, loaded: LoadedModel, hooked: HookedModel, points: list[HookPoint]
) -> list[PreparedPair]:
    """Pairs from rows of the model's example inputs, corrupted as [corruption] says."""
    example = loaded.example_inputs()
    n = hooked.spans(example).batch_size
    c = config.corruption
    for field, row in [(f"inputs.example[{i}]", r) for i, r in enumerate(config.inputs.example)] + [
        ("corruption.swap_row", c.swap_row)
    ]:
        if row is not None and row >= n:
            raise ConfigError(
                field, f"row {row} does not exist: {loaded.name}'s example inputs have {n} rows (0..{n - 1})"
            )
    other = hooked.rows(example, c.swap_row) if c.swap_row is not None else None
    out = []
    for i, r in enumerate(config.inputs.example):
        clean = hooked.rows(example, r)
        corrupted = _make_corruption(config, hooked, clean, other, f"inputs.example[{i}]")
        out.append(_finish_pair(config, loaded, hooked, points, clean, corrupted, None, f"inputs.example[{i}]"))
    return out


def _make_corruption(
    config: PatchConfig, hooked: HookedModel, clean: dict, other: dict | None, path: str
) -> Corruption:
    c = config.corruption
    modalities = hooked.spans(clean).modalities
    if c.modality not in modalities:
        raise ConfigError(
            "corruption.modality",
            f"{c.modality!r} is not in the inputs of {path}; modalities there: {', '.join(modalities)}",
        )
    try:
        return corrupt(hooked, clean, c.modality, c.method, other=other, noise=c.noise, seed=config.seed)
    except KeyError as err:  # no neutral reference for this modality
        raise ConfigError("corruption.modality", _message(err)) from None
    except ValueError as err:  # swap rows with different layouts
        raise ConfigError("corruption.swap_row", str(err)) from None


def _finish_pair(
    config: PatchConfig,
    loaded: LoadedModel,
    hooked: HookedModel,
    points: list[HookPoint],
    clean: dict,
    corrupted: dict | Corruption,
    pair: PairConfig | None,
    path: str,
) -> PreparedPair:
    corrupt_inputs = corrupted.inputs if isinstance(corrupted, Corruption) else corrupted
    if "span" not in config.patch.axes and any(hp.fused_positions for hp in points):
        try:
            check_same_layout(hooked.spans(clean), hooked.spans(corrupt_inputs))
        except ValueError as err:
            tokens = _tokens_of(loaded, clean), _tokens_of(loaded, corrupt_inputs)
            detail = f"\n  clean:     {tokens[0]}\n  corrupted: {tokens[1]}" if tokens[0] is not None else ""
            raise ConfigError(path, f"{err}{detail}") from None
    metric, tokens = _metric_for(config.metric, pair, loaded, path)
    description = corrupted.description if isinstance(corrupted, Corruption) else "given corrupted input"
    return PreparedPair(clean, corrupted, metric, tokens, description)


def _tokens_of(loaded: LoadedModel, inputs: dict) -> list[str] | None:
    tokenizer = tokenizer_of(loaded)
    if tokenizer is None or "input_ids" not in inputs:
        return None
    return tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())


def _metric_for(
    metric: MetricConfig, pair: PairConfig | None, loaded: LoadedModel, path: str
) -> tuple[Callable | str, dict]:
    if metric.kind == "kl":
        return "kl", {}
    ids, tokens = [], {}
    tokenizer = tokenizer_of(loaded)
    for key in METRIC_TOKENS[metric.kind]:
        own = getattr(pair, key) if pair is not None else None
        value = own if own is not None else getattr(metric, key)
        token_id = resolve_token(value, f"{path}.{key}" if own is not None else f"metric.{key}", loaded)
        ids.append(token_id)
        tokens[key] = {"id": token_id, "text": tokenizer.decode([token_id]) if tokenizer is not None else None}
    build = {"logit_diff": logit_diff, "logprob": logprob, "prob": prob}[metric.kind]
    return build(*ids), tokens


def resolve_token(value: str | int, where: str, loaded: LoadedModel) -> int:
    """A token id from an id or a string that the model's tokenizer makes into exactly one token;
    ConfigError at ``where`` otherwise."""
    unembed = loaded.model.get_output_embeddings() if hasattr(loaded.model, "get_output_embeddings") else None
    vocab = unembed.weight.shape[0] if unembed is not None else None
    if isinstance(value, int):
        if vocab is not None and value >= vocab:
            raise ConfigError(where, f"token id {value} is outside the vocabulary (0..{vocab - 1})")
        return value
    tokenizer = tokenizer_of(loaded)
    if tokenizer is None:
        raise ConfigError(
            where, f"{loaded.name} has no tokenizer, so {value!r} cannot be tokenized; give a token id (an integer)"
        )
    ids = tokenizer.encode(value, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ConfigError(
            where,
            f"{value!r} is {len(ids)} tokens {pieces} (ids {ids}), not one; pick a string that is "
            "a single token (often with a leading space) or give a token id",
        )
    return ids[0]


def describe(prepared: Prepared) -> str:
    """A short plan of a prepared run (what ``mmlens patch --check`` prints)."""
    config = prepared.config
    lines = [
        f"config {config.source} (hash {config.hash()}): valid",
        (
            f"model {config.model.name} ({prepared.hooked.name}), hook {config.patch.hook}, axes "
            f"{list(config.patch.axes)}, direction {config.patch.direction}"
        ),
        f"{len(prepared.pairs)} pair(s), {len(prepared.chunks)} chunk(s) -> {config.output.dir}",
    ]
    for i, pair in enumerate(prepared.pairs):
        n = prepared.hooked.spans(pair.clean).seq_len
        tokens = ", ".join(f"{k}={v['text']!r} (id {v['id']})" for k, v in pair.metric_tokens.items())
        lines.append(
            f"  pair {i}: {n} positions; corrupted: {pair.corruption}; metric {config.metric.kind}"
            + (f" [{tokens}]" if tokens else "")
        )
    return "\n".join(lines)


# --- running -------------------------------------------------------------------------------------


@dataclass
class PatchRun:
    """What :func:`run_patch` returns: the combined sweep, where it went, and what was reused."""

    result: SweepResult
    out_dir: Path
    files: list[Path]
    meta: dict
    computed: int
    reused: int

    @property
    def total(self) -> int:
        """The number of chunks."""
        return self.computed + self.reused


def run_patch(
    config: PatchConfig | str | Path,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    prepared: Prepared | None = None,
    executor: Executor | None = None,
) -> PatchRun:
    """Run (or continue) the sweep a config describes and write the output folder (module docstring).

    ``executor`` says where chunks are computed (:mod:`mmlens.runs.executors`; default: serially in
    this process; :func:`ray_executor` for Ray); the results are the same either way.
    A KeyboardInterrupt (Ctrl-C) propagates after the chunks finished so far are saved; rerunning
    continues from there. Raises :class:`ConfigError` / :class:`ResumeError` as described above.
    """
    if not isinstance(config, PatchConfig):
        config = PatchConfig.from_file(config, out=out)
    elif out is not None:
        config = config.with_output(out)
    with output_lock(config.output.dir) as out_dir:
        return _run_locked(config, out_dir, overwrite, progress, prepared, executor or SerialExecutor())


def prepare_from_dict(raw: dict[str, Any], source: str | None) -> Prepared:
    """:func:`prepare` of a config given as data (what a Ray worker receives)."""
    return prepare(PatchConfig.from_dict(raw, source=source))


def ray_executor(config: PatchConfig, address: str | None = None, workers: int | None = None) -> RayExecutor:
    """A :class:`~mmlens.runs.executors.RayExecutor` whose workers each load ``config``'s model once."""
    source = str(config.source) if config.source is not None else None
    raw = config.model_dump(mode="json", exclude_unset=True)
    return RayExecutor(functools.partial(prepare_from_dict, raw, source), address=address, workers=workers)


def _run_locked(
    config: PatchConfig, out_dir: Path, overwrite: bool, progress: bool, prepared: Prepared | None, executor: Executor
) -> PatchRun:
    """:func:`run_patch` while this process holds the output folder's lock."""
    total_start = time.perf_counter()
    record = _continuing(out_dir, config, overwrite)  # before the (slow) model load
    prepared = prepared or prepare(config)
    seconds = dict(prepared.seconds)
    if overwrite and out_dir.is_dir():
        for f in _owned_files(out_dir):
            f.unlink()
    if record is None:
        record = Record.create(out_dir / CHUNKS_FILE, "mmlens-patch", config.identity(), n_chunks=len(prepared.chunks))
    elif record.header.get("versions", {}) != versions() and record.entries:
        _say(
            True,
            f"mmlens patch: note: the chunks in {out_dir} were computed with {record.header.get('versions')}; "
            f"continuing with {versions()}",
        )
    done, planned = set(record.keys), {c.key for c in prepared.chunks}
    if not done <= planned:
        raise ResumeError(
            f"{record.path} has chunks this config does not plan ({sorted(done - planned)[:3]}); "
            "pass --overwrite to start again"
        )
    _say(
        progress,
        f"mmlens patch: {config.model.name}, hook {config.patch.hook}, axes {list(config.patch.axes)}, "
        f"{len(prepared.pairs)} pair(s), {len(prepared.chunks)} chunks"
        + (f" ({len(done)} already done in {out_dir})" if done else f" -> {out_dir}"),
    )
    start = time.perf_counter()
    try:
        computed = _sweep_chunks(prepared, record, progress, executor)
    finally:
        seconds["sweep"] = time.perf_counter() - start
    result = _combine(prepared, record)
    files, write_seconds = _write_outputs(prepared, result, out_dir)
    seconds.update(write_seconds)
    seconds["total"] = time.perf_counter() - total_start
    meta = {**_meta(prepared, record, result, seconds, computed, files), "executor": executor.describe()}
    atomic_write(out_dir / META_FILE, json.dumps(meta, indent=1, allow_nan=True) + "\n")
    return PatchRun(result, out_dir, files + [out_dir / META_FILE], meta, computed, len(prepared.chunks) - computed)


def _continuing(out_dir: Path, config: PatchConfig, overwrite: bool) -> Record | None:
    """The record to continue in ``out_dir`` (None for a fresh start); a ResumeError when the folder
    holds another config's run."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError("output.dir", f"{out_dir} exists and is not a folder")
    record = Record.continuing(out_dir / CHUNKS_FILE, config.identity(), overwrite=overwrite)
    meta = out_dir / META_FILE
    if record is not None or overwrite or not (meta.is_file() or any(out_dir.glob("results.*"))):
        return record
    try:
        old = json.loads(meta.read_text(encoding="utf-8")).get("config_hash")
    except (OSError, ValueError):
        old = "unknown"
    if old != config.hash():
        raise ResumeError(
            f"{out_dir} holds results of another run (config hash {old}, this config {config.hash()}) "
            f"but no {CHUNKS_FILE} to resume from; use another output folder (--out), or --overwrite to "
            "replace them"
        )
    return None


def _owned_files(out_dir: Path) -> list[Path]:
    names = [CHUNKS_FILE, META_FILE] + [f"results.{fmt}" for fmt in FORMATS]
    found = [out_dir / n for n in names if (out_dir / n).exists()]
    return found + sorted(out_dir.glob("heatmap_pair*.png")) + sorted(out_dir.glob("heatmap_pair*.svg"))


def compute_chunk(prepared: Prepared, chunk: Chunk) -> dict[str, Any]:
    """Sweep one chunk: the record entry (its key, baselines, method, timing and table rows)."""
    patch = prepared.config.patch
    pair = prepared.pairs[chunk.pair]
    start = time.perf_counter()
    result = sweep(
        prepared.hooked,
        pair.clean,
        pair.corrupted,
        pair.metric,
        hook=chunk.hook,
        axes=patch.axes,
        direction=patch.direction,
        batch_size=patch.batch_size,
        replay=patch.replay,
        skip_unchanged=patch.skip_unchanged,
        progress=False,
    )
    table = result.table.assign(pair=chunk.pair)
    if prepared.add_layer_column and "layer" not in table.columns:
        table.insert(1, "layer", chunk.layer)
    return {
        "key": chunk.key,
        "pair": chunk.pair,
        "layer": chunk.layer,
        "hook": chunk.hook,
        "clean": result.clean[0],
        "corrupted": result.corrupted[0],
        "method": result.method,
        "skipped": result.skipped,
        "seconds": time.perf_counter() - start,
        "rows": table.to_dict("records"),
    }


def _sweep_chunks(prepared: Prepared, record: Record, progress: bool, executor: Executor) -> int:
    """Sweep every chunk the record lacks on ``executor``, adding each as it finishes; the number swept."""
    done = compute_missing(
        executor, prepared, prepared.chunks, compute_chunk, record, desc="patching", unit="chunk", progress=progress
    )
    return len(done)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _combine(prepared: Prepared, record: Record) -> SweepResult:
    ordered = [record.get(c.key) for c in prepared.chunks]
    rows = [row for c in ordered for row in c["rows"]]
    first: dict[int, dict] = {}
    for c in ordered:
        first.setdefault(c["pair"], c)
    pairs = range(len(prepared.pairs))
    patch = prepared.config.patch
    return SweepResult(
        table=pd.DataFrame(rows),
        clean=[first[p]["clean"] for p in pairs],
        corrupted=[first[p]["corrupted"] for p in pairs],
        direction=patch.direction,
        hook=patch.hook,
        axes=patch.axes,
    )


def _write_outputs(prepared: Prepared, result: SweepResult, out_dir: Path) -> tuple[list[Path], dict[str, float]]:
    import matplotlib.pyplot as plt

    output = prepared.config.output
    start = time.perf_counter()
    path = out_dir / f"results.{output.format}"
    with atomic_path(path) as tmp:
        if output.format == "csv":
            result.table.to_csv(tmp, index=False)
        else:
            result.table.to_parquet(tmp, index=False)
    files = [path]
    seconds = {"write_results": time.perf_counter() - start}
    start = time.perf_counter()
    for p in range(len(prepared.pairs) if output.plots else 0):
        fig = plot_patching(result, pair=p, value=output.plot_value)
        try:
            files += save_figure(fig, out_dir / f"heatmap_pair{p}")
        finally:
            plt.close(fig)
    seconds["plots"] = time.perf_counter() - start
    return files, seconds


def _meta(
    prepared: Prepared, record: Record, result: SweepResult, seconds: dict, computed: int, files: list[Path]
) -> dict:
    config = prepared.config
    baselines = [
        {
            "pair": i,
            "clean": result.clean[i],
            "corrupted": result.corrupted[i],
            "corruption": pair.corruption,
            "metric_tokens": pair.metric_tokens,
        }
        for i, pair in enumerate(prepared.pairs)
    ]
    return {
        "command": "mmlens patch",
        "config_file": str(config.source) if config.source is not None else None,
        "config": config.to_dict(),
        "config_hash": config.hash(),
        "seed": config.seed,
        "versions": versions(),
        "device": str(prepared.hooked.device),
        "timings_s": {k: round(v, 4) for k, v in seconds.items()},
        "chunk_seconds_all_runs": round(sum(c["seconds"] for c in record.entries), 4),
        "sweep_methods": sorted({c.get("method", "?") for c in record.entries}),
        "no_op_cells_skipped": sum(c.get("skipped", 0) for c in record.entries),
        "chunks": {
            "total": len(prepared.chunks),
            "computed_this_run": computed,
            "reused": len(prepared.chunks) - computed,
            "unit": "pair x layer" if prepared.per_layer else "pair",
        },
        "baselines": baselines,
        "n_cells": len(result.table),
        "files": [p.name for p in files] + [META_FILE, CHUNKS_FILE],
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


__all__ = [
    "CHUNKS_FILE",
    "META_FILE",
    "PatchConfig",
    "PatchRun",
    "Prepared",
    "describe",
    "prepare",
    "resolve_token",
    "run_patch",
]
