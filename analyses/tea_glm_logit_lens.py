"""The TEA-GLM logit-lens reproduction (mmlens's main job).

A GraphSAGE encoder, pretrained with TEA-GLM's objective on text-attributed Cora, feeds a linear
projector that turns each node into K=5 "graph tokens" in a frozen LLM's prompt; the projector is
trained on a 7-class node-classification instruction. The logit lens then decodes every layer at
the graph-token and text positions of test prompts, and the run states whether graph tokens evolve
measurably less than text tokens (the explainability paper's observation).

    python -m mmlens.analyses.tea_glm_logit_lens [--llm smollm2-135m-instruct] [--dataset cora]
        [--data-dir DIR] [--out DIR] [--seed 0] [--tuned-lens-steps N] [--quick]

Outputs (``--out``, default ``results/tea_glm_logit_lens``): ``logit_lens.png/.svg`` (the grid for
one representative node), ``evolution.png/.svg`` (graph vs text across layers), ``logit_lens.json``
(everything the figures show, the accuracies, the claim and the numbers that decide it),
``lens_table.csv`` (the tidy per-cell table), ``evolution_summary.csv``, ``split.json`` (the seeded
split), ``soft_tokens.csv`` and ``gnn_layers.csv`` (nearest-token decodings), ``predictions.csv``.
The trained GNN, projector, evaluation and tuned lens are cached under ``$MMLENS_CACHE/tea_glm``
by a hash of their configuration, and training checkpoints as it goes, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import torch

from mmlens.analyses.soft_token_lens import TINY_VLM, plot_soft_token_comparison, vlm_comparison
from mmlens.analyses.tea_glm_controls import matched_analysis
from mmlens.core.wrapper import HookedModel
from mmlens.data.graphs import (
    TextAttributedGraph,
    default_graph_token_id,
    load_text_attributed_graph,
    stratified_split,
    text_features,
)
from mmlens.data.loading import load_model
from mmlens.data.paths import cache_dir
from mmlens.methods.evolution import METRICS, Evolution, evolution, layer_curves
from mmlens.methods.lens import (
    LensResult,
    TunedLens,
    compare_lenses,
    decode_encoder_layers,
    decode_soft_tokens,
    logit_lens,
)
from mmlens.methods.patching import SweepResult
from mmlens.metrics.lens_verdicts import MARGINS, layer_bands
from mmlens.models import GraphSAGEEncoder, TeaGLM
from mmlens.plots import plot_evolution, plot_lens_grid, plot_patching, save_figure
from mmlens.store import atomic_path, atomic_write, config_hash, versions
from mmlens.training.graph_pretraining import GraphPretrainConfig, llm_principal_components, pretrain_graph_encoder
from mmlens.training.loop import is_cached, train_or_load
from mmlens.training.tea_glm import NodePrompts, ProjectorTrainConfig, PromptTemplate, classify_nodes, train_projector

SYNTHETIC_NOTE = (
    "SYNTHETIC DATA: a generated text-attributed graph, not Cora; numbers say nothing about the paper's claim"
)
CLAIM_RULE_MATCHED = (
    "per lens variant: a metric reads 'less' only when the paired per-node bootstrap interval (95%) of "
    "graph - X lies on the 'evolves less' side for X = text tokens and for every matched control in the "
    "graph slots (text_title, text_neutral, mean_embedding, random_norm, constant_input, no_neighbours), "
    "and TOST does not show equivalence within the declared margin; the first comparison that fails "
    "decides. The claim holds under a variant when at least 3 of the 4 metrics read 'less' and none "
    "'more'; overall when it holds under every variant without the embedding row"
)
MATCHED_VERSION = 2
"""Bumped when the matched analysis computes differently from the same inputs (part of its cache key;
2: text positions decoded under the first model seed only)."""
MAIN_LENS_VERSION = 1
"""Bumped when the main lens stage computes differently from the same inputs (part of its cache key)."""
PRIMARY_VARIANT = "normed/no_embedding_row"
"""The lens variant the figures show: nostalgebraist's normed lens, without the embedding row."""
CLAIM_RULE = (
    "graph tokens evolve measurably less than text tokens when, for at least 3 of the 4 metrics "
    "(top-1 change rate lower, mean KL to the final layer lower, consecutive-layer cosine higher, "
    "final top-1 first appearing earlier), the 95% bootstrap interval of the paired per-node "
    "difference (graph - text) lies entirely on the 'evolves less' side of zero"
)


