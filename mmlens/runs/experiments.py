"""Config-driven, resumable patching experiments: what ``mmlens patch CONFIG`` runs.

A config file (TOML, or YAML by extension) names a model, input pairs (or rows of the model's
example inputs), an optional corruption, the sweep and the metric::

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

:func:`load_config` parses and checks the file without the model (every error names its field as a
dotted path, e.g. ``metric.kind``); :func:`prepare` loads the model and checks what needs it (hook
names, layers, single-token answers, equal token counts); :func:`run_experiment` runs the sweep in
chunks (one per input pair and, for block points swept over layers, per layer: each is one
:func:`mmlens.methods.patching.sweep` call with the layer's full hook name) and appends every finished chunk
to ``chunks.jsonl`` in the output folder (each write atomic: a new file renamed over the old). A
rerun with the same config continues after the last finished chunk; a different config in the same
folder is refused unless ``overwrite=True``.

Output folder: ``results.csv`` (or ``.parquet``; the table of :class:`mmlens.methods.patching.SweepResult`),
``meta.json`` (config, its hash, versions, seed, timings, baseline metrics per pair, chunk counts),
``heatmap_pair{i}.png`` / ``.svg`` and ``chunks.jsonl`` (the resumable record).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from mmlens.methods.patching import (AXES, Corruption, SweepResult, check_same_layout, corrupt, logit_diff, logprob,
                       prob, sweep)
from mmlens.methods.patching import points as hook_points

# --- errors --------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A bad config value: ``field`` is its dotted path (``metric.kind``, ``inputs.pairs[1].clean``)."""

    def __init__(self, field: str, problem: str, source: str | Path | None = None):
        self.field, self.problem, self.source = field, problem, source
        super().__init__(f"{source}: {field}: {problem}" if source else f"{field}: {problem}")

    def with_source(self, source: str | Path) -> "ConfigError":
        return ConfigError(self.field, self.problem, source)


class ResumeError(ValueError):
    """The output folder holds a run of a different config (or an unreadable record)."""


# --- schema --------------------------------------------------------------------------------------

KINDS = ("logit_diff", "logprob", "prob", "kl")
METHODS = ("neutral", "noise", "swap")
DIRECTIONS = ("denoise", "noise")
FORMATS = ("csv", "parquet")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PLOT_VALUES = ("normalized", "value")
COLORS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (230, 200, 40),
          "orange": (230, 130, 30), "purple": (130, 50, 160), "white": (250, 250, 250), "black": (10, 10, 10),
          "gray": (128, 128, 128)}
SHAPES = ("plain", "square", "circle", "stripes")
GENERATED = "generated:"

Token = str | int  # a string that must be one token, or a token id


@dataclass(frozen=True)
class ModelConfig:
    name: str
    device: str = "cpu"
    dtype: str = "float32"


@dataclass(frozen=True)
class PairConfig:
    """One clean/corrupted pair. Texts go through the tokenizer (or, with an image, the processor);
    ``image`` / ``corrupted_image`` are ``generated:COLOR[-SHAPE]`` or a file path (relative paths
    from the config file's folder). Without ``corrupted``/``corrupted_image`` the [corruption]
    section makes the corrupted input. ``answer``/``wrong``/``target`` override the [metric] ones."""

    clean: str
    corrupted: str | None = None
    image: str | None = None
    corrupted_image: str | None = None
    answer: Token | None = None
    wrong: Token | None = None
    target: Token | None = None

    @property
    def explicit(self) -> bool:
        return self.corrupted is not None or self.corrupted_image is not None


@dataclass(frozen=True)
class InputsConfig:
    """Exactly one of ``pairs`` and ``example`` (rows of the model's ``example_inputs()``)."""

    pairs: tuple[PairConfig, ...] = ()
    example: tuple[int, ...] = ()


@dataclass(frozen=True)
class CorruptionConfig:
    modality: str
    method: str = "neutral"
    noise: float = 3.0
    swap_row: int | None = None


@dataclass(frozen=True)
class PatchConfig:
    hook: str = "resid_pre"
    axes: tuple[str, ...] = ("layer", "position")
    direction: str = "denoise"
    batch_size: int = 8
    layers: tuple[int, ...] | None = None
    replay: bool = True
    skip_unchanged: bool = True


@dataclass(frozen=True)
class MetricConfig:
    kind: str
    answer: Token | None = None
    wrong: Token | None = None
    target: Token | None = None


@dataclass(frozen=True)
class OutputConfig:
    dir: str
    format: str = "csv"
    plots: bool = True
    plot_value: str = "normalized"


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig
    inputs: InputsConfig
    patch: PatchConfig
    metric: MetricConfig
    output: OutputConfig
    corruption: CorruptionConfig | None = None
    seed: int = 0
    source: Path | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        """The config with every default filled in (what ``meta.json`` records)."""
        out = asdict(self)
        out.pop("source")
        return out

    def hash(self) -> str:
        """Hash of everything that changes the numbers: the config without ``output`` (nor the config
        file's path), plus the contents of image files. 16 hex digits."""
        data = self.to_dict()
        data.pop("output")
        files = {}
        for pair in self.inputs.pairs:
            for spec in (pair.image, pair.corrupted_image):
                if spec is not None and not spec.startswith(GENERATED):
                    files[spec] = hashlib.sha256(_image_path(spec, self.source).read_bytes()).hexdigest()
        data["image_files"] = files
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# --- parsing -------------------------------------------------------------------------------------

