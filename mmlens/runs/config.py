"""Run configs: typed sections (pydantic), the one loader of TOML / YAML / JSON files, the one hashing rule.

A command's config is a :class:`RunConfig` subclass (:class:`mmlens.runs.patch.PatchConfig`,
:class:`mmlens.runs.evaluate.EvaluationConfig`) built from :class:`Section` tables.
``Config.from_file(path)`` reads and checks a file, ``Config.from_dict(raw)`` what a file parses
to; every problem is a :class:`ConfigError` that names the file and the field as a dotted path
(``metric.kind``, ``inputs.pairs[1].clean``). Field types, choices, ranges and unknown keys are
checked by pydantic; rules across fields by the config's :meth:`RunConfig.check`.

:meth:`RunConfig.hash` is :func:`mmlens.store.config_hash` of what identifies the result: every
section but ``output`` (so never the output folder), plus the sha256 of each input file the config
names (images, circuits).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import tomllib
import torch
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    Strict,
    StrictInt,
    StrictStr,
    ValidationError,
)
from pydantic_core import PydanticCustomError
from typing_extensions import Self

from mmlens.core.wrapper import HookedModel
from mmlens.data.images import image_path, make_image
from mmlens.data.loading import LoadedModel, encode, load_model, model_identity
from mmlens.store import config_hash, file_digest


class ConfigError(ValueError):
    """A bad config value: ``field`` is its dotted path (``metric.kind``, ``inputs.pairs[1].clean``)."""

    def __init__(self, field: str, problem: str, source: str | Path | None = None):
        self.field, self.problem, self.source = field, problem, source
        super().__init__(f"{source}: {field}: {problem}" if source else f"{field}: {problem}")

    def __reduce__(self) -> tuple:
        return type(self), (self.field, self.problem, self.source)

    def with_source(self, source: str | Path | None) -> ConfigError:
        """The same error, naming the config file ``source``."""
        return ConfigError(self.field, self.problem, source) if source is not None else self


def shown(value: Any) -> str:
    """A config value and its type, for error messages: ``'32' (str)``."""
    return f"{value!r} ({type(value).__name__})"


# --- field types -----------------------------------------------------------------------------------


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, (str, int)) else value


def _token(value: Any) -> str | int:
    if (isinstance(value, str) and value) or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise PydanticCustomError("token", "expected a single-token string or a token id (integer >= 0)")


def _folder(value: Any) -> str:
    if isinstance(value, str) and value.strip():
        return os.path.expanduser(value)
    raise PydanticCustomError("folder", "expected a folder path")


Index = Annotated[StrictInt, Field(ge=0)]
"""An integer >= 0 (a row, a layer, a seed)."""
Count = Annotated[StrictInt, Field(ge=1)]
"""An integer >= 1."""
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
"""A finite float or an integer (read as a float); not a bool, a string, NaN or infinity."""
Seed = Annotated[StrictInt, Field(ge=0, le=2**32 - 1)]
"""A seed: an integer in [0, 2**32 - 1] (what every random generator mmlens seeds accepts)."""
Token = Annotated[str | int, PlainValidator(_token)]
"""A string that the model's tokenizer must make into one token, or a token id."""
Folder = Annotated[str, PlainValidator(_folder)]
"""A non-blank folder path."""
Rows = Annotated[tuple[Index, ...], BeforeValidator(_one_or_many), Field(min_length=1)]
"""Rows of a batch: one index or a non-empty list of them."""
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Section(BaseModel):
    """One table of a config: unknown keys are errors, scalars are never coerced across types, frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    """``[model]``: a registry name, hub id or folder, and the device and dtype to load it in."""

    name: StrictStr
    device: StrictStr = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    def load(self, seed: int) -> tuple[LoadedModel, HookedModel]:
        """The model (weights of tiny random models drawn under ``seed``, after ``torch.manual_seed(seed)``)
        and its wrapped form; ConfigError for a bad device or name."""
        try:
            device = torch.device(self.device)
        except RuntimeError as err:
            raise ConfigError("model.device", f"not a torch device: {err}") from None
        torch.manual_seed(seed)
        try:
            loaded = load_model(self.name, device=device, dtype=DTYPES[self.dtype], seed=seed)
        except ValueError as err:
            raise ConfigError("model.name", str(err)) from None
        return loaded, HookedModel(
            loaded.model, tokenizer=loaded.tokenizer, processor=loaded.processor, name=loaded.name
        )


class RunConfig(Section):
    """A whole config file. Subclasses have an ``output`` section with a ``dir``, override
    :meth:`check` for rules across fields and :meth:`input_files` for the files they read."""

    seed: Seed = 0
    """The run's seed: weights of tiny random models, noise and random baselines."""
    _source: Path | None = PrivateAttr(default=None)

    @classmethod
    def from_file(cls, path: str | Path, *, out: str | Path | None = None) -> Self:
        """Read and check a ``.toml``, ``.yaml``/``.yml`` or ``.json`` config; ``out`` overrides
        ``output.dir``. Raises :class:`ConfigError` naming the file and the field."""
        path = Path(path).expanduser()
        if path.is_dir():
            raise FileNotFoundError(f"{path} is a folder; pass a config file (.toml, .yaml or .json) inside it")
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        return cls.from_dict(read_table(path), source=path, out=out)

    @classmethod
    def from_dict(cls, raw: Any, *, source: str | Path | None = None, out: str | Path | None = None) -> Self:
        """Check a config given as nested dicts and lists (what TOML / YAML parse to); relative file
        paths in it start at the folder of ``source``."""
        try:
            if not isinstance(raw, Mapping):
                raise ConfigError("(top level)", f"expected a table (key = value pairs), got {shown(raw)}")
            raw = dict(raw)
            output = raw.get("output", {})
            if out is not None and isinstance(output, Mapping):
                raw["output"] = {**output, "dir": str(out)}
            try:
                config = cls.model_validate(raw)
            except ValidationError as err:
                raise _config_error(cls, err.errors()[0]) from None
            config._source = Path(source) if source is not None else None
            config.check()
            return config
        except ConfigError as err:
            raise err.with_source(source) from None

    @property
    def source(self) -> Path | None:
        """The config file, when read from one."""
        return self._source

    @property
    def folder(self) -> Path | None:
        """Where relative file paths in the config start: the config file's folder."""
        return self._source.parent if self._source is not None else None

    def resolve(self, path: str) -> Path:
        """A file path named in the config: relative paths start at the config file's folder."""
        return image_path(path, self.folder)

    def check(self) -> None:
        """Rules across fields; raise :class:`ConfigError`."""

    def input_files(self) -> dict[str, Path]:
        """The files the result depends on, by their name in the config."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        """The config with every default filled in, as plain JSON data (what the output records)."""
        return self.model_dump(mode="json")

    def identity(self) -> dict[str, Any]:
        """What identifies the result: the config without ``output``, the model's weights
        (:func:`mmlens.data.loading.model_identity`: a local checkpoint's fingerprint, a hub revision)
        and each input file's sha256."""
        data = self.to_dict()
        data.pop("output", None)
        model = getattr(self, "model", None)
        weights = {"model_identity": model_identity(model.name)} if isinstance(model, ModelConfig) else {}
        return {
            **data,
            **weights,
            "input_files": {name: file_digest(path) for name, path in self.input_files().items()},
        }

    def hash(self) -> str:
        """:func:`mmlens.store.config_hash` of :meth:`identity`."""
        return config_hash(self.identity())

    def with_output(self, out: str | Path) -> Self:
        """The same config writing to ``out``."""
        return self.model_copy(update={"output": self.output.model_copy(update={"dir": str(out)})})


# --- reading files and explaining validation errors ------------------------------------------------


def read_table(path: Path) -> Any:
    """A config file's contents as nested dicts and lists; ConfigError for an unknown extension or bad syntax."""
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError("(file)", f"unknown config extension {suffix!r}; use .toml, .yaml, .yml or .json", path)
    if suffix in (".yaml", ".yml"):
        import yaml

        parse, errors = _yaml_without_duplicates, yaml.YAMLError
    elif suffix == ".toml":
        parse, errors = tomllib.loads, tomllib.TOMLDecodeError
    else:
        parse, errors = _json_without_duplicates, json.JSONDecodeError
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            "(file)", f"not UTF-8 text ({err.reason} at byte {err.start}; UTF-16?); save the file as UTF-8", path
        ) from None
    try:
        return parse(text)
    except errors as err:  # the parsers' own syntax errors carry line and column
        raise ConfigError(
            "(file)", f"not valid {suffix.lstrip('.').upper()}: {err}{_repeated_key(err, text)}", path
        ) from None
    except DuplicateKeyError as err:
        raise ConfigError(
            err.field, f"given twice (only one value can hold); delete one of them: {err}", path
        ) from None


