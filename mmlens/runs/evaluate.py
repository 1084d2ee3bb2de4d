"""Config-driven evaluation of explainers against the three desiderata: ``mmlens evaluate CONFIG``.

A config (TOML, YAML or JSON) names a model, a dataset, the explainers and the metrics::

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
    distance = "tv"                       # fraction = 0.9; tolerance = 0.05; mode = "joint"
    [faithfulness]
    fractions = [0.0, 0.1, 0.3, 0.5, 1.0] # random_draws = 5
    [stability]
    n = 2                                 # draws per perturbation kind; modalities = [...]
    [circuit]                             # keep/remove a circuit saved with Circuit.save
    file = "circuit.json"                 # ablation = "neutral" | "mean" | "zero"; random_draws = 5
    [output]
    dir = "runs/evaluate_llava"

:func:`evaluate` returns an :class:`Evaluation` (the metrics' results) and writes to the output
folder ``metrics.json`` (every number, the config, versions, seed, timings), one CSV per table,
``summary.txt`` (the table printed on the terminal) and figures. Each (metric, explainer) part is
saved to ``parts/`` as it finishes; a rerun with the same config reuses finished parts, and a
different config in the same folder is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mmlens.metrics.desiderata import (FaithfulnessResult, GrangerResult, StabilityResult, areas, granger_summary,
                         stability_summary, faithfulness, granger, stability)
from mmlens.runs.experiments import (DTYPES, ConfigError, ModelConfig, ResumeError, _atomic_write, _desc, _encode, _float,
                          _int, _keys, _model, _str, _table, _versions)
from mmlens.methods.explainers import EXPLAINERS

_SECTIONS = ("model", "inputs", "explainers", "granger", "faithfulness", "stability", "circuit", "output", "seed")


@dataclass(frozen=True)
class EvaluationConfig:
    model: ModelConfig
    example: tuple[int, ...] | None
    texts: tuple[tuple[str, str | None], ...] | None
    methods: tuple[str, ...]
    options: dict
    granger: dict | None
    faithfulness: dict | None
    stability: dict | None
    circuit: dict | None
    out: str
    seed: int = 0
    source: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("source")
        return data

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_evaluation_config(path: str | Path, *, out: str | Path | None = None) -> EvaluationConfig:
    """Read and check an evaluation config; every error names the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib

            raw = tomllib.loads(path.read_text())
        elif suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(path.read_text())
        elif suffix == ".json":
            raw = json.loads(path.read_text())
        else:
            raise ConfigError("(file)", f"unknown config extension {suffix!r}; use .toml, .yaml, .yml or .json")
        return parse_evaluation_config(raw, source=path, out=out)
    except ConfigError as err:
        raise err.with_source(path) from None
    except (ValueError, TypeError) as err:  # the parsers' own syntax errors
        raise ConfigError("(file)", f"not valid {suffix.lstrip('.').upper()}: {err}", path) from None


def parse_evaluation_config(raw: Any, *, source: str | Path | None = None,
                            out: str | Path | None = None) -> EvaluationConfig:
    """Check a config given as nested dicts (what TOML/YAML parse to)."""
    top = _table(raw, "(top level)")
    _keys(top, "", _SECTIONS)
    for name in ("model", "inputs", "explainers", "output"):
        if name not in top:
            raise ConfigError(name, f"missing section [{name}]")
    if not any(name in top for name in ("granger", "faithfulness", "stability", "circuit")):
        raise ConfigError("(top level)", "no metric section: add at least one of [granger], [faithfulness], "
                                         "[stability], [circuit]")
    inputs = _table(top["inputs"], "inputs")
    _keys(inputs, "inputs", ("example", "texts"))
    if ("example" in inputs) == ("texts" in inputs):
        raise ConfigError("inputs", "give exactly one of example (rows of the model's example inputs) or texts")
    example = texts = None
    if "example" in inputs:
        rows = inputs["example"]
        if not isinstance(rows, list) or not rows or not all(isinstance(r, int) and r >= 0 for r in rows):
            raise ConfigError("inputs.example", f"expected a non-empty list of row indices, got {_desc(rows)}")
        example = tuple(rows)
    else:
        items = inputs["texts"]
        if not isinstance(items, list) or not items:
            raise ConfigError("inputs.texts", f"expected a non-empty list of {{text = ..., image = ...}}, got {_desc(items)}")
        parsed = []
        for i, item in enumerate(items):
            item = _table(item, f"inputs.texts[{i}]")
            _keys(item, f"inputs.texts[{i}]", ("text", "image"))
            parsed.append((_str(item, "text", f"inputs.texts[{i}]"), _str(item, "image", f"inputs.texts[{i}]", default=None)))
        texts = tuple(parsed)
    explainers = _table(top["explainers"], "explainers")
    _keys(explainers, "explainers", ("methods", "options"))
    methods = explainers.get("methods")
    if not isinstance(methods, list) or not methods:
        raise ConfigError("explainers.methods", f"expected a non-empty list of {sorted(EXPLAINERS)}, got {_desc(methods)}")
    for i, m in enumerate(methods):
        if m not in EXPLAINERS:
            raise ConfigError(f"explainers.methods[{i}]", f"expected one of {sorted(EXPLAINERS)}; got {m!r}")
    options = _table(explainers.get("options", {}), "explainers.options")
    for name in options:
        if name not in EXPLAINERS:
            raise ConfigError(f"explainers.options.{name}", f"not an explainer; expected one of {sorted(EXPLAINERS)}")
        _table(options[name], f"explainers.options.{name}")
    output = dict(_table(top["output"], "output"))
    _keys(output, "output", ("dir",))
    if out is not None:
        output["dir"] = str(out)
    return EvaluationConfig(
        model=_model(_table(top["model"], "model")), example=example, texts=texts, methods=tuple(methods),
        options={k: dict(v) for k, v in options.items()},
        granger=_granger(top["granger"]) if "granger" in top else None,
        faithfulness=_faithfulness(top["faithfulness"]) if "faithfulness" in top else None,
        stability=_stability(top["stability"]) if "stability" in top else None,
        circuit=_circuit(top["circuit"], Path(source).parent if source else None) if "circuit" in top else None,
        out=_str(output, "dir", "output"), seed=_int(top, "seed", "", default=0, minimum=0),
        source=str(source) if source is not None else None)


