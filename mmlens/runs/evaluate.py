"""Config-driven evaluation of explainers against the three desiderata: ``mmlens evaluate CONFIG``.

A config (TOML, YAML or JSON; see :mod:`mmlens.runs.config`) names a model, a dataset, the
explainers and the metrics::

    seed = 0
    [model]
    name = "tiny-random-llava"            # registry name, hub id or folder; device, dtype optional
    [inputs]
    example = [0, 1]                      # rows of the model's example_inputs(); or
    # texts = [{ text = "...", image = "generated:red-circle" }]
    [explainers]
    methods = ["gradient_x_input", "occlusion", "attention"]
    options = { integrated_gradients = { steps = 16 } }
    [granger]                             # each metric section is optional; present = run it
    distance = "mass"                     # fraction = 0.9; tolerance = 0.05; mode = "joint"
    [faithfulness]
    fractions = [0.0, 0.1, 0.3, 0.5, 1.0] # random_draws = 5
    [stability]
    n = 2                                 # draws per perturbation kind; modalities = [...]
    [circuit]                             # keep/remove a circuit saved with Circuit.save
    file = "circuit.json"                 # ablation = "neutral" | "mean" | "zero"; random_draws = 5
    [output]
    dir = "runs/evaluate_llava"

:func:`run_evaluation` returns an :class:`Evaluation` (the metrics' results) and writes to the
output folder ``metrics.json`` (every number, the config, versions, seed, timings), one CSV per
table, ``summary.txt`` (the table printed on the terminal) and figures. Each (metric, explainer)
part is added to ``parts.jsonl`` (a :class:`mmlens.runs.record.Record`) as it finishes; a rerun
with the same config reuses finished parts, and a different config in the same folder is refused
unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import pandas as pd
from pydantic import Field, StrictStr

from mmlens.core.wrapper import HookedModel
from mmlens.data.images import GENERATED, image_problem
from mmlens.data.loading import LoadedModel
from mmlens.methods.circuits import ABLATIONS, Circuit
from mmlens.methods.explainers import EXPLAINERS
from mmlens.metrics.desiderata import (
    FaithfulnessResult,
    GrangerResult,
    StabilityResult,
    areas,
    circuit_faithfulness,
    faithfulness,
    granger,
    granger_calibration,
    granger_summary,
    stability,
    stability_summary,
)
from mmlens.plots import plot_faithfulness, plot_granger, plot_stability, save_figure
from mmlens.runs.config import ConfigError, Count, Folder, ModelConfig, Number, Rows, RunConfig, Section, encode_text
from mmlens.runs.executors import Executor, RayExecutor, SerialExecutor, compute_missing
from mmlens.runs.record import Record
from mmlens.store import atomic_write, output_lock, versions, write_json

PARTS_FILE = "parts.jsonl"
Explainer = Literal[tuple(EXPLAINERS)]
Fraction = Annotated[Number, Field(ge=0, le=1)]


# --- the config ------------------------------------------------------------------------------------


class TextInput(Section):
    """One input: a text and an optional image (a file, or ``generated:COLOR[-SHAPE]``)."""

    text: StrictStr
    image: StrictStr | None = None


class EvaluationInputs(Section):
    """``[inputs]``: exactly one of ``example`` (rows of the model's example inputs) and ``texts``."""

    example: Rows = ()
    texts: Annotated[tuple[TextInput, ...], Field(min_length=1)] = ()


class ExplainersConfig(Section):
    """``[explainers]``: the explainers to score, and keyword options per explainer."""

    methods: Annotated[tuple[Explainer, ...], Field(min_length=1)]
    options: dict[Explainer, dict[str, Any]] = Field(default_factory=dict)


class GrangerConfig(Section):
    """``[granger]``: the arguments of :func:`mmlens.metrics.desiderata.granger`."""

    distance: Literal["mass", "tv", "relative_l2"] = "mass"
    fraction: Annotated[Number, Field(gt=0, le=1)] = 0.9
    tolerance: Number = 0.05
    mode: Literal["joint", "unimodal"] = "joint"


class FaithfulnessConfig(Section):
    """``[faithfulness]``: the top-k fractions and the random baseline's draws."""

    fractions: Annotated[tuple[Fraction, ...], Field(min_length=2)] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    random_draws: Count = 5


class StabilityConfig(Section):
    """``[stability]``: draws per perturbation kind, and which modalities to perturb (default: all)."""

    n: Count = 4
    modalities: tuple[StrictStr, ...] | None = None


class CircuitConfig(Section):
    """``[circuit]``: a circuit file (written by ``Circuit.save``), how the rest is ablated."""

    file: StrictStr
    ablation: Literal[ABLATIONS] = "neutral"
    random_draws: Count = 5


class EvaluationOutput(Section):
    """``[output]``: the output folder."""

    dir: Folder


class EvaluationConfig(RunConfig):
    """A ``mmlens evaluate`` config file (module docstring)."""

    model: ModelConfig
    inputs: EvaluationInputs
    explainers: ExplainersConfig
    granger: GrangerConfig | None = None
    faithfulness: FaithfulnessConfig | None = None
    stability: StabilityConfig | None = None
    circuit: CircuitConfig | None = None
    output: EvaluationOutput

    @property
    def circuit_file(self) -> Path | None:
        """The circuit file (relative paths start at the config file's folder)."""
        return self.resolve(self.circuit.file) if self.circuit is not None else None

    def input_files(self) -> dict[str, Path]:
        """The image files of the inputs and the circuit file."""
        files = {
            t.image: self.resolve(t.image)
            for t in self.inputs.texts
            if t.image is not None and not t.image.startswith(GENERATED)
        }
        return files | ({self.circuit.file: self.circuit_file} if self.circuit is not None else {})

    def check(self) -> None:
        """At least one metric; one source of inputs; images that exist; a circuit that loads."""
        if not any((self.granger, self.faithfulness, self.stability, self.circuit)):
            raise ConfigError(
                "(top level)",
                "no metric section: add at least one of [granger], [faithfulness], [stability], [circuit]",
            )
        if bool(self.inputs.example) == bool(self.inputs.texts):
            raise ConfigError("inputs", "give exactly one of example (rows of the model's example inputs) or texts")
        for i, item in enumerate(self.inputs.texts):
            problem = image_problem(item.image, self.folder) if item.image is not None else None
            if problem:
                raise ConfigError(f"inputs.texts[{i}].image", problem)
        if self.circuit is not None:
            if not self.circuit_file.is_file():
                raise ConfigError(
                    "circuit.file", f"no circuit JSON at {self.circuit_file} (write one with Circuit.save)"
                )
            try:
                Circuit.load(self.circuit_file)
            except (ValueError, KeyError, TypeError) as err:
                raise ConfigError("circuit.file", f"not a circuit: {err}") from None


# --- running ---------------------------------------------------------------------------------------

METRICS = ("granger", "faithfulness", "stability")
"""The per-explainer metrics, in the order each explainer's parts are computed."""


@dataclass
class Evaluation:
    """What :func:`run_evaluation` returns: per metric, the combined result over explainers."""

    config: EvaluationConfig
    granger: GrangerResult | None
    faithfulness: dict[str, FaithfulnessResult]
    stability: StabilityResult | None
    circuit: pd.DataFrame | None
    seconds: dict[str, float]
    files: list[Path]

    def summary(self) -> pd.DataFrame:
        """One row per explainer: the headline number of each metric (see the column names)."""
        rows = []
        for name in self.config.explainers.methods:
            row: dict[str, Any] = {"explainer": name}
            if self.granger is not None and not self.granger.summary.empty:
                g = self.granger.summary[self.granger.summary.explainer == name]
                row["granger_kappa_min"] = float(g.kappa.min())
                row["granger_spearman_mean"] = float(g.spearman_importance.mean())
            if name in self.faithfulness:
                a = self.faithfulness[name].areas
                joint = a[a.scope == a.scope.iloc[-1]].set_index("source")
                row["necessity_auc"] = float(joint.loc["explanation", "auc_necessity_drop"])
                row["necessity_auc_random"] = float(joint.loc["random", "auc_necessity_drop"])
                row["sufficiency_aoc"] = float(joint.loc["explanation", "aoc_sufficiency_gap"])
                row["sufficiency_aoc_random"] = float(joint.loc["random", "aoc_sufficiency_gap"])
            if self.stability is not None and not self.stability.summary.empty:
                s = self.stability.summary[self.stability.summary.explainer == name]
                row["stability_intra_p95"] = float(s[s.equation == "intra (6)"].p95.max())
                row["stability_cross_p95"] = float(s[s.equation == "cross (7)"].p95.max())
            rows.append(row)
        return pd.DataFrame(rows)


def dataset(config: EvaluationConfig, loaded: LoadedModel, hooked: HookedModel) -> list[dict]:
    """The inputs a config names, one batch-1 dict each; ConfigError for rows that do not exist."""
    if config.inputs.example:
        batch = loaded.example_inputs()
        n = hooked.spans(batch).batch_size
        bad = [r for r in config.inputs.example if r >= n]
        if bad:
            raise ConfigError("inputs.example", f"rows {bad} do not exist: the example inputs have {n} rows")
        return [hooked.rows(batch, r) for r in config.inputs.example]
    return [
        encode_text(loaded, t.text, t.image, config.folder, (f"inputs.texts[{i}].text", f"inputs.texts[{i}].image"))
        for i, t in enumerate(config.inputs.texts)
    ]


def run_evaluation(
    config: EvaluationConfig | str | Path,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    executor: Executor | None = None,
) -> Evaluation:
    """Run (or continue) every configured metric for every explainer and write the output folder
    (module docstring). ``executor`` says where the parts are computed (:mod:`mmlens.runs.executors`;
    default: serially in this process; :func:`ray_executor` for Ray); the results are the same either
    way. A KeyboardInterrupt propagates after the parts finished so far are saved."""
    if not isinstance(config, EvaluationConfig):
        config = EvaluationConfig.from_file(config, out=out)
    elif out is not None:
        config = config.with_output(out)
    with output_lock(config.output.dir) as out_dir:
        return _evaluate_locked(config, out_dir, overwrite, progress, executor or SerialExecutor())


@dataclass
class Part:
    """One unit of work: ``metric`` x ``explainer`` (``"circuit"`` has no explainer)."""

    key: str
    metric: str
    explainer: str | None
    progress: bool


@dataclass
class PreparedEvaluation:
    """A config with its model loaded and its inputs built (what each worker holds)."""

    config: EvaluationConfig
    loaded: LoadedModel
    hooked: HookedModel
    data: list[dict]
    seconds: dict[str, float]


def prepare_evaluation(config: EvaluationConfig) -> PreparedEvaluation:
    """Load the model and build the inputs; ConfigError (naming the config file) for bad rows or texts."""
    start = time.perf_counter()
    try:
        loaded, hooked = config.model.load(config.seed)
        data = dataset(config, loaded, hooked)
    except ConfigError as err:
        raise err.with_source(config.source) from None
    return PreparedEvaluation(config, loaded, hooked, data, {"load": time.perf_counter() - start})


def prepare_from_dict(raw: dict[str, Any], source: str | None) -> PreparedEvaluation:
    """:func:`prepare_evaluation` of a config given as data (what a Ray worker receives)."""
    return prepare_evaluation(EvaluationConfig.from_dict(raw, source=source))


def ray_executor(config: EvaluationConfig, address: str | None = None, workers: int | None = None) -> RayExecutor:
    """A :class:`~mmlens.runs.executors.RayExecutor` whose workers each load ``config``'s model once."""
    source = str(config.source) if config.source is not None else None
    raw = config.model_dump(mode="json", exclude_unset=True)
    return RayExecutor(partial(prepare_from_dict, raw, source), address=address, workers=workers)


def plan_parts(config: EvaluationConfig, progress: bool) -> list[Part]:
    """The parts of a config, in the order a serial run computes them (explainer by explainer)."""
    parts = [
        Part(f"{metric}_{name}", metric, name, progress)
        for name in config.explainers.methods
        for metric in METRICS
        if getattr(config, metric) is not None
    ]
    return parts + ([Part("circuit", "circuit", None, progress)] if config.circuit is not None else [])


def compute_part(prepared: PreparedEvaluation, part: Part) -> dict[str, Any]:
    """One part's record entry: its key, tables (and extras) and the seconds it took."""
    start = time.perf_counter()
    config, hooked, data = prepared.config, prepared.hooked, prepared.data
    if part.metric == "circuit":
        entry = _circuit_part(config, hooked, data, part.progress)
    else:
        entry = _part(config, hooked, data, part.metric, part.explainer, part.progress)
    return {"key": part.key, **entry, "seconds": time.perf_counter() - start}


def _evaluate_locked(
    config: EvaluationConfig, out_dir: Path, overwrite: bool, progress: bool, executor: Executor
) -> Evaluation:
    """:func:`run_evaluation` while this process holds the output folder's lock; ``overwrite``
    first removes every output a previous run wrote there (no stale tables of dropped explainers)."""
    record = Record.continuing(out_dir / PARTS_FILE, config.identity(), overwrite=overwrite)  # before the model load
    if overwrite:
        for stale in [out_dir / PARTS_FILE, out_dir / "summary.txt", out_dir / "metrics.json", *out_dir.glob("*.csv")]:
            stale.unlink(missing_ok=True)
    prepared = prepare_evaluation(config)
    seconds = dict(prepared.seconds)
    record = record or Record.create(out_dir / PARTS_FILE, "mmlens-evaluate", config.identity())
    # a Ray worker's own bars would interleave with the driver's: there, only the driver's bar over parts
    plan = plan_parts(config, progress and isinstance(executor, SerialExecutor))
    _compute_parts(prepared, plan, record, progress, executor, seconds)
    entries = {part.key: record.get(part.key) for part in plan}
    parts = {metric: [entries[p.key] for p in plan if p.metric == metric] for metric in METRICS}
    circuit = pd.DataFrame(entries["circuit"]["tables"]["table"]) if config.circuit is not None else None
    evaluation = Evaluation(
        config,
        _granger_result(config.granger, parts["granger"]),
        _faithfulness_results(config, parts["faithfulness"]),
        _stability_result(parts["stability"]),
        circuit,
        seconds,
        [],
    )
    evaluation.files = _write(evaluation, out_dir)
    return evaluation


def _compute_parts(
    prepared: PreparedEvaluation,
    plan: list[Part],
    record: Record,
    progress: bool,
    executor: Executor,
    seconds: dict[str, float],
) -> None:
    """Compute every part the record lacks on ``executor``, adding each as it finishes (its time to
    ``seconds``)."""
    done = compute_missing(
        executor, prepared, plan, compute_part, record, desc="evaluating", unit="part", progress=progress
    )
    seconds.update((entry["key"], entry["seconds"]) for entry in done)


def _records(**tables: pd.DataFrame) -> dict[str, list[dict]]:
    """Tables as JSON records (NaN as null)."""
    return {k: json.loads(v.to_json(orient="records")) for k, v in tables.items()}


def _part(
    config: EvaluationConfig, hooked: HookedModel, data: list[dict], metric: str, name: str, progress: bool
) -> dict:
    """The part ``metric`` x explainer ``name``: its tables (and extras)."""
    options = config.explainers.options.get(name, {})
    if metric == "granger":
        g = config.granger
        r = granger(hooked, data, [name], mode=g.mode, distance=g.distance, options={name: options}, progress=progress)
        return {"tables": _records(influence=r.influence, explanations=r.explanations)}
    if metric == "faithfulness":
        f = config.faithfulness
        curves = faithfulness(
            hooked,
            data,
            name,
            fractions=list(f.fractions),
            random_draws=f.random_draws,
            seed=config.seed,
            options=options,
            progress=progress,
        ).curves
        return {"tables": _records(curves=curves)}
    s = config.stability
    r = stability(
        hooked,
        data,
        [name],
        modalities=list(s.modalities) if s.modalities is not None else None,
        n=s.n,
        seed=config.seed,
        options={name: options},
        progress=progress,
    )
    return {"tables": _records(samples=r.samples), "skipped": r.skipped}


def _circuit_part(config: EvaluationConfig, hooked: HookedModel, data: list[dict], progress: bool) -> dict:
    """The circuit's keep/remove table."""
    c = config.circuit
    table = circuit_faithfulness(
        hooked,
        data,
        Circuit.load(config.circuit_file),
        c.ablation,
        random_draws=c.random_draws,
        seed=config.seed,
        progress=progress,
    )
    return {"tables": _records(table=table)}


def _granger_result(g: GrangerConfig | None, parts: list[dict]) -> GrangerResult | None:
    if g is None:
        return None
    influence = pd.DataFrame(parts[0]["tables"]["influence"])
    explanations = pd.concat([pd.DataFrame(p["tables"]["explanations"]) for p in parts], ignore_index=True)
    return GrangerResult(
        influence,
        explanations,
        *granger_summary(explanations, g.fraction, g.tolerance),
        g.distance,
        g.fraction,
        g.tolerance,
        granger_calibration(explanations),
    )


def _faithfulness_results(config: EvaluationConfig, parts: list[dict]) -> dict[str, FaithfulnessResult]:
    names = config.explainers.methods if config.faithfulness is not None else ()
    curves = {name: pd.DataFrame(p["tables"]["curves"]) for name, p in zip(names, parts)}
    return {name: FaithfulnessResult(c, areas(c), name) for name, c in curves.items()}


def _stability_result(parts: list[dict]) -> StabilityResult | None:
    if not parts:
        return None
    samples = pd.concat([pd.DataFrame(p["tables"]["samples"]) for p in parts], ignore_index=True)
    skipped = {k: v for p in parts for k, v in p.get("skipped", {}).items()}
    return StabilityResult(samples, stability_summary(samples), skipped)


def _tables(evaluation: Evaluation) -> dict[str, pd.DataFrame]:
    """Every table of an evaluation by its file stem, the summary last."""
    tables: dict[str, pd.DataFrame] = {}
    if evaluation.granger is not None:
        g = evaluation.granger
        tables.update(
            granger_influence=g.influence,
            granger_explanations=g.explanations,
            granger_summary=g.summary,
            granger_violations=g.violations,
        )
    for name, result in evaluation.faithfulness.items():
        tables[f"faithfulness_curves_{name}"] = result.curves
        tables[f"faithfulness_areas_{name}"] = result.areas
    if evaluation.stability is not None:
        tables.update(stability_samples=evaluation.stability.samples, stability_summary=evaluation.stability.summary)
    if evaluation.circuit is not None:
        tables["circuit_faithfulness"] = evaluation.circuit
    tables["summary"] = evaluation.summary()
    return tables


def _write(evaluation: Evaluation, out: Path) -> list[Path]:
    """metrics.json, one CSV per table, summary.txt and the figures."""
    import matplotlib.pyplot as plt

    tables = _tables(evaluation)
    files = [atomic_write(out / f"{key}.csv", table.to_csv(index=False)) for key, table in tables.items()]
    text = tables["summary"].to_string(index=False, float_format=lambda v: f"{v:.4g}")
    files.append(atomic_write(out / "summary.txt", text + "\n"))
    config = evaluation.config
    metrics = {
        "command": "mmlens evaluate",
        "config": config.to_dict(),
        "config_hash": config.hash(),
        "config_file": str(config.source) if config.source is not None else None,
        "seed": config.seed,
        "versions": versions(),
        "timings_s": {k: round(v, 4) for k, v in evaluation.seconds.items()},
        "definitions": {
            "granger.delta_js": "Jensen-Shannon divergence (nats) of the final-position distributions, input vs the "
            "modality at its neutral reference",
            "granger.delta": f"explanation distance ({evaluation.granger.distance if evaluation.granger else 'tv'}) "
            "of the other modality's explanation",
            "faithfulness": "f = probability of the input's predicted token; keep/remove the top-k fraction of each "
            "modality's positions, the rest/those at the neutral reference embedding",
            "stability.ratio": "L2 change of the raw scores at the explained modality / L2 change of the LM input "
            "embeddings at the perturbed modality; prediction-changing perturbations dropped",
        },
        "tables": _records(**tables),
        "stability_skipped": evaluation.stability.skipped if evaluation.stability else {},
    }
    files.append(write_json(out / "metrics.json", metrics))
    figures: list[tuple[str, Any]] = []
    if evaluation.faithfulness:
        figures.append(("faithfulness", plot_faithfulness(evaluation.faithfulness)))
    if evaluation.granger is not None and not evaluation.granger.explanations.empty:
        figures.append(("granger", plot_granger(evaluation.granger)))
    if evaluation.stability is not None and not evaluation.stability.samples.empty:
        figures.append(("stability", plot_stability(evaluation.stability)))
    for stem, fig in figures:
        files += save_figure(fig, out / stem)
        plt.close(fig)
    return files


def print_summary(evaluation: Evaluation) -> None:
    """The terminal report: the headline table, then where everything was written."""
    print(evaluation.summary().to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(
        "columns: granger_kappa_min (smallest kappa over modality pairs; higher = explanations follow the "
        "model's dependence), necessity/sufficiency areas (explanation vs random top-k), stability p95 ratios "
        "(lower = more stable)"
    )
    if evaluation.circuit is not None:
        means = evaluation.circuit.groupby("source", sort=False)[["sufficiency_gap", "necessity_drop"]].mean()
        print(f"circuit ({evaluation.config.circuit_file}), mean over inputs:")
        print(means.to_string(float_format=lambda v: f"{v:.4g}"))
    for path in evaluation.files:
        print(f"  {path}")


__all__ = [
    "PARTS_FILE",
    "Evaluation",
    "EvaluationConfig",
    "Part",
    "PreparedEvaluation",
    "compute_part",
    "dataset",
    "plan_parts",
    "prepare_evaluation",
    "print_summary",
    "ray_executor",
    "run_evaluation",
]