@dataclass(frozen=True)
class ReproductionConfig:
    """Everything that determines the run's numbers (``data_dir`` only says where to read)."""

    llm: str = "smollm2-135m-instruct"
    dataset: str = "cora"
    seed: int = 0
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    num_graph_tokens: int = 5
    max_text_tokens: int = 256
    synthetic_nodes: int = 700
    gnn: GraphPretrainConfig = field(default_factory=lambda: GraphPretrainConfig(epochs=60))
    projector: ProjectorTrainConfig = field(default_factory=lambda: ProjectorTrainConfig(batch_size=8))
    template: PromptTemplate = field(default_factory=PromptTemplate)
    eval_nodes: int | None = None
    lens_nodes: int = 100
    text_positions: int = 5
    tuned_lens_steps: int = 60
    tuned_lens_tokens: int = 32
    seeds: tuple[int, ...] = (0, 1, 2)
    control_projector_steps: int = 50
    patching_nodes: int = 8
    lens_variants: tuple[str, ...] = ("normed", "raw", "naive")
    vlm_comparison: bool = True
    vlm_quick: bool = False
    vlm_options: dict = field(default_factory=dict)
    data_dir: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def quick_config(**overrides: Any) -> ReproductionConfig:
    """A small run for tests and CI (TinyStories-656K, few epochs/steps/nodes): checks the code
    path end to end in well under a minute; its numbers mean nothing."""
    base = ReproductionConfig(
        llm="tinystories-656k",
        gnn=GraphPretrainConfig(hidden_dim=128, epochs=3, n_components=16, checkpoint_every=2),
        projector=ProjectorTrainConfig(steps=4, batch_size=8, checkpoint_every=2),
        eval_nodes=24,
        lens_nodes=6,
        tuned_lens_steps=3,
        tuned_lens_tokens=8,
        text_positions=4,
        seeds=(0,),
        control_projector_steps=2,
        patching_nodes=2,
        vlm_quick=True,
        vlm_options=dict(TINY_VLM),
    )
    return replace(base, **overrides)


def _hash(*parts: Any) -> str:
    return config_hash(parts, digits=12)


def _fingerprint(graph: TextAttributedGraph) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([graph.texts, graph.class_words]).encode())
    h.update(graph.labels.numpy().tobytes())
    h.update(graph.edge_index.numpy().tobytes())
    return h.hexdigest()[:16]