def _granger(t: Any) -> dict:
    t = _table(t, "granger")
    _keys(t, "granger", ("distance", "fraction", "tolerance", "mode"))
    fraction = _float(t, "fraction", "granger", default=0.9, positive=True)
    if fraction > 1:
        raise ConfigError("granger.fraction", f"expected a fraction in (0, 1], got {fraction}")
    return {"distance": _str(t, "distance", "granger", default="tv", choices=("tv", "relative_l2")),
            "fraction": fraction, "tolerance": _float(t, "tolerance", "granger", default=0.05),
            "mode": _str(t, "mode", "granger", default="joint", choices=("joint", "unimodal"))}


def _faithfulness(t: Any) -> dict:
    t = _table(t, "faithfulness")
    _keys(t, "faithfulness", ("fractions", "random_draws"))
    fractions = t.get("fractions", [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0])
    if not isinstance(fractions, list) or len(fractions) < 2 or not all(
            isinstance(k, (int, float)) and 0 <= k <= 1 for k in fractions):
        raise ConfigError("faithfulness.fractions", f"expected at least two fractions in [0, 1], got {_desc(fractions)}")
    return {"fractions": [float(k) for k in fractions],
            "random_draws": _int(t, "random_draws", "faithfulness", default=5, minimum=1)}


def _stability(t: Any) -> dict:
    t = _table(t, "stability")
    _keys(t, "stability", ("n", "modalities"))
    modalities = t.get("modalities")
    if modalities is not None and (not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities)):
        raise ConfigError("stability.modalities", f"expected a list of modality names, got {_desc(modalities)}")
    return {"n": _int(t, "n", "stability", default=4, minimum=1), "modalities": modalities}


def _circuit(t: Any, folder: Path | None) -> dict:
    from mmlens.methods.circuits import ABLATIONS, Circuit

    t = _table(t, "circuit")
    _keys(t, "circuit", ("file", "ablation", "random_draws"))
    path = Path(_str(t, "file", "circuit"))
    path = path if path.is_absolute() or folder is None else folder / path
    if not path.is_file():
        raise ConfigError("circuit.file", f"no circuit JSON at {path} (write one with Circuit.save)")
    try:
        Circuit.load(path)
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError("circuit.file", f"not a circuit: {err}") from None
    return {"file": str(path), "ablation": _str(t, "ablation", "circuit", default="neutral", choices=tuple(ABLATIONS)),
            "random_draws": _int(t, "random_draws", "circuit", default=5, minimum=1)}


@dataclass
class Evaluation:
    """What :func:`evaluate` returns: per metric, the combined result over explainers."""

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
        for name in self.config.methods:
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


def _dataset(config: EvaluationConfig, loaded, hooked) -> list[dict]:
    if config.example is not None:
        batch = loaded.example_inputs()
        n = hooked.spans(batch).batch_size
        bad = [r for r in config.example if r >= n]
        if bad:
            raise ConfigError("inputs.example", f"rows {bad} do not exist: the example inputs have {n} rows")
        return [{k: (v[r:r + 1] if isinstance(v, torch.Tensor) and k not in ("node_features", "edge_index") else v)
                 for k, v in batch.items()} for r in config.example]
    source = Path(config.source).parent if config.source else None
    return [_encode(loaded, hooked, text, image, source, f"inputs.texts[{i}]")
            for i, (text, image) in enumerate(config.texts)]