def _repeated_key(error: Exception, text: str) -> str:
    """For TOML's "Cannot overwrite a value (at line N ...)": which key is given twice."""
    found = re.search(r"overwrite a value \(at line (\d+)", str(error))
    if not found:
        return ""
    line = text.splitlines()[int(found.group(1)) - 1]
    return f"; key {line.split('=')[0].strip()!r} is given twice: delete one of them"


class DuplicateKeyError(ValueError):
    """A key appears twice in one table of a YAML or JSON config (TOML's parser refuses it itself)."""

    def __init__(self, field: str, detail: str):
        self.field = field
        super().__init__(detail)


def _json_without_duplicates(text: str) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in items:
            if key in seen:
                raise DuplicateKeyError(key, f"key {key!r}")
            seen[key] = value
        return seen

    return json.loads(text, object_pairs_hook=pairs)


def _yaml_without_duplicates(text: str) -> Any:
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
            repeated = sorted({str(k) for k in keys if keys.count(k) > 1})
            if repeated:
                raise DuplicateKeyError(repeated[0], f"key {repeated[0]!r} {node.start_mark}")
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=Loader)


_PROBLEMS = {
    "int_type": "expected an integer",
    "float_type": "expected a number",
    "string_type": "expected a string",
    "bool_type": "expected true or false",
    "literal_error": "expected one of {expected}",
    "greater_than_equal": "expected a value >= {ge}",
    "greater_than": "expected a value > {gt}",
    "less_than_equal": "expected a value <= {le}",
    "finite_number": "expected a finite number (not NaN or infinity)",
    "too_short": "expected at least {min_length} item(s)",
    "model_type": "expected a table (key = value pairs)",
    "dict_type": "expected a table (key = value pairs)",
    "tuple_type": "expected a list",
    "list_type": "expected a list",
}