class _Stages:
    """Wall-clock time per stage, printed at the end of a run."""

    def __init__(self, progress: bool):
        self.seconds: dict[str, float] = {}
        self.progress = progress

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.progress:
            print(f"mmlens: {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)

    def table(self) -> str:
        width = max(len(n) for n in self.seconds)
        lines = [f"  {n:<{width}}  {s:8.1f} s" for n, s in self.seconds.items()]
        return "\n".join(["stage timings:", *lines, f"  {'total':<{width}}  {sum(self.seconds.values()):8.1f} s"])


@dataclass
class Reproduction:
    """A trained TEA-GLM and what the run measured; :func:`build` and :func:`run` return it."""

    config: ReproductionConfig
    graph: TextAttributedGraph
    split: dict[str, torch.Tensor]
    model: TeaGLM
    hooked: HookedModel
    prompts: NodePrompts
    features: torch.Tensor
    node_repr: torch.Tensor
    evaluation: dict
    keys: dict[str, str]
    stages: _Stages
    model_seed: int = 0
    projector_loss: list[float] = field(default_factory=list)
    lens: LensResult | None = None
    evolution: Evolution | None = None
    lens_nodes: list[int] = field(default_factory=list)
    control_models: dict[str, TeaGLM] = field(default_factory=dict)

    def inputs(self, nodes: list[int] | torch.Tensor, with_graph: bool = True) -> dict[str, torch.Tensor]:
        """Model inputs of the classification prompts of ``nodes`` (right-padded), ready for
        :meth:`HookedModel.run` / :func:`mmlens.methods.lens.logit_lens`."""
        nodes = torch.as_tensor(nodes).long().flatten()
        batch = self.prompts.batch([self.graph.titles[i] for i in nodes.tolist()], with_graph=with_graph)
        if not with_graph:
            return batch
        return {**batch, "node_features": self.features, "edge_index": self.graph.edge_index, "node_ids": nodes}

    def node_positions(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Bool[b, seq]: the node-specific positions, from the first graph token to the answer cue
        (the shared instruction before them is identical for every node)."""
        start = len(self.prompts.prefix_ids(True))
        mask = inputs["attention_mask"].bool().clone()
        mask[:, :start] = False
        return mask


def _cache_keys(
    config: ReproductionConfig, graph: TextAttributedGraph, gnn_config: GraphPretrainConfig, model_seed: int
) -> dict:
    """The hashes the GNN, projector and evaluation are cached under, each including the one before."""
    keys = {"gnn": _hash(config.llm, _fingerprint(graph), config.max_text_tokens, gnn_config.to_dict())}
    keys["projector"] = _hash(
        keys["gnn"],
        config.split,
        config.seed,
        model_seed,
        config.num_graph_tokens,
        asdict(config.template),
        config.projector.to_dict(),
    )
    keys["evaluation"] = _hash(keys["projector"], config.eval_nodes)
    return keys


def _pretrained_gnn(
    gnn: GraphSAGEEncoder,
    features: torch.Tensor,
    graph: TextAttributedGraph,
    embedding: torch.Tensor,
    gnn_config: GraphPretrainConfig,
    key: str,
    progress: bool,
) -> torch.Tensor:
    """Pretrain ``gnn`` in place (or load it); Float[n_nodes, d_lm]: its node representations."""
    train_or_load(
        "tea_glm_gnn",
        key,
        gnn,
        lambda: pretrain_graph_encoder(
            gnn,
            features,
            graph.edge_index,
            llm_principal_components(embedding, gnn_config.n_components),
            gnn_config,
            checkpoint=cache_dir() / "tea_glm" / f"gnn-{key}.ckpt",
            progress=progress,
        ),
    )
    gnn.eval()
    with torch.no_grad():
        return gnn(features, graph.edge_index)


def _trained_projector(
    model: TeaGLM,
    prompts: NodePrompts,
    node_repr: torch.Tensor,
    graph: TextAttributedGraph,
    train: torch.Tensor,
    config: ReproductionConfig,
    seed: int,
    key: str,
    progress: bool,
) -> list[float]:
    """Train ``model.projector`` in place on the ``train`` nodes (or load it); its loss curve."""
    cached = train_or_load(
        "tea_glm_projector",
        key,
        model.projector,
        lambda: {
            "loss": train_projector(
                model,
                prompts,
                node_repr,
                graph.titles,
                graph.labels,
                train,
                replace(config.projector, seed=seed),
                checkpoint=cache_dir() / "tea_glm" / f"projector-{key}.ckpt",
                progress=progress,
            )
        },
    )
    model.eval()
    return list(cached.meta.get("loss", []))


def build(
    config: ReproductionConfig = ReproductionConfig(),
    progress: bool = True,
    stages: _Stages | None = None,
    model_seed: int | None = None,
) -> Reproduction:
    """Load data and LLM, pretrain the GNN, train the projector and evaluate, each cached by a hash
    of its configuration under ``$MMLENS_CACHE/tea_glm`` (a rerun loads them). ``model_seed``
    (default ``config.seed``) seeds the GNN and projector; the split and lens nodes follow ``config.seed``."""
    stages = stages or _Stages(progress)
    model_seed = config.seed if model_seed is None else model_seed
    tag = "" if model_seed == config.seed else f" (seed {model_seed})"
    torch.manual_seed(config.seed)
    with stages("load data" + tag):
        graph = load_text_attributed_graph(
            config.dataset, config.data_dir, seed=config.seed, num_nodes=config.synthetic_nodes
        )
        split = stratified_split(graph.labels, config.seed, config.split)
    with stages("load LLM" + tag):
        loaded = load_model(config.llm)
        lm = loaded.model.eval()
        tokenizer = loaded.tokenizer
    embedding = lm.get_input_embeddings().weight.detach()
    d_lm = embedding.shape[1]
    gnn_config = replace(config.gnn, hidden_dim=d_lm, seed=model_seed)
    with stages("text features" + tag):
        features = text_features(graph.texts, tokenizer, embedding, config.max_text_tokens)
    keys = _cache_keys(config, graph, gnn_config, model_seed)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_seed)
        gnn = GraphSAGEEncoder(d_lm, d_lm, d_lm, num_layers=gnn_config.num_layers)
        model = TeaGLM(lm, gnn, default_graph_token_id(tokenizer), config.num_graph_tokens).eval()
    prompts = NodePrompts(tokenizer, graph.class_words, model.graph_token_id, config.num_graph_tokens, config.template)

    with stages(("GNN (cached)" if is_cached("tea_glm_gnn", keys["gnn"]) else "GNN pretraining") + tag):
        node_repr = _pretrained_gnn(gnn, features, graph, embedding, gnn_config, keys["gnn"], progress)
    cached = is_cached("tea_glm_projector", keys["projector"])
    with stages(("projector (cached)" if cached else "projector training") + tag):
        curve = _trained_projector(
            model, prompts, node_repr, graph, split["train"], config, model_seed, keys["projector"], progress
        )

    evaluation_file = cache_dir() / "tea_glm" / f"evaluation-{keys['evaluation']}.json"
    with stages(("evaluation" if not evaluation_file.exists() else "evaluation (cached)") + tag):
        if evaluation_file.exists():
            evaluation = json.loads(evaluation_file.read_text())
        else:
            evaluation = _evaluate(model, prompts, graph, split, node_repr, config, progress)
            evaluation_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(evaluation_file, json.dumps(evaluation))
    hooked = HookedModel(model, tokenizer=tokenizer, name=f"TEA-GLM({config.llm})")
    return Reproduction(
        config=config,
        graph=graph,
        split=split,
        model=model,
        hooked=hooked,
        prompts=prompts,
        features=features,
        node_repr=node_repr,
        evaluation=evaluation,
        keys=keys,
        stages=stages,
        model_seed=model_seed,
        projector_loss=curve,
    )


def _evaluate(
    model: TeaGLM,
    prompts: NodePrompts,
    graph: TextAttributedGraph,
    split: dict,
    node_repr: torch.Tensor,
    config: ReproductionConfig,
    progress: bool,
) -> dict:
    test = split["test"]
    if config.eval_nodes is not None and config.eval_nodes < len(test):
        g = torch.Generator().manual_seed(config.seed)
        test = test[torch.randperm(len(test), generator=g)[: config.eval_nodes]].sort().values
    labels = graph.labels[test]
    with_graph = classify_nodes(model, prompts, node_repr, graph.titles, test, progress=progress, desc="test (graph)")
    text_only = _text_only_scores(model, prompts, graph, test, config, progress)
    train_majority = int(graph.labels[split["train"]].bincount().argmax())
    return {
        "test_nodes": test.tolist(),
        "labels": labels.tolist(),
        "predictions": with_graph.argmax(1).tolist(),
        "text_only_predictions": text_only.argmax(1).tolist(),
        "accuracy": float((with_graph.argmax(1) == labels).float().mean()),
        "text_only_accuracy": float((text_only.argmax(1) == labels).float().mean()),
        "majority_baseline": float((labels == train_majority).float().mean()),
        "majority_baseline_all_nodes": graph.majority_baseline(),
    }


def _text_only_scores(
    model: TeaGLM,
    prompts: NodePrompts,
    graph: TextAttributedGraph,
    test: torch.Tensor,
    config: ReproductionConfig,
    progress: bool,
) -> torch.Tensor:
    """Class scores Float[len(test), n_classes] of the text-only prompts: they involve neither the
    GNN nor the projector, so every model seed shares them (cached by LLM, graph, template and nodes)."""
    key = _hash(config.llm, _fingerprint(graph), asdict(config.template), test.tolist())
    path = cache_dir() / "tea_glm" / f"text-only-{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    scores = classify_nodes(model, prompts, None, graph.titles, test, progress=progress, desc="test (text only)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(scores, tmp)
    return scores


def _lens_nodes(rep: Reproduction) -> list[int]:
    """A seeded sample of ``lens_nodes`` evaluated test nodes."""
    test = torch.tensor(rep.evaluation["test_nodes"])
    g = torch.Generator().manual_seed(rep.config.seed + 1)
    return test[torch.randperm(len(test), generator=g)[: rep.config.lens_nodes]].tolist()


def _representative(rep: Reproduction, nodes: list[int]) -> int:
    """Row of the first lens node that the model classifies correctly (else row 0)."""
    correct = dict(
        zip(
            rep.evaluation["test_nodes"],
            (p == y for p, y in zip(rep.evaluation["predictions"], rep.evaluation["labels"])),
        )
    )
    return next((i for i, n in enumerate(nodes) if correct.get(n)), 0)


def _grid_columns(cols: list[int], max_cols: int = 48) -> list[int]:
    """At most ``max_cols`` positions for the grid: the first ``max_cols // 3`` (graph tokens and
    the start of the title) and the last ones (the question and the answer cue)."""
    if len(cols) <= max_cols:
        return cols
    head = max_cols // 3
    return cols[:head] + cols[-(max_cols - head) :]


def claim(evo: Evolution) -> dict:
    """Decide whether graph tokens evolve measurably less than text tokens (:data:`CLAIM_RULE`)."""
    table = evo.compare("graph", "text")
    votes = int(table.a_evolves_less.sum())
    return {
        "claim_reproduced": votes >= 3,
        "metrics_in_favour": votes,
        "of": len(METRICS),
        "rule": CLAIM_RULE,
        "comparison": table.to_dict(orient="records"),
    }


def _write_split(rep: Reproduction, out: Path) -> None:
    """``split.json``: the seeded train/val/test node ids."""
    _write_json(
        out / "split.json",
        {
            "dataset": rep.graph.name,
            "seed": rep.config.seed,
            "fractions": list(rep.config.split),
            **({"note": SYNTHETIC_NOTE} if rep.graph.synthetic else {}),
            **{k: v.tolist() for k, v in rep.split.items()},
        },
    )


def _write_figures(rep: Reproduction, out: Path, row: int, positions: torch.Tensor) -> None:
    """``logit_lens`` (the grid of lens node ``row``, Bool[b, seq] ``positions``) and ``evolution`` figures."""
    title_suffix = f" [{SYNTHETIC_NOTE.split(':')[0]}]" if rep.graph.synthetic else ""
    node = rep.lens_nodes[row]
    grid_cols = _grid_columns(positions[row].nonzero().flatten().tolist())
    fig = plot_lens_grid(
        rep.lens,
        row=row,
        positions=grid_cols,
        title=f"Logit lens, TEA-GLM on {rep.config.llm}: node {node} "
        f"({rep.graph.class_words[int(rep.graph.labels[node])]}){title_suffix}",
    )
    save_figure(fig, out / "logit_lens")
    fig = plot_evolution(
        rep.evolution,
        title=f"Graph vs text tokens across layers ({len(rep.lens_nodes)} test nodes, 95% bootstrap CI){title_suffix}",
    )
    save_figure(fig, out / "evolution")
    import matplotlib.pyplot as plt

    plt.close("all")


def _write_tables(rep: Reproduction, out: Path, soft: pd.DataFrame, layers: pd.DataFrame) -> None:
    """The CSVs; adds ``node`` and ``dataset`` columns to ``soft`` and ``layers`` in place."""
    nodes = rep.lens_nodes
    table = rep.lens.table(k=3)
    table.insert(0, "node", [nodes[i] for i in table["input"]])
    soft.insert(0, "node", [nodes[i] for i in soft["input"]])
    layers.insert(0, "node", [nodes[i] for i in layers["item"]])
    ev = rep.evaluation
    predictions = pd.DataFrame(
        {
            "node": ev["test_nodes"],
            "label": ev["labels"],
            "prediction": ev["predictions"],
            "text_only_prediction": ev["text_only_predictions"],
        }
    )
    for name, frame in (
        ("lens_table", table),
        ("evolution_summary", rep.evolution.summary.copy()),
        ("soft_tokens", soft),
        ("gnn_layers", layers),
        ("predictions", predictions),
    ):
        frame.insert(0, "dataset", rep.graph.name)
        frame.to_csv(out / f"{name}.csv", index=False)


def run(
    config: ReproductionConfig = ReproductionConfig(),
    out: str | Path = "results/tea_glm_logit_lens",
    progress: bool = True,
) -> Reproduction:
    """Build (or load) the model, run the lens on test nodes and write every output to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stages = _Stages(progress)
    seeds = list(dict.fromkeys([config.seed, *config.seeds]))
    reps = [build(config, progress, stages, model_seed=s) for s in seeds]
    rep = reps[0]
    _write_split(rep, out)

    nodes = _lens_nodes(rep)
    rep.lens_nodes = nodes
    inputs = rep.inputs(nodes)
    row = _representative(rep, nodes)
    positions = sampled_positions(rep, inputs, config.text_positions, config.seed)
    shown = positions.clone()
    shown[row] = rep.node_positions(inputs)[row]  # the grid figure shows every position of one node
    answer_targets = rep.prompts.answer_ids[rep.graph.labels[nodes]][:, None]
    rep.lens, soft, layers = _main_lens(rep, inputs, shown, answer_targets, progress)
    rep.evolution = evolution(rep.lens, ["graph", "text"], seed=config.seed)
    tuned = None
    if config.tuned_lens_steps > 0:
        with stages("tuned lens"):
            tuned = _tuned_lens(rep, inputs, positions)

    matched = _matched(reps, nodes, inputs, positions, progress)
    across = None
    if config.vlm_comparison:
        with stages("synthetic-VLM comparison"):
            across = vlm_comparison(
                config.lens_variants,
                seed=config.seed,
                progress=progress,
                quick=config.vlm_quick,
                vlm_options=config.vlm_options or None,
            )
    with stages("write outputs"):
        _write_figures(rep, out, row, shown)
        _write_matched_figures(rep, out, row, shown, matched)
        _write_tables(rep, out, soft, layers)
        record = _record(rep, row, soft, layers, tuned)
        record.update(_matched_record(reps, matched))
        if tuned is not None:
            _write_tuned_curve(tuned["curve"], out)
        if across is not None:
            record["across_modalities"] = across
            save_figure(plot_soft_token_comparison(record["lens_variants"], across), out / "soft_tokens")
    record["timings_s"] = stages.seconds
    _write_json(out / "logit_lens.json", record)
    atomic_write(out / "report.md", report(record))
    if progress:
        _print_summary(rep, record, out)
        print(stages.table())
    return rep


def _main_lens(
    rep: Reproduction, inputs: dict, positions: torch.Tensor, targets: torch.Tensor, progress: bool
) -> tuple[LensResult, pd.DataFrame, pd.DataFrame]:
    """The normed logit lens of the first model seed at ``positions`` (answer ``targets``), the
    nearest-token decodings of its graph tokens and of each GNN layer; cached by the model's key,
    the lens nodes, the decoded cells and :data:`MAIN_LENS_VERSION` (a rerun reads them)."""
    key = _hash(
        rep.keys["projector"], rep.lens_nodes, positions.nonzero().tolist(), targets.tolist(), MAIN_LENS_VERSION
    )
    folder = cache_dir() / "tea_glm" / f"lens-{key}"
    cached = (folder / "lens.pt").exists()
    with rep.stages("logit lens" + (" (cached)" if cached else "")):
        if cached:
            lens = LensResult.load(folder / "lens.pt", rep.hooked, inputs)
            tables = [pd.DataFrame(json.loads((folder / f"{name}.json").read_text())) for name in ("soft", "layers")]
            return lens, tables[0], tables[1]
        lens = logit_lens(rep.hooked, inputs, k=5, targets=targets, positions=positions, progress=progress)
        soft = decode_soft_tokens(rep.hooked, inputs, "graph", k=5)
        layers = decode_encoder_layers(rep.hooked, inputs, k=5)
        folder.mkdir(parents=True, exist_ok=True)
        for name, table in (("soft", soft), ("layers", layers)):
            atomic_write(folder / f"{name}.json", table.to_json(orient="records"))
        lens.save(folder / "lens.pt")  # last: its presence marks the folder complete
    return lens, soft, layers


def _matched(reps: list[Reproduction], nodes: list[int], inputs: dict, positions: torch.Tensor, progress: bool) -> dict:
    """:func:`matched_analysis`, cached as JSON by the hash of every model's key and the settings."""
    config = reps[0].config
    key = _hash(
        [r.keys["projector"] for r in reps],
        nodes,
        positions.nonzero().tolist(),
        config.control_projector_steps,
        config.patching_nodes,
        config.lens_variants,
        MARGINS,
        MATCHED_VERSION,
    )
    path = cache_dir() / "tea_glm" / f"matched-{key}.json"
    with reps[0].stages("controls, lens variants, patching" + (" (cached)" if path.exists() else "")):
        if path.exists():
            return json.loads(path.read_text())
        result = matched_analysis(reps, nodes, inputs, positions, progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(result, default=_json_default))
    return result


def _matched_record(reps: list[Reproduction], matched: dict) -> dict:
    """The JSON fields of the matched-control analysis, and the overall claim."""
    variants = matched["lens_variants"]
    deciding = [v for name, v in variants.items() if name.endswith("no_embedding_row")]
    overall = bool(deciding) and all(v["claim_reproduced"] for v in deciding)
    statement = "; ".join(
        f"{name}: {'reproduced' if v['claim_reproduced'] else 'not reproduced'} "
        f"({v['metrics_less']}/4 metrics less, {v['metrics_more']} more; decided by {v['deciding_comparison']})"
        for name, v in variants.items()
    )
    primary = variants.get(PRIMARY_VARIANT, next(iter(variants.values())))
    return {
        "lens_variants": variants,
        "controls": matched["controls"],
        "per_layer_tests": primary["per_layer_tests"],
        "patching": matched["patching"],
        "seeds": {
            str(r.model_seed): {
                "accuracy": r.evaluation["accuracy"],
                "text_only_accuracy": r.evaluation["text_only_accuracy"],
                "projector_loss": r.projector_loss,
            }
            for r in reps
        },
        "claim_reproduced_overall": overall,
        "claim_statement": (
            "graph tokens evolve less than matched controls in the same slots (and than text tokens) "
            f"under every lens variant without the embedding row: {'yes' if overall else 'no'}. " + statement
        ),
        "claim_rule_matched": CLAIM_RULE_MATCHED,
    }


def _write_matched_figures(rep: Reproduction, out: Path, row: int, positions: torch.Tensor, matched: dict) -> None:
    """``logit_lens_compact`` (graph slots and a few text tokens), ``evolution_controls`` (pooled
    curves of every condition, normed lens without the embedding row) and ``patching``."""
    import matplotlib.pyplot as plt

    cols = positions[row].nonzero().flatten().tolist()
    graph = [p for p in cols if rep.lens.modalities[row][p] == "graph"]
    text = [p for p in cols if rep.lens.modalities[row][p] == "text"]
    picked = graph + text[:3] + text[-3:] if len(text) > 6 else graph + text
    fig = plot_lens_grid(rep.lens, row=row, positions=picked, title=f"Logit lens (compact), node {rep.lens_nodes[row]}")
    save_figure(fig, out / "logit_lens_compact")
    if matched.get("curves"):
        per_layer = pd.DataFrame(matched["curves"])
        tests = matched["lens_variants"][PRIMARY_VARIANT]["per_layer_tests"]
        fig = plot_evolution(
            _Curves(layer_curves(per_layer, rep.lens.layers)),
            title=f"Graph tokens vs matched controls ({PRIMARY_VARIANT}; bands: against every comparison)",
            bands=layer_bands(tests),
        )
        save_figure(fig, out / "evolution_controls")
        fig = plot_evolution(
            _Curves(layer_curves(per_layer[per_layer.modality.isin(["graph", "text"])], rep.lens.layers)),
            title=f"Graph vs text tokens ({PRIMARY_VARIANT}, model seeds pooled; bands: graph vs text)",
            bands=layer_bands({"text": tests["text"]}),
        )
        save_figure(fig, out / "evolution_bands")
    table = pd.DataFrame(matched["patching"]).assign(pair=0)
    result = SweepResult(table, [float("nan")], [float("nan")], "denoise", "resid_pre", ("layer", "span"))
    save_figure(plot_patching(result, title="Patching (log-prob of the answer)"), out / "patching")
    plt.close("all")


@dataclass
class _Curves:
    """What :func:`plot_evolution` reads: a ``curves`` table."""

    curves: pd.DataFrame


def sampled_positions(rep: Reproduction, inputs: dict, per_node: int, seed: int) -> torch.Tensor:
    """Bool[b, seq]: the graph slots and a seeded sample of ``per_node`` text positions of each
    node's own part of the prompt (all of them when ``per_node`` is 0 or the node has fewer): the
    positions the lens metrics average over. Sampling text positions cuts the unembedding's cost
    (about 31 text positions per node) and leaves each node's text mean unbiased."""
    own = rep.node_positions(inputs)
    graph = own & (inputs["input_ids"] == rep.model.graph_token_id)
    keep = graph.clone()
    g = torch.Generator().manual_seed(seed + 4)
    for row, text in enumerate(own & ~graph):
        cols = text.nonzero().flatten()
        if per_node > 0:
            cols = cols[torch.randperm(len(cols), generator=g)[:per_node]]
        keep[row, cols] = True
    return keep


def _tuned_lens(rep: Reproduction, inputs: dict, positions: torch.Tensor) -> dict:
    """A tuned lens trained with graph and text positions drawn equally (on training-node prompts,
    disjoint from the lens's test nodes) and its summary on ``inputs``: ``{"summary", "curve",
    "settings"}``, cached as JSON (the lens itself beside it as ``.pt``)."""
    config = rep.config
    settings = {
        "steps": config.tuned_lens_steps,
        "tokens_per_step": config.tuned_lens_tokens,
        "balance": "graph and text positions drawn equally per step",
        "train_prompts": 2 * config.lens_nodes,
    }
    key = _hash(rep.keys["projector"], settings, rep.lens_nodes, positions.nonzero().tolist())
    path = cache_dir() / "tea_glm" / f"tuned-{key}.pt"
    record_path = path.with_suffix(".record.json")
    if record_path.exists():
        return json.loads(record_path.read_text())
    g = torch.Generator().manual_seed(config.seed + 2)
    train = rep.split["train"][torch.randperm(len(rep.split["train"]), generator=g)[: settings["train_prompts"]]]
    tuned = TunedLens.for_model(rep.hooked)
    tuned.fit(
        rep.hooked,
        [rep.inputs(chunk) for chunk in train.split(max(1, config.lens_nodes))],
        steps=config.tuned_lens_steps,
        tokens_per_step=config.tuned_lens_tokens,
        positions=rep.node_positions,
        balance=True,
        seed=config.seed,
        progress=rep.stages.progress,
    )
    tuned.save(path)
    result = logit_lens(rep.hooked, inputs, k=1, positions=positions, tuned=tuned)
    normed = logit_lens(rep.hooked, inputs, k=1, positions=positions)
    record = {"summary": _tuned_summary(normed, result), "curve": tuned.history, "settings": settings}
    atomic_write(record_path, json.dumps(record))
    return record


def _write_tuned_curve(curve: dict, out: Path) -> None:
    """``tuned_lens_curve.csv`` and ``.png/.svg``: the training loss and its graph and text terms per step."""
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(curve).rename_axis("step").reset_index()
    frame.to_csv(out / "tuned_lens_curve.csv", index=False)
    fig, ax = plt.subplots(figsize=(5.5, 3.4), layout="constrained")
    for column in [c for c in frame.columns if c.startswith("kl_")]:
        ax.plot(frame.step, frame[column], label=column.removeprefix("kl_") + " positions")
    ax.set(
        xlabel="step", ylabel="KL to the final layer (nats, summed over layers)", title="Tuned lens training (balanced)"
    )
    ax.legend(fontsize="small")
    save_figure(fig, out / "tuned_lens_curve")
    plt.close(fig)


def _tuned_summary(logit: LensResult, tuned: LensResult) -> dict:
    """Per modality: mean KL to the final layer under the logit and the tuned lens, and the reduction."""
    table = compare_lenses(logit, tuned)
    out = {}
    for m, group in table.groupby("modality"):
        kl_logit, kl_tuned = float(group.kl_logit.mean()), float(group.kl_tuned.mean())
        out[m] = {
            "mean_kl_logit_lens": kl_logit,
            "mean_kl_tuned_lens": kl_tuned,
            "reduction": 1 - kl_tuned / kl_logit if kl_logit > 0 else None,
        }
    return out


def _record(rep: Reproduction, row: int, soft: pd.DataFrame, layers: pd.DataFrame, tuned: dict | None) -> dict:
    lens, config, ev = rep.lens, rep.config, rep.evaluation
    cols = rep.node_positions(rep.inputs([rep.lens_nodes[row]]))[0].nonzero().flatten().tolist()
    top = lens.top_ids[:, row, cols, 0]
    decision = claim(rep.evolution)
    summary = {
        m: {
            r.metric: {"mean": r.mean, "low": r.low, "high": r.high, "n_inputs": int(r.n_inputs)}
            for r in group.itertuples()
        }
        for m, group in rep.evolution.summary.groupby("modality")
    }
    node = rep.lens_nodes[row]
    record = {
        "llm": config.llm,
        "dataset": rep.graph.name,
        "data_source": rep.graph.source,
        **({"note": SYNTHETIC_NOTE} if rep.graph.synthetic else {}),
        "representative_node": node,
        "representative_label": rep.graph.class_words[int(rep.graph.labels[node])],
        "layers": lens.layers,
        "positions": [{"index": p, "token": lens.tokens[row][p], "modality": lens.modalities[row][p]} for p in cols],
        "top_tokens": [lens.decode(layer.tolist()) for layer in top],
        "top_probs": lens.top_probs[:, row, cols, 0].tolist(),
        "evolution": summary,
        "evolution_bootstrap": {"n_boot": rep.evolution.n_boot, "ci": rep.evolution.ci, "unit": "test node"},
        "claim_reproduced": decision["claim_reproduced"],
        "claim_evidence": decision,
        "accuracy": ev["accuracy"],
        "majority_baseline": ev["majority_baseline_all_nodes"],
        "majority_baseline_test": ev["majority_baseline"],
        "text_only_accuracy": ev["text_only_accuracy"],
        "n_test_nodes": len(ev["test_nodes"]),
        "n_nodes": len(rep.lens_nodes),
        "lens_nodes": rep.lens_nodes,
        "seed": config.seed,
        "decoded_positions": "the 5 graph slots and a seeded sample of text_positions text positions of each node's "
        "own part of the prompt (first graph token to the answer cue; the shared instruction before it is identical "
        "for every node and not decoded); the representative node's grid decodes all of its own positions",
        "soft_tokens_nearest": soft[soft.input == row]
        .groupby("position")
        .apply(lambda g: list(zip(g.token, g.cosine.round(3))), include_groups=False)
        .tolist(),
        "gnn_layers_nearest": {
            f"layer {layer}": g[g["item"] == row]
            .groupby("slot")
            .apply(lambda s: list(zip(s.token, s.cosine.round(3))), include_groups=False)
            .tolist()
            for layer, g in layers.groupby("layer")
        },
        "tuned_lens": tuned,
        "config": config.to_dict(),
        "cache_keys": rep.keys,
        "versions": versions(),
    }
    return record


def report(record: dict) -> str:
    """A Markdown summary of ``logit_lens.json``'s record (``report.md``): accuracies, the verdict of
    every metric under every lens variant with its deciding comparison, the image tokens of the
    synthetic VLM, the tuned lens, the patching peak and the stage timings."""
    metrics = list(METRICS)
    lines = [f"# TEA-GLM logit lens: {record['llm']} on {record['dataset']}", ""]
    if record.get("note"):
        lines += [f"**{record['note']}**", ""]
    lines += ["| model | test accuracy |", "|---|---|"]
    lines += [f"| graph tokens, model seed {s} | {v['accuracy']:.3f} |" for s, v in record["seeds"].items()]
    for name, control in record["controls"].items():
        if "accuracy" in control:
            lines.append(
                f"| control projector `{name}` (seed {record['seed']}) | {control['accuracy']['accuracy']:.3f} |"
            )
    lines += [
        f"| text-only prompt | {record['text_only_accuracy']:.3f} |",
        f"| majority class (all nodes; test nodes) | {record['majority_baseline']:.3f}; "
        f"{record['majority_baseline_test']:.3f} |",
        "",
        f"Verdicts ({record['n_nodes']} lens nodes, model seeds pooled; each cell: verdict, deciding comparison):",
        "",
        "| lens variant / layers | " + " | ".join(metrics) + " | claim |",
        "|---" * (len(metrics) + 2) + "|",
    ]
    for name, variant in record["lens_variants"].items():
        cells = {r["metric"]: f"{r['verdict']} ({r['deciding']})" for r in variant["verdict"]}
        claim = "reproduced" if variant["claim_reproduced"] else "not reproduced"
        lines.append(f"| {name} | " + " | ".join(cells.get(m, "") for m in metrics) + f" | {claim} |")
    lines += ["", f"Overall: {record['claim_statement']}", ""]
    across = record.get("across_modalities")
    if across:
        lines += [
            f"Image tokens of `{across['model']}` ({across['n_inputs']} inputs) against text and the same slot controls:",
            "",
        ]
        lines += ["| lens variant / layers | " + " | ".join(metrics) + " | claim |", "|---" * (len(metrics) + 2) + "|"]
        for name, variant in across["lens_variants"].items():
            cells = {r["metric"]: f"{r['verdict']} ({r['deciding']})" for r in variant["verdict"]}
            claim = "holds" if variant["claim_reproduced"] else "does not hold"
            lines.append(f"| {name} | " + " | ".join(cells.get(m, "") for m in metrics) + f" | {claim} |")
        lines.append("")
    lines += _report_tail(record)
    return "\n".join(lines) + "\n"


def _report_tail(record: dict) -> list[str]:
    """The tuned lens, patching and timing lines of :func:`report`."""
    lines = []
    if record.get("tuned_lens"):
        for m, v in record["tuned_lens"]["summary"].items():
            lines.append(
                f"- tuned lens (balanced), {m} positions: mean KL to the final layer "
                f"{v['mean_kl_logit_lens']:.3f} -> {v['mean_kl_tuned_lens']:.3f} nats"
            )
    patching = pd.DataFrame(record["patching"])
    if not patching.empty:
        graph = patching[patching.span == "graph"]
        if not graph.empty:
            best = graph.loc[graph.normalized.idxmax()]
            lines.append(
                f"- patching the graph span's residual (resid_pre) restores at most {best.normalized:.2f} of the "
                f"clean-corrupted log-prob gap, at layer {int(best.layer)}"
            )
    total = sum(record["timings_s"].values())
    lines += ["", f"Stage timings (total {total / 60:.1f} min):", ""]
    lines += [f"- {name}: {seconds:.1f} s" for name, seconds in record["timings_s"].items()]
    return lines


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=1, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _print_summary(rep: Reproduction, record: dict, out: Path) -> None:
    if rep.graph.synthetic:
        print(f"*** {SYNTHETIC_NOTE} ***")
    print(
        f"TEA-GLM on {record['dataset']} with {record['llm']}: test accuracy {record['accuracy']:.3f} "
        f"(majority {record['majority_baseline']:.3f}, text-only prompt {record['text_only_accuracy']:.3f}, "
        f"{record['n_test_nodes']} test nodes)"
    )
    table = pd.DataFrame(record["claim_evidence"]["comparison"])[
        ["metric", "mean_a", "mean_b", "diff", "low", "high", "a_evolves_less"]
    ]
    table.columns = ["metric", "graph", "text", "graph - text", "ci low", "ci high", "graph evolves less"]
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    verdict = "REPRODUCED" if record["claim_reproduced"] else "NOT reproduced"
    print(
        f"claim (graph tokens evolve less than text tokens): {verdict} "
        f"({record['claim_evidence']['metrics_in_favour']}/{record['claim_evidence']['of']} metrics)"
    )
    if record["tuned_lens"]:
        for m, v in record["tuned_lens"]["summary"].items():
            print(
                f"tuned lens, {m}: mean KL to final {v['mean_kl_logit_lens']:.3f} -> {v['mean_kl_tuned_lens']:.3f} nats"
            )
    print(f"outputs in {out}/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mmlens.analyses.tea_glm_logit_lens",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--llm", default=None, help="registry name or hub id of the causal LM (default smollm2-135m-instruct)"
    )
    parser.add_argument("--dataset", choices=("cora", "synthetic"), default="cora")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder holding cora_tag/cora.json (default: $MMLENS_DATA, else the copy bundled with mmlens)",
    )
    parser.add_argument("--out", default="results/tea_glm_logit_lens", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gnn-epochs", type=int, default=None)
    parser.add_argument("--projector-steps", type=int, default=None)
    parser.add_argument(
        "--eval-nodes", type=int, default=None, help="evaluate on a seeded sample of test nodes (default all)"
    )
    parser.add_argument("--lens-nodes", type=int, default=None, help="test nodes the lens decodes (default 100)")
    parser.add_argument(
        "--tuned-lens-steps", type=int, default=None, help="tuned-lens training steps (default 60; 0 = off)"
    )
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (TinyStories-656K, few steps)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    args = parser.parse_args(argv)
    config = quick_config() if args.quick else ReproductionConfig()
    overrides: dict[str, Any] = {"dataset": args.dataset, "seed": args.seed, "data_dir": args.data_dir}
    for key, value in (
        ("llm", args.llm),
        ("eval_nodes", args.eval_nodes),
        ("lens_nodes", args.lens_nodes),
        ("tuned_lens_steps", args.tuned_lens_steps),
    ):
        if value is not None:
            overrides[key] = value
    if args.gnn_epochs is not None:
        overrides["gnn"] = replace(config.gnn, epochs=args.gnn_epochs)
    if args.projector_steps is not None:
        overrides["projector"] = replace(config.projector, steps=args.projector_steps)
    try:
        run(replace(config, **overrides), args.out, progress=not args.quiet)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