class _Parts:
    """Finished (metric, explainer) parts in ``out/parts/``, tagged with the config hash."""

    def __init__(self, out: Path, config_hash: str, overwrite: bool):
        self.folder = out / "parts"
        self.hash = config_hash
        stamp = out / "config_hash.txt"
        if stamp.is_file() and stamp.read_text().strip() != config_hash and not overwrite:
            raise ResumeError(f"{out} holds an evaluation of a different config (hash {stamp.read_text().strip()}, this "
                              f"one {config_hash}); use another output folder, or overwrite=True / --overwrite")
        if overwrite and self.folder.is_dir():
            for f in self.folder.glob("*.json"):
                f.unlink()
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(stamp, config_hash + "\n")

    def get(self, key: str) -> dict | None:
        path = self.folder / f"{key}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def put(self, key: str, tables: dict[str, pd.DataFrame], extra: dict | None = None) -> dict:
        data = {"tables": {k: json.loads(v.to_json(orient="records")) for k, v in tables.items()}, **(extra or {})}
        _atomic_write(self.folder / f"{key}.json", json.dumps(data))
        return data


def evaluate(config: EvaluationConfig | str | Path, *, out: str | Path | None = None, overwrite: bool = False,
             progress: bool = True) -> Evaluation:
    """Run every configured metric for every explainer; see the module docstring for the files."""
    import mmlens
    from mmlens.data.loading import load_model

    if not isinstance(config, EvaluationConfig):
        config = load_evaluation_config(config, out=out)
    elif out is not None:
        config = EvaluationConfig(**{**config.__dict__, "out": str(out)})
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    try:
        loaded = load_model(config.model.name, device=torch.device(config.model.device),
                            dtype=DTYPES[config.model.dtype], seed=config.seed)
    except ValueError as err:
        raise ConfigError("model.name", str(err)) from None
    hooked = mmlens.wrap(loaded.model, tokenizer=loaded.tokenizer, processor=loaded.processor, name=loaded.name)
    dataset = _dataset(config, loaded, hooked)
    seconds["load"] = time.perf_counter() - start
    out_dir = Path(config.out)
    parts = _Parts(out_dir, config.hash(), overwrite)
    options = config.options

    def part(key: str, compute) -> dict:
        found = parts.get(key)
        if found is not None:
            return found
        begin = time.perf_counter()
        tables, extra = compute()
        seconds[key] = time.perf_counter() - begin
        return parts.put(key, tables, extra)

    granger_tables, faith, stab_tables, skipped = [], {}, [], {}
    for name in config.methods:
        kwargs = {name: options.get(name, {})}
        if config.granger is not None:
            g = config.granger
            data = part(f"granger_{name}", lambda: (lambda r: ({"influence": r.influence, "explanations": r.explanations},
                                                               {}))(granger(hooked, dataset, [name], mode=g["mode"],
                                                                            distance=g["distance"], options=kwargs,
                                                                            progress=progress)))
            granger_tables.append(data["tables"])
        if config.faithfulness is not None:
            f = config.faithfulness
            data = part(f"faithfulness_{name}", lambda: ({"curves": faithfulness(
                hooked, dataset, name, fractions=f["fractions"], random_draws=f["random_draws"], seed=config.seed,
                options=options.get(name, {}), progress=progress).curves}, {}))
            curves = pd.DataFrame(data["tables"]["curves"])
            faith[name] = FaithfulnessResult(curves, areas(curves), name)
        if config.stability is not None:
            st = config.stability
            data = part(f"stability_{name}", lambda: (lambda r: ({"samples": r.samples}, {"skipped": r.skipped}))(
                stability(hooked, dataset, [name], modalities=st["modalities"], n=st["n"], seed=config.seed,
                          options=kwargs, progress=progress)))
            stab_tables.append(pd.DataFrame(data["tables"]["samples"]))
            skipped.update(data.get("skipped", {}))
    granger_result = None
    if config.granger is not None:
        influence = pd.DataFrame(granger_tables[0]["influence"])
        explanations = pd.concat([pd.DataFrame(t["explanations"]) for t in granger_tables], ignore_index=True)
        g = config.granger
        granger_result = GrangerResult(influence, explanations, *granger_summary(explanations, g["fraction"],
                                                                                  g["tolerance"]),
                                       g["distance"], g["fraction"], g["tolerance"])
    stability_result = None
    if config.stability is not None:
        samples = pd.concat(stab_tables, ignore_index=True)
        stability_result = StabilityResult(samples, stability_summary(samples), skipped)
    circuit_table = None
    if config.circuit is not None:
        from mmlens.methods.circuits import Circuit
        from mmlens.metrics.desiderata import circuit_faithfulness

        c = config.circuit
        data = part("circuit", lambda: ({"table": circuit_faithfulness(
            hooked, dataset, Circuit.load(c["file"]), c["ablation"], random_draws=c["random_draws"], seed=config.seed,
            progress=progress)}, {}))
        circuit_table = pd.DataFrame(data["tables"]["table"])
    evaluation = Evaluation(config, granger_result, faith, stability_result, circuit_table, seconds, [])
    evaluation.files = _write(evaluation, out_dir)
    return evaluation