def dotted(loc: tuple[str | int, ...]) -> str:
    """A pydantic error location as a dotted field path: ``('inputs', 'pairs', 1)`` -> ``inputs.pairs[1]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "[key]":
            out += f".{part}" if out else part
    return out


def _config_error(cls: type[BaseModel], error: Mapping[str, Any]) -> ConfigError:
    loc, kind = tuple(error["loc"]), error["type"]
    field = dotted(loc)
    if kind == "extra_forbidden":
        where = f"[{dotted(loc[:-1])}]" if len(loc) > 1 else "the top level"
        valid = ", ".join(sorted(_section_at(cls, loc[:-1]).model_fields))
        return ConfigError(field, f"unknown key; valid keys in {where}: {valid}")
    if kind == "missing":
        return ConfigError(field, f"missing section [{field}]" if len(loc) == 1 else "missing (required)")
    template = _PROBLEMS.get(kind)
    problem = template.format(**error.get("ctx", {})) if template else error["msg"]
    return ConfigError(field, f"{problem}, got {shown(error['input'])}")


def _section_at(cls: type[BaseModel], loc: tuple[str | int, ...]) -> type[BaseModel]:
    """The section class at ``loc`` (list indices skipped)."""
    for part in loc:
        if isinstance(part, str):
            cls = _model_in(cls.model_fields[part].annotation)
    return cls


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for m in map(_model_in, get_args(annotation)) if m is not None), None)


# --- inputs a config names -------------------------------------------------------------------------


def encode_text(
    loaded: LoadedModel, text: str, image: str | None, folder: Path | None, fields: tuple[str, str]
) -> dict:
    """Model inputs of batch 1 for a config's text and optional image (a file, or
    ``generated:COLOR[-SHAPE]``; see :mod:`mmlens.data.images`); ConfigError at ``fields`` (the
    text's, the image's) when the model cannot take them."""
    try:
        return encode(loaded, text, make_image(image, folder) if image is not None else None)
    except ValueError as err:
        raise ConfigError(
            fields[image is not None], f"{err}; use inputs.example (its example inputs) instead"
        ) from None