_REQUIRED = object()
_SECTIONS = ("model", "inputs", "corruption", "patch", "metric", "output", "seed")


def load_config(path: str | Path, *, out: str | Path | None = None) -> ExperimentConfig:
    """Read and check a config file (``.toml``, ``.yaml``/``.yml`` or ``.json``); ``out`` overrides
    ``output.dir``. Raises :class:`ConfigError` naming the file and the bad field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    suffix = path.suffix.lower()
    text = path.read_text()
    try:
        if suffix == ".toml":
            raw = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        elif suffix == ".json":
            raw = json.loads(text)
        else:
            raise ConfigError("(file)", f"unknown config extension {suffix!r}; use .toml, .yaml, .yml or .json")
    except ConfigError as err:
        raise err.with_source(path) from None
    except Exception as err:  # the parsers' own syntax errors carry line and column
        raise ConfigError("(file)", f"not valid {suffix.lstrip('.').upper()}: {err}", path) from None
    try:
        return parse_config(raw, source=path, out=out)
    except ConfigError as err:
        raise err.with_source(path) from None


def parse_config(raw: Any, *, source: str | Path | None = None, out: str | Path | None = None) -> ExperimentConfig:
    """Check a config given as nested dicts/lists (what TOML/YAML parse to); see :func:`load_config`."""
    source = Path(source) if source is not None else None
    top = _table(raw, "(top level)")
    _keys(top, "", _SECTIONS)
    for name in ("model", "inputs", "metric", "output"):
        if name not in top:
            raise ConfigError(name, f"missing section [{name}]")
    model = _model(_table(top["model"], "model"))
    inputs = _inputs(_table(top["inputs"], "inputs"), source)
    corruption = _corruption(_table(top["corruption"], "corruption")) if "corruption" in top else None
    patch = _patch(_table(top.get("patch", {}), "patch"))
    metric = _metric(_table(top["metric"], "metric"))
    output_table = dict(_table(top["output"], "output"))
    if out is not None:
        output_table["dir"] = str(out)
    output = _output(output_table)
    seed = _int(top, "seed", "", default=0, minimum=0)
    _check_together(inputs, corruption, metric)
    return ExperimentConfig(model, inputs, patch, metric, output, corruption, seed, source)


def _model(t: dict) -> ModelConfig:
    _keys(t, "model", ("name", "device", "dtype"))
    return ModelConfig(_str(t, "name", "model"), _str(t, "device", "model", default="cpu"),
                       _str(t, "dtype", "model", default="float32", choices=tuple(DTYPES)))


def _inputs(t: dict, source: Path | None) -> InputsConfig:
    _keys(t, "inputs", ("pairs", "example"))
    if ("pairs" in t) == ("example" in t):
        raise ConfigError("inputs", "give exactly one of inputs.pairs (a list of {clean = ..., corrupted = ...}) and "
                                    "inputs.example (rows of the model's example inputs, e.g. [0])")
    if "example" in t:
        rows = t["example"]
        rows = [rows] if isinstance(rows, int) and not isinstance(rows, bool) else rows
        if not isinstance(rows, list) or not rows:
            raise ConfigError("inputs.example", f"expected a row index or a non-empty list of them, got {_desc(t['example'])}")
        for i, r in enumerate(rows):
            if not _is_int(r) or r < 0:
                raise ConfigError(f"inputs.example[{i}]", f"expected a row index (integer >= 0), got {_desc(r)}")
        return InputsConfig(example=tuple(rows))
    pairs = t["pairs"]
    if not isinstance(pairs, list) or not pairs:
        raise ConfigError("inputs.pairs", f"expected a non-empty list of tables, got {_desc(pairs)}")
    parsed = []
    for i, p in enumerate(pairs):
        path = f"inputs.pairs[{i}]"
        p = _table(p, path)
        _keys(p, path, [f.name for f in dataclasses.fields(PairConfig)])
        pair = PairConfig(
            clean=_str(p, "clean", path), corrupted=_str(p, "corrupted", path, default=None),
            image=_str(p, "image", path, default=None), corrupted_image=_str(p, "corrupted_image", path, default=None),
            answer=_token(p, "answer", path), wrong=_token(p, "wrong", path), target=_token(p, "target", path))
        if pair.corrupted_image is not None and pair.image is None:
            raise ConfigError(f"{path}.corrupted_image", "needs an image for the clean input too (set image)")
        for key in ("image", "corrupted_image"):
            spec = getattr(pair, key)
            if spec is not None:
                _check_image(spec, f"{path}.{key}", source)
        parsed.append(pair)
    return InputsConfig(pairs=tuple(parsed))


def _corruption(t: dict) -> CorruptionConfig:
    _keys(t, "corruption", ("modality", "method", "noise", "swap_row"))
    method = _str(t, "method", "corruption", default="neutral", choices=METHODS)
    noise = _float(t, "noise", "corruption", default=3.0, positive=True)
    swap_row = _int(t, "swap_row", "corruption", default=None, minimum=0)
    if "noise" in t and method != "noise":
        raise ConfigError("corruption.noise", f"only applies to method = 'noise' (method is {method!r})")
    if swap_row is not None and method != "swap":
        raise ConfigError("corruption.swap_row", f"only applies to method = 'swap' (method is {method!r})")
    if method == "swap" and swap_row is None:
        raise ConfigError("corruption.swap_row", "method = 'swap' needs the example row whose modality is swapped in "
                                                 "(an integer >= 0)")
    return CorruptionConfig(_str(t, "modality", "corruption"), method, noise, swap_row)


def _patch(t: dict) -> PatchConfig:
    _keys(t, "patch", [f.name for f in dataclasses.fields(PatchConfig)])
    axes = t.get("axes", ["layer", "position"])
    if isinstance(axes, str):
        axes = [axes]
    if not isinstance(axes, list) or not all(isinstance(a, str) for a in axes):
        raise ConfigError("patch.axes", f"expected a list of axis names, got {_desc(axes)}")
    if tuple(axes) not in AXES:
        valid = ", ".join(str(list(a)) for a in sorted(AXES))
        raise ConfigError("patch.axes", f"{axes} is not a supported combination; use one of {valid}")
    layers = t.get("layers")
    if layers is not None:
        if not isinstance(layers, list) or not layers:
            raise ConfigError("patch.layers", f"expected a non-empty list of layer indices, got {_desc(layers)}")
        for i, layer in enumerate(layers):
            if not _is_int(layer) or layer < 0:
                raise ConfigError(f"patch.layers[{i}]", f"expected a layer index (integer >= 0), got {_desc(layer)}")
        if len(set(layers)) != len(layers):
            raise ConfigError("patch.layers", f"has repeated layers: {layers}")
        layers = tuple(sorted(layers))
    return PatchConfig(
        hook=_str(t, "hook", "patch", default="resid_pre"), axes=tuple(axes),
        direction=_str(t, "direction", "patch", default="denoise", choices=DIRECTIONS),
        batch_size=_int(t, "batch_size", "patch", default=8, minimum=1), layers=layers,
        replay=_bool(t, "replay", "patch", default=True),
        skip_unchanged=_bool(t, "skip_unchanged", "patch", default=True))


def _metric(t: dict) -> MetricConfig:
    _keys(t, "metric", ("kind", "answer", "wrong", "target"))
    return MetricConfig(_str(t, "kind", "metric", choices=KINDS), _token(t, "answer", "metric"),
                        _token(t, "wrong", "metric"), _token(t, "target", "metric"))


def _output(t: dict) -> OutputConfig:
    _keys(t, "output", ("dir", "format", "plots", "plot_value"))
    fmt = _str(t, "format", "output", default="csv", choices=FORMATS)
    if fmt == "parquet" and not _has_parquet_engine():
        raise ConfigError("output.format", "'parquet' needs pyarrow or fastparquet, and neither is installed "
                                           "(pip install pyarrow); or use format = 'csv'")
    directory = _str(t, "dir", "output")
    if not directory.strip():
        raise ConfigError("output.dir", "expected a folder path, got an empty string")
    return OutputConfig(directory, fmt, _bool(t, "plots", "output", default=True),
                        _str(t, "plot_value", "output", default="normalized", choices=PLOT_VALUES))


def _has_parquet_engine() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("pyarrow", "fastparquet"))


def _check_together(inputs: InputsConfig, corruption: CorruptionConfig | None, metric: MetricConfig) -> None:
    """Rules that span sections: every pair has one corruption source; the metric has its tokens."""
    if inputs.example:
        if corruption is None:
            raise ConfigError("corruption", "inputs.example gives clean inputs only; add a [corruption] section "
                                            "(modality, method) to make the corrupted ones")
    else:
        if corruption is not None and corruption.method == "swap":
            raise ConfigError("corruption.method", "'swap' works with inputs.example (and corruption.swap_row); with "
                                                   "inputs.pairs, give the swapped input as corrupted / corrupted_image")
        users = [i for i, p in enumerate(inputs.pairs) if not p.explicit]
        if users and corruption is None:
            raise ConfigError(f"inputs.pairs[{users[0]}].corrupted",
                              "missing: give corrupted (text) or corrupted_image, or add a [corruption] section")
        if corruption is not None and not users:
            raise ConfigError("corruption", "no pair uses it (every pair gives its corrupted input); remove the section")
    needs = {"logit_diff": ("answer", "wrong"), "logprob": ("target",), "prob": ("target",), "kl": ()}[metric.kind]
    for key in ("answer", "wrong", "target"):
        where = [("metric", getattr(metric, key))] + [(f"inputs.pairs[{i}]", getattr(p, key))
                                                       for i, p in enumerate(inputs.pairs)]
        for path, value in where:
            if value is not None and key not in needs:
                wanted = " and ".join(needs) if needs else "no tokens"
                raise ConfigError(f"{path}.{key}", f"metric.kind = {metric.kind!r} takes {wanted}, not {key}")
        if key in needs and getattr(metric, key) is None:
            missing = [i for i, p in enumerate(inputs.pairs) if getattr(p, key) is None]
            if inputs.example or len(missing) == len(inputs.pairs):
                where = f"metric.{key}"
            elif missing:
                where = f"inputs.pairs[{missing[0]}].{key}"
            else:
                continue
            raise ConfigError(where, f"missing: metric.kind = {metric.kind!r} needs {' and '.join(needs)} (each a "
                                     "single-token string or a token id), in [metric] or on every pair")


# --- field helpers ---------------------------------------------------------------------------------

def _desc(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _table(value: Any, path: str) -> dict:
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected a table (key = value pairs), got {_desc(value)}")
    return dict(value)


def _keys(t: dict, path: str, valid: Sequence[str]) -> None:
    unknown = [k for k in t if k not in valid]
    if unknown:
        where = f"[{path}]" if path else "the top level"
        raise ConfigError(_join(path, str(unknown[0])), f"unknown key; valid keys in {where}: {', '.join(sorted(valid))}")


def _get(t: dict, key: str, path: str, default: Any) -> tuple[bool, Any]:
    if key not in t or t[key] is None:
        if default is _REQUIRED:
            raise ConfigError(_join(path, key), "missing (required)")
        return False, default
    return True, t[key]


def _str(t: dict, key: str, path: str, default: Any = _REQUIRED, choices: Sequence[str] | None = None) -> Any:
    present, value = _get(t, key, path, default)
    if not present:
        return value
    if not isinstance(value, str):
        raise ConfigError(_join(path, key), f"expected a string, got {_desc(value)}")
    if choices is not None and value not in choices:
        raise ConfigError(_join(path, key), f"expected one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _int(t: dict, key: str, path: str, default: Any = _REQUIRED, minimum: int | None = None) -> Any:
    present, value = _get(t, key, path, default)
    if not present:
        return value
    if not _is_int(value) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ConfigError(_join(path, key), f"expected an integer{bound}, got {_desc(value)}")
    return value


def _float(t: dict, key: str, path: str, default: Any = _REQUIRED, positive: bool = False) -> Any:
    present, value = _get(t, key, path, default)
    if not present:
        return value
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)) or (positive and not value > 0):
        raise ConfigError(_join(path, key), f"expected a {'positive ' if positive else ''}number, got {_desc(value)}")
    return float(value)


def _bool(t: dict, key: str, path: str, default: Any = _REQUIRED) -> Any:
    present, value = _get(t, key, path, default)
    if present and not isinstance(value, bool):
        raise ConfigError(_join(path, key), f"expected true or false, got {_desc(value)}")
    return value


def _token(t: dict, key: str, path: str) -> Token | None:
    value = t.get(key)
    if value is None:
        return None
    if isinstance(value, str) and value:
        return value
    if _is_int(value) and value >= 0:
        return value
    raise ConfigError(_join(path, key), f"expected a single-token string or a token id (integer >= 0), got {_desc(value)}")


def _image_path(spec: str, source: Path | None) -> Path:
    path = Path(spec).expanduser()
    if not path.is_absolute() and source is not None:
        path = source.parent / path
    return path


def _check_image(spec: str, path: str, source: Path | None) -> None:
    if spec.startswith(GENERATED):
        color, _, shape = spec[len(GENERATED):].partition("-")
        if color not in COLORS or (shape and shape not in SHAPES):
            raise ConfigError(path, f"unknown generated image {spec!r}; use generated:COLOR or generated:COLOR-SHAPE with "
                                    f"COLOR in {', '.join(COLORS)} and SHAPE in {', '.join(SHAPES)}")
    elif not _image_path(spec, source).is_file():
        raise ConfigError(path, f"image file {_image_path(spec, source)} not found (relative paths start at the config "
                                "file's folder), and it is not generated:COLOR[-SHAPE]")


def make_image(spec: str, source: Path | None = None, size: int = 64):
    """A PIL image from ``generated:COLOR[-SHAPE]`` (on a light gray ground; ``plain`` fills it all) or a file."""
    from PIL import Image, ImageDraw

    if not spec.startswith(GENERATED):
        return Image.open(_image_path(spec, source)).convert("RGB")
    color, _, shape = spec[len(GENERATED):].partition("-")
    rgb, shape = COLORS[color], shape or "plain"
    image = Image.new("RGB", (size, size), rgb if shape == "plain" else (220, 220, 220))
    draw = ImageDraw.Draw(image)
    lo, hi = size // 4, size - size // 4
    if shape == "square":
        draw.rectangle([lo, lo, hi - 1, hi - 1], fill=rgb)
    elif shape == "circle":
        draw.ellipse([lo, lo, hi - 1, hi - 1], fill=rgb)
    elif shape == "stripes":
        for x in range(0, size, size // 8):
            draw.rectangle([x, 0, x + size // 16 - 1, size - 1], fill=rgb)
    return image


# --- preparing: the model-dependent checks ------------------------------------------------------------

@dataclass
class PreparedPair:
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
    config: ExperimentConfig
    loaded: Any
    hooked: Any
    pairs: list[PreparedPair]
    chunks: list[Chunk]
    per_layer: bool
    add_layer_column: bool
    seconds: dict[str, float]


def prepare(config: ExperimentConfig) -> Prepared:
    """Load the model and build every pair's inputs and metric; raises :class:`ConfigError` (with the
    config file in the message) for what only the model can check."""
    try:
        return _prepare(config)
    except ConfigError as err:
        raise err.with_source(config.source) if config.source is not None else err from None


def _prepare(config: ExperimentConfig) -> Prepared:
    import mmlens
    from mmlens.data.loading import load_model

    seconds = {}
    start = time.perf_counter()
    try:
        device = torch.device(config.model.device)
    except RuntimeError as err:
        raise ConfigError("model.device", f"not a torch device: {err}") from None
    torch.manual_seed(config.seed)
    try:
        loaded = load_model(config.model.name, device=device, dtype=DTYPES[config.model.dtype], seed=config.seed)
    except ValueError as err:
        raise ConfigError("model.name", str(err)) from None
    hooked = mmlens.wrap(loaded.model, tokenizer=loaded.tokenizer, processor=loaded.processor, name=loaded.name)
    seconds["load_model"] = time.perf_counter() - start
    start = time.perf_counter()
    points, per_layer = _resolve_hook(hooked, config.patch)
    pairs = _prepare_pairs(config, loaded, hooked, points)
    chunks = _plan_chunks(points, per_layer, len(pairs))
    seconds["prepare_inputs"] = time.perf_counter() - start
    # sweep labels the layer of a lone point only when "layer" is an axis, a multi-layer sweep always
    add_layer = per_layer and "layer" not in config.patch.axes
    return Prepared(config, loaded, hooked, pairs, chunks, per_layer, add_layer, seconds)


def _resolve_hook(hooked, patch: PatchConfig) -> tuple[list, bool]:
    """The hook points to patch, and whether they are one block point swept over (a subset of) layers."""
    try:
        points = hook_points(hooked, patch.hook)
    except (KeyError, ValueError) as err:
        kinds = sorted({f"{hp.prefix}.{hp.kind}" if hp.prefix != "lm" else hp.kind
                        for hp in hooked.hook_points.values() if hp.layer is not None})
        raise ConfigError("patch.hook", f"{patch.hook!r} is not a hook point of {hooked.name}: {_message(err)}. Block "
                                        f"points swept over layers: {', '.join(kinds)}; full names: `mmlens hooks "
                                        f"{hooked.name}`") from None
    if "head" in patch.axes and not all(hp.heads for hp in points):
        raise ConfigError("patch.axes", f"a head axis needs a per-head point (e.g. hook = 'z'); {patch.hook!r} has none")
    if patch.layers is not None:
        available = [hp.layer for hp in points if hp.layer is not None]
        if len(points) < 2 and not available:
            raise ConfigError("patch.layers", f"hook {patch.hook!r} is a single point without layers; patch.layers "
                                              "applies to block points swept over layers (e.g. 'resid_pre')")
        bad = [layer for layer in patch.layers if layer not in available]
        if bad:
            raise ConfigError("patch.layers", f"layers {bad} do not exist for hook {patch.hook!r}; it has layers "
                                              f"{min(available)}..{max(available)}")
        return [hp for hp in points if hp.layer in patch.layers], patch.hook not in hooked.hook_points
    return points, len(points) > 1


def _message(err: Exception) -> str:
    return err.args[0] if isinstance(err, KeyError) and err.args else str(err)


def _plan_chunks(points: list, per_layer: bool, n_pairs: int) -> list[Chunk]:
    """One chunk per pair and layer when the hook is a block point swept over layers, else one per pair."""
    chunks = []
    for pair in range(n_pairs):
        if per_layer:
            chunks += [Chunk(f"pair{pair}/layer{hp.layer}", pair, hp.layer, hp.name) for hp in points]
        else:
            chunks.append(Chunk(f"pair{pair}", pair, points[0].layer, points[0].name))
    return chunks


def _tokenizer(loaded):
    return loaded.tokenizer or getattr(loaded.processor, "tokenizer", None)


def _prepare_pairs(config: ExperimentConfig, loaded, hooked, points: list) -> list[PreparedPair]:
    out = []
    if config.inputs.example:
        example = loaded.example_inputs()
        n = (example["input_ids"] if "input_ids" in example else
             next(v for v in example.values() if isinstance(v, torch.Tensor))).shape[0]
        rows = list(config.inputs.example)
        c = config.corruption
        for i, r in enumerate(rows):
            if r >= n:
                raise ConfigError(f"inputs.example[{i}]", f"row {r} does not exist: {loaded.name}'s example inputs have "
                                                          f"{n} rows (0..{n - 1})")
        if c.swap_row is not None and c.swap_row >= n:
            raise ConfigError("corruption.swap_row", f"row {c.swap_row} does not exist: {loaded.name}'s example inputs "
                                                     f"have {n} rows (0..{n - 1})")
        for i, r in enumerate(rows):
            clean = hooked.rows(example, r)
            other = hooked.rows(example, c.swap_row) if c.swap_row is not None else None
            corrupted = _make_corruption(config, hooked, clean, other, f"inputs.example[{i}]")
            out.append(_finish_pair(config, loaded, hooked, points, clean, corrupted, None, f"inputs.example[{i}]"))
        return out
    for i, pair in enumerate(config.inputs.pairs):
        path = f"inputs.pairs[{i}]"
        clean = _encode(loaded, hooked, pair.clean, pair.image, config.source, path)
        if pair.explicit:
            corrupted = _encode(loaded, hooked, pair.corrupted if pair.corrupted is not None else pair.clean,
                                pair.corrupted_image if pair.corrupted_image is not None else pair.image,
                                config.source, path)
        else:
            corrupted = _make_corruption(config, hooked, clean, None, path)
        out.append(_finish_pair(config, loaded, hooked, points, clean, corrupted, pair, path))
    return out


def _encode(loaded, hooked, text: str, image: str | None, source: Path | None, path: str) -> dict:
    """Model inputs of batch 1 for a text, with an optional image (through the processor, in a chat
    turn when the processor has a chat template); float tensors in the model's dtype."""
    dtype = next(loaded.model.parameters()).dtype
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in _tokenize(loaded, text, image, source, path).items()}