def _write(evaluation: Evaluation, out: Path) -> list[Path]:
    """metrics.json, one CSV per table, summary.txt and the figures."""
    from mmlens.plots import plot_faithfulness, plot_granger, plot_stability, save_figure

    files = []
    tables: dict[str, pd.DataFrame] = {}
    if evaluation.granger is not None:
        tables.update(granger_influence=evaluation.granger.influence, granger_explanations=evaluation.granger.explanations,
                      granger_summary=evaluation.granger.summary, granger_violations=evaluation.granger.violations)
    for name, result in evaluation.faithfulness.items():
        tables[f"faithfulness_curves_{name}"] = result.curves
        tables[f"faithfulness_areas_{name}"] = result.areas
    if evaluation.stability is not None:
        tables.update(stability_samples=evaluation.stability.samples, stability_summary=evaluation.stability.summary)
    if evaluation.circuit is not None:
        tables["circuit_faithfulness"] = evaluation.circuit
    summary = evaluation.summary()
    tables["summary"] = summary
    for key, table in tables.items():
        path = out / f"{key}.csv"
        _atomic_write(path, table.to_csv(index=False))
        files.append(path)
    text = summary.to_string(index=False, float_format=lambda v: f"{v:.4g}")
    _atomic_write(out / "summary.txt", text + "\n")
    files.append(out / "summary.txt")
    metrics = {
        "command": "mmlens evaluate", "config": evaluation.config.to_dict(), "config_hash": evaluation.config.hash(),
        "config_file": evaluation.config.source, "seed": evaluation.config.seed, "versions": _versions(),
        "timings_s": {k: round(v, 4) for k, v in evaluation.seconds.items()},
        "definitions": {
            "granger.delta_js": "Jensen-Shannon divergence (nats) of the final-position distributions, input vs the "
                                "modality at its neutral reference",
            "granger.delta": f"explanation distance ({evaluation.granger.distance if evaluation.granger else 'tv'}) "
                             "of the other modality's explanation",
            "faithfulness": "f = probability of the input's predicted token; keep/remove the top-k fraction of each "
                            "modality's positions, the rest/those at the neutral reference embedding",
            "stability.ratio": "L2 change of the raw scores at the explained modality / L2 change of the LM input "
                               "embeddings at the perturbed modality; prediction-changing perturbations dropped"},
        "tables": {k: json.loads(v.to_json(orient="records")) for k, v in tables.items()},
        "stability_skipped": evaluation.stability.skipped if evaluation.stability else {},
    }
    _atomic_write(out / "metrics.json", json.dumps(metrics, indent=1))
    files.append(out / "metrics.json")
    figures: list[tuple[str, Any]] = []
    if evaluation.faithfulness:
        figures.append(("faithfulness", plot_faithfulness(evaluation.faithfulness)))
    if evaluation.granger is not None and not evaluation.granger.explanations.empty:
        figures.append(("granger", plot_granger(evaluation.granger)))
    if evaluation.stability is not None and not evaluation.stability.samples.empty:
        figures.append(("stability", plot_stability(evaluation.stability)))
    import matplotlib.pyplot as plt

    for stem, fig in figures:
        files += save_figure(fig, out / stem)
        plt.close(fig)
    return files


def print_summary(evaluation: Evaluation) -> None:
    """The terminal report: the headline table, then where everything was written."""
    print(evaluation.summary().to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print("columns: granger_kappa_min (smallest kappa over modality pairs; higher = explanations follow the "
          "model's dependence), necessity/sufficiency areas (explanation vs random top-k), stability p95 ratios "
          "(lower = more stable)")
    if evaluation.circuit is not None:
        means = evaluation.circuit.groupby("source", sort=False)[["sufficiency_gap", "necessity_drop"]].mean()
        print(f"circuit ({evaluation.config.circuit['file']}), mean over inputs:")
        print(means.to_string(float_format=lambda v: f"{v:.4g}"))
    for path in evaluation.files:
        print(f"  {path}")


__all__ = ["Evaluation", "EvaluationConfig", "evaluate", "load_evaluation_config", "parse_evaluation_config",
           "print_summary"]