def _tokenize(loaded, text: str, image: str | None, source: Path | None, path: str) -> dict:
    if image is None:
        if loaded.tokenizer is None and loaded.processor is None:
            raise ConfigError(f"{path}.clean", f"{loaded.name} has no tokenizer or processor, so it cannot take text; "
                                               "use inputs.example (its example inputs) instead")
        if loaded.processor is not None:
            return dict(loaded.processor(text=[text], return_tensors="pt"))
        return dict(loaded.tokenizer([text], return_tensors="pt"))
    if loaded.processor is None:
        raise ConfigError(f"{path}.image", f"{loaded.name} has no processor, so images cannot be given as files or "
                                           "generated images; use inputs.example (its example inputs) instead")
    processor = loaded.processor
    prompt = text
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return dict(processor(images=[make_image(image, source)], text=[prompt], return_tensors="pt"))


def _make_corruption(config: ExperimentConfig, hooked, clean: dict, other: dict | None, path: str) -> Corruption:
    c = config.corruption
    modalities = hooked.spans(clean).modalities
    if c.modality not in modalities:
        raise ConfigError("corruption.modality", f"{c.modality!r} is not in the inputs of {path}; modalities there: "
                                                 f"{', '.join(modalities)}")
    try:
        return corrupt(hooked, clean, c.modality, c.method, other=other, noise=c.noise, seed=config.seed)
    except KeyError as err:  # no neutral reference for this modality
        raise ConfigError("corruption.modality", _message(err)) from None
    except ValueError as err:  # swap rows with different layouts
        raise ConfigError("corruption.swap_row", str(err)) from None


def _finish_pair(config, loaded, hooked, points, clean: dict, corrupted: dict | Corruption, pair: PairConfig | None,
                 path: str) -> PreparedPair:
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


def _tokens_of(loaded, inputs: dict) -> list[str] | None:
    tokenizer = _tokenizer(loaded)
    if tokenizer is None or "input_ids" not in inputs:
        return None
    return tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())


def _metric_for(metric: MetricConfig, pair: PairConfig | None, loaded, path: str) -> tuple[Callable | str, dict]:
    if metric.kind == "kl":
        return "kl", {}
    keys = ("answer", "wrong") if metric.kind == "logit_diff" else ("target",)
    ids, tokens = [], {}
    for key in keys:
        own = getattr(pair, key) if pair is not None else None
        value = own if own is not None else getattr(metric, key)
        where = f"{path}.{key}" if own is not None else f"metric.{key}"
        token_id = resolve_token(value, where, loaded)
        ids.append(token_id)
        tokenizer = _tokenizer(loaded)
        text = tokenizer.decode([token_id]) if tokenizer is not None else None
        tokens[key] = {"id": token_id, "text": text}
    build = {"logit_diff": logit_diff, "logprob": logprob, "prob": prob}[metric.kind]
    return build(*ids), tokens


def resolve_token(value: Token, where: str, loaded) -> int:
    """A token id from an id or a string that the model's tokenizer makes into exactly one token."""
    vocab = loaded.model.get_output_embeddings().weight.shape[0] if hasattr(loaded.model, "get_output_embeddings") \
        and loaded.model.get_output_embeddings() is not None else None
    if _is_int(value):
        if vocab is not None and value >= vocab:
            raise ConfigError(where, f"token id {value} is outside the vocabulary (0..{vocab - 1})")
        return value
    tokenizer = _tokenizer(loaded)
    if tokenizer is None:
        raise ConfigError(where, f"{loaded.name} has no tokenizer, so {value!r} cannot be tokenized; give a token id "
                                 "(an integer)")
    ids = tokenizer.encode(value, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ConfigError(where, f"{value!r} is {len(ids)} tokens {pieces} (ids {ids}), not one; pick a string that is "
                                 "a single token (often with a leading space) or give a token id")
    return ids[0]


# --- running -------------------------------------------------------------------------------------

CHUNKS_FILE = "chunks.jsonl"
META_FILE = "meta.json"
_RECORD_VERSION = 1


@dataclass
class ExperimentRun:
    """What :func:`run_experiment` returns: the combined sweep, where it went, and what was reused."""

    result: SweepResult
    out_dir: Path
    files: list[Path]
    meta: dict
    computed: int
    reused: int

    @property
    def total(self) -> int:
        return self.computed + self.reused


class _Record:
    """The resumable record ``chunks.jsonl``: a header line (config hash and config), then one line
    per finished chunk. Every update writes a new file and renames it over the old one."""

    def __init__(self, path: Path, header: dict, chunks: list[dict]):
        self.path, self.header, self.chunks = path, header, chunks

    @classmethod
    def read(cls, path: Path) -> "_Record | None":
        if not path.is_file():
            return None
        lines = path.read_text().splitlines()
        try:
            header = json.loads(lines[0])
            chunks = [json.loads(line) for line in lines[1:] if line.strip()]
        except (IndexError, json.JSONDecodeError) as err:
            raise ResumeError(f"{path} is unreadable ({err}); pass --overwrite to start again") from None
        return cls(path, header, chunks)

    def append(self, chunk: dict) -> None:
        self.chunks.append(chunk)
        self.write()

    def write(self) -> None:
        lines = [json.dumps(self.header)] + [json.dumps(c) for c in self.chunks]
        _atomic_write(self.path, "\n".join(lines) + "\n")


def _atomic_write(path: Path, text: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _owned_files(out_dir: Path) -> list[Path]:
    names = [CHUNKS_FILE, META_FILE] + [f"results.{fmt}" for fmt in FORMATS]
    found = [out_dir / n for n in names if (out_dir / n).exists()]
    return found + sorted(out_dir.glob("heatmap_pair*.png")) + sorted(out_dir.glob("heatmap_pair*.svg"))


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        path = _join(prefix, key)
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            out += _config_diff(a[key], b[key], path)
        elif a.get(key) != b.get(key):
            out.append(path)
    return out


def _check_folder(out_dir: Path, config_hash: str, config: ExperimentConfig) -> _Record | None:
    """The record to continue in ``out_dir`` (None for a fresh start); a ResumeError when the folder
    holds another config's run."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError("output.dir", f"{out_dir} exists and is not a folder")
    record = _Record.read(out_dir / CHUNKS_FILE)
    if record is None:
        meta = out_dir / META_FILE
        if meta.is_file() or any(f.name.startswith("results.") for f in _owned_files(out_dir)):
            try:
                old = json.loads(meta.read_text()).get("config_hash")
            except (OSError, ValueError):
                old = "unknown"
            if old != config_hash:
                raise ResumeError(f"{out_dir} holds results of another run (config hash {old}, this config "
                                  f"{config_hash}) but no {CHUNKS_FILE} to resume from; use another output folder "
                                  "(--out), or --overwrite to replace them")
        return None
    if record.header.get("config_hash") != config_hash:
        changed = _config_diff(record.header.get("config", {}), _hashed_config(config))
        raise ResumeError(
            f"{out_dir} holds a run of a different config (hash {record.header.get('config_hash')}, this config "
            f"{config_hash}; changed: {', '.join(changed) or 'image file contents'}); runs are never mixed. Use "
            "another output folder (--out), or --overwrite to delete that run")
    return record


def _hashed_config(config: ExperimentConfig) -> dict:
    data = config.to_dict()
    data.pop("output")
    return data


def run_experiment(config: ExperimentConfig | str | Path, *, out: str | Path | None = None, overwrite: bool = False,
                   progress: bool = True, prepared: Prepared | None = None) -> ExperimentRun:
    """Run (or continue) the sweep a config describes and write the output folder (module docstring).

    A KeyboardInterrupt (Ctrl-C) propagates after the chunks finished so far are saved; rerunning
    continues from there. Raises :class:`ConfigError` / :class:`ResumeError` as described above.
    """
    if not isinstance(config, ExperimentConfig):
        config = load_config(config, out=out)
    elif out is not None:
        config = dataclasses.replace(config, output=dataclasses.replace(config.output, dir=str(out)))
    total_start = time.perf_counter()
    out_dir = Path(config.output.dir)
    config_hash = config.hash()
    record = None if overwrite else _check_folder(out_dir, config_hash, config)  # before the (slow) model load
    prepared = prepared or prepare(config)
    seconds = dict(prepared.seconds)
    if overwrite and out_dir.is_dir():
        for f in _owned_files(out_dir):
            f.unlink()
    if record is None:
        out_dir.mkdir(parents=True, exist_ok=True)
        record = _Record(out_dir / CHUNKS_FILE, {"kind": "mmlens-patch", "version": _RECORD_VERSION,
                                                 "config_hash": config_hash, "n_chunks": len(prepared.chunks),
                                                 "versions": _versions(), "config": _hashed_config(config)}, [])
        record.write()
    elif record.header.get("versions", {}) != _versions() and record.chunks:
        _say(True, f"mmlens patch: note: the chunks in {out_dir} were computed with {record.header.get('versions')}; "
                   f"continuing with {_versions()}")
    done = {c["key"] for c in record.chunks}
    planned = {c.key for c in prepared.chunks}
    if not done <= planned:
        raise ResumeError(f"{out_dir / CHUNKS_FILE} has chunks this config does not plan ({sorted(done - planned)[:3]}); "
                          "pass --overwrite to start again")
    todo = [c for c in prepared.chunks if c.key not in done]
    hooked, patch = prepared.hooked, config.patch
    _say(progress, f"mmlens patch: {config.model.name}, hook {patch.hook}, axes {list(patch.axes)}, "
                   f"{len(prepared.pairs)} pair(s), {len(prepared.chunks)} chunks"
                   + (f" ({len(done)} already done in {out_dir})" if done else f" -> {out_dir}"))
    sweep_start = time.perf_counter()
    computed = 0
    bar = tqdm(total=len(prepared.chunks), initial=len(done), desc="patching", unit="chunk", disable=not progress,
               file=sys.stderr)
    try:
        for chunk in todo:
            bar.set_postfix_str(chunk.key)
            pair = prepared.pairs[chunk.pair]
            start = time.perf_counter()
            result = sweep(hooked, pair.clean, pair.corrupted, pair.metric, hook=chunk.hook, axes=patch.axes,
                           direction=patch.direction, batch_size=patch.batch_size, replay=patch.replay,
                           skip_unchanged=patch.skip_unchanged, progress=False)
            table = result.table.assign(pair=chunk.pair)
            if prepared.add_layer_column and "layer" not in table.columns:
                table.insert(1, "layer", chunk.layer)
            record.append({"key": chunk.key, "pair": chunk.pair, "layer": chunk.layer, "hook": chunk.hook,
                           "clean": result.clean[0], "corrupted": result.corrupted[0], "method": result.method,
                           "skipped": result.skipped, "seconds": time.perf_counter() - start,
                           "rows": table.to_dict("records")})
            computed += 1
            bar.update(1)
    finally:
        bar.close()
        seconds["sweep"] = time.perf_counter() - sweep_start
    result = _combine(prepared, record)
    files, write_seconds = _write_outputs(prepared, result, out_dir, progress)
    seconds.update(write_seconds)
    seconds["total"] = time.perf_counter() - total_start
    meta = _meta(prepared, record, result, config_hash, seconds, computed, files)
    _atomic_write(out_dir / META_FILE, json.dumps(meta, indent=1, allow_nan=True) + "\n")
    files.append(out_dir / META_FILE)
    return ExperimentRun(result, out_dir, files, meta, computed, len(prepared.chunks) - computed)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _combine(prepared: Prepared, record: _Record) -> SweepResult:
    by_key = {c["key"]: c for c in record.chunks}
    ordered = [by_key[c.key] for c in prepared.chunks]
    rows = [row for c in ordered for row in c["rows"]]
    first = {}
    for c in ordered:
        first.setdefault(c["pair"], c)
    pairs = range(len(prepared.pairs))
    patch = prepared.config.patch
    return SweepResult(table=pd.DataFrame(rows), clean=[first[p]["clean"] for p in pairs],
                       corrupted=[first[p]["corrupted"] for p in pairs], direction=patch.direction, hook=patch.hook,
                       axes=patch.axes)


def _write_outputs(prepared: Prepared, result: SweepResult, out_dir: Path, progress: bool) -> tuple[list[Path], dict]:
    config = prepared.config
    seconds = {}
    start = time.perf_counter()
    path = out_dir / f"results.{config.output.format}"
    tmp = path.with_name(f".{path.name}.tmp")
    if config.output.format == "csv":
        result.table.to_csv(tmp, index=False)
    else:
        result.table.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    files = [path]
    seconds["write_results"] = time.perf_counter() - start
    start = time.perf_counter()
    if config.output.plots:
        from mmlens import plots

        plot = getattr(plots, "plot_patching", None)
        if plot is None:
            _say(progress, "mmlens patch: mmlens.plots.plot_patching is not available; no heatmaps")
        else:
            import matplotlib.pyplot as plt

            for p in range(len(prepared.pairs)):
                fig = plot(result, pair=p, value=config.output.plot_value)
                try:
                    files += plots.save_figure(fig, out_dir / f"heatmap_pair{p}")
                finally:
                    plt.close(fig)
    seconds["plots"] = time.perf_counter() - start
    return files, seconds


def _versions() -> dict:
    import transformers

    import mmlens

    return {"mmlens": mmlens.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "pandas": pd.__version__, "python": platform.python_version()}


def _meta(prepared: Prepared, record: _Record, result: SweepResult, config_hash: str, seconds: dict, computed: int,
          files: list[Path]) -> dict:
    config = prepared.config
    by_pair: dict[int, list[dict]] = {}
    for c in record.chunks:
        by_pair.setdefault(c["pair"], []).append(c)
    baselines = []
    for i, pair in enumerate(prepared.pairs):
        baselines.append({"pair": i, "clean": result.clean[i], "corrupted": result.corrupted[i],
                          "corruption": pair.corruption, "metric_tokens": pair.metric_tokens})
    return {
        "command": "mmlens patch",
        "config_file": str(config.source) if config.source is not None else None,
        "config": config.to_dict(),
        "config_hash": config_hash,
        "seed": config.seed,
        "versions": _versions(),
        "device": str(prepared.hooked.device),
        "timings_s": {k: round(v, 4) for k, v in seconds.items()},
        "chunk_seconds_all_runs": round(sum(c["seconds"] for c in record.chunks), 4),
        "sweep_methods": sorted({c.get("method", "?") for c in record.chunks}),
        "no_op_cells_skipped": sum(c.get("skipped", 0) for c in record.chunks),
        "chunks": {"total": len(prepared.chunks), "computed_this_run": computed,
                   "reused": len(prepared.chunks) - computed, "unit": "pair x layer" if prepared.per_layer else "pair"},
        "baselines": baselines,
        "n_cells": len(result.table),
        "files": [p.name for p in files] + [META_FILE, CHUNKS_FILE],
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def describe(prepared: Prepared) -> str:
    """A short plan of a prepared experiment (what ``mmlens patch --check`` prints)."""
    config = prepared.config
    lines = [f"config {config.source} (hash {config.hash()}): valid",
             f"model {config.model.name} ({prepared.hooked.name}), hook {config.patch.hook}, axes "
             f"{list(config.patch.axes)}, direction {config.patch.direction}",
             f"{len(prepared.pairs)} pair(s), {len(prepared.chunks)} chunk(s) -> {config.output.dir}"]
    for i, pair in enumerate(prepared.pairs):
        n = pair.clean["input_ids"].shape[1] if "input_ids" in pair.clean else "?"
        tokens = ", ".join(f"{k}={v['text']!r} (id {v['id']})" for k, v in pair.metric_tokens.items())
        lines.append(f"  pair {i}: {n} positions; corrupted: {pair.corruption}; metric {config.metric.kind}"
                     + (f" [{tokens}]" if tokens else ""))
    return "\n".join(lines)


__all__ = ["ConfigError", "ExperimentConfig", "ExperimentRun", "Prepared", "ResumeError", "describe", "load_config",
           "make_image", "parse_config", "prepare", "resolve_token", "run_experiment"]
