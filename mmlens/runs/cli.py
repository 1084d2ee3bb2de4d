"""The ``mmlens`` command line.

mmlens models                 list the model registry
mmlens hooks MODEL [--json | --markdown]
                              list a model's hook points by stage and modality
mmlens hooks --supported      the supported model classes (hand table or automatic adapter), as Markdown
mmlens patch CONFIG [--out DIR] [--overwrite] [--check] [--executor ray [--ray-address ADDR] [--workers N]]
                              run (or resume) the patching sweep a TOML/YAML config describes
mmlens evaluate CONFIG [--out DIR] [--overwrite] [--executor ray [--ray-address ADDR] [--workers N]]
                              score explainers on the three desiderata (Granger, faithfulness, stability)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys

import torch


def hook_table(hm, example_inputs: dict | None) -> list[dict]:
    """One row per hook point: name, stage, modality, module, layer, and the shape on ``example_inputs``."""
    shapes: dict[str, list[int]] = {}
    if example_inputs is not None:
        with torch.no_grad():
            cache = hm.run(example_inputs, cache=True).cache
        shapes = {name: list(t.shape) for name, t in cache.items()}
    rows = []
    for name, hp in hm.hook_points.items():
        rows.append(
            {
                "name": name,
                "stage": hp.stage,
                "modality": hp.modality or "fused",
                "module": hp.site.module
                + ("" if hp.site.io == "output" else f" (input {hp.site.kwarg or hp.site.index})"),
                "layer": hp.layer,
                "shape": shapes.get(name),
                "spans_apply": hp.fused_positions,
            }
        )
    return rows


def _print_table(rows: list[dict], model_name: str, spans) -> None:
    print(f"{model_name}: {len(rows)} hook points" + (f"; example input spans: {spans}" if spans is not None else ""))
    current = None
    for row in rows:
        group = (row["stage"], row["modality"])
        if group != current:
            current = group
            print(f"\n[{row['stage']}] modality={row['modality']}")
        shape = "x".join(map(str, row["shape"])) if row["shape"] else "-"
        print(f"  {row['name']:<34} {shape:<16} {row['module']}")


def markdown_table(rows: list[dict]) -> str:
    """The hook table as Markdown, one line per point kind (block indices collapsed to ``{i}``);
    what ``mmlens hooks NAME --markdown`` prints and docs/hooks.md holds."""
    lines = ["| hook point | stage | modality | module (value) |", "|---|---|---|---|"]
    seen: set[str] = set()
    for row in rows:
        name, module = row["name"], row["module"]
        if row["layer"] is not None:
            name = name.replace(f".blocks.{row['layer']}.", ".blocks.{i}.")
            module = re.sub(rf"\.{row['layer']}(?=[. ]|$)", ".{i}", module, count=1)
        path, _, call_input = module.partition(" (input ")
        value = f"`{path}`" + (f" (input `{call_input[:-1]}`)" if call_input else "")
        if name not in seen:
            seen.add(name)
            lines.append(f"| `{name}` | {row['stage']} | {row['modality']} | {value} |")
    return "\n".join(lines)


def cmd_hooks(args: argparse.Namespace) -> int:
    from mmlens.core.wrapper import HookedModel
    from mmlens.data.loading import load_model

    if args.supported:
        from mmlens.hooks.supported import supported_markdown

        print(supported_markdown(), end="")
        return 0
    if args.model is None:
        raise ValueError("mmlens hooks needs a MODEL (see `mmlens models`), or --supported")
    loaded = load_model(args.model)
    example = None if args.no_shapes or args.markdown else loaded.example_inputs()
    hm = HookedModel(
        loaded.model,
        tokenizer=loaded.tokenizer,
        processor=loaded.processor,
        name=loaded.name,
        check=True if example is None else example,
    )
    rows = hook_table(hm, example)
    if args.markdown:
        print(markdown_table(rows))
    elif args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
    else:
        _print_table(rows, loaded.name, hm.spans(example) if example is not None else None)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from mmlens.data.loading import registry_descriptions

    for name, description in registry_descriptions().items():
        print(f"{name:<24} {description}")
    print("\nAny Hugging Face hub id or local folder also works when online / present.")
    return 0


def cmd_patch(args: argparse.Namespace) -> int:
    from mmlens.runs.patch import PatchConfig, describe, prepare, ray_executor, run_patch

    _check_executor_options(args)
    config = PatchConfig.from_file(args.config, out=args.out)
    if args.check:
        print(describe(prepare(config)))
        return 0
    executor = ray_executor(config, args.ray_address, args.workers) if args.executor == "ray" else None
    try:
        run = run_patch(config, overwrite=args.overwrite, progress=not args.no_progress, executor=executor)
    except KeyboardInterrupt:
        print(
            f"\nmmlens: interrupted; finished chunks are saved in {config.output.dir}. Run the same command again to "
            "continue from there.",
            file=sys.stderr,
        )
        return 130
    print(f"{run.total} chunks ({run.computed} computed, {run.reused} reused), {len(run.result.table)} cells; wrote:")
    for path in run.files:
        print(f"  {path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mmlens.runs.evaluate import PARTS_FILE, EvaluationConfig, print_summary, ray_executor, run_evaluation

    _check_executor_options(args)
    config = EvaluationConfig.from_file(args.config, out=args.out)
    executor = ray_executor(config, args.ray_address, args.workers) if args.executor == "ray" else None
    try:
        evaluation = run_evaluation(config, overwrite=args.overwrite, progress=not args.no_progress, executor=executor)
    except KeyboardInterrupt:
        print(
            f"\nmmlens: interrupted; finished parts are saved in {config.output.dir}/{PARTS_FILE}. Run the same "
            "command again to continue from there.",
            file=sys.stderr,
        )
        return 130
    print_summary(evaluation)
    return 0


def _check_executor_options(args: argparse.Namespace) -> None:
    if args.executor != "ray" and (args.ray_address or args.workers is not None):
        raise ValueError("--ray-address and --workers need --executor ray")


def _add_executor_options(parser: argparse.ArgumentParser, unit: str) -> None:
    parser.add_argument(
        "--executor", choices=("serial", "ray"), default="serial", help=f"where {unit} run (ray: pip install ray)"
    )
    parser.add_argument("--ray-address", help="an existing Ray cluster (auto, ray://head:10001); default: a local one")
    parser.add_argument("--workers", type=int, help="Ray workers (one model each; default: one per CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmlens", description="Mechanistic interpretability for multimodal transformers."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    hooks = sub.add_parser("hooks", help="list a model's hook points grouped by stage and modality")
    hooks.add_argument("model", nargs="?", help="registry name (see `mmlens models`) or a Hugging Face id / folder")
    hooks.add_argument(
        "--supported", action="store_true", help="print the supported model classes (hand table or automatic)"
    )
    hooks.add_argument("--json", action="store_true", help="print a JSON list of hook points")
    hooks.add_argument("--markdown", action="store_true", help="print a Markdown table, block indices collapsed")
    hooks.add_argument("--no-shapes", action="store_true", help="skip the dry run that measures shapes")
    hooks.set_defaults(func=cmd_hooks)
    models = sub.add_parser("models", help="list the model registry")
    models.set_defaults(func=cmd_models)
    patch = sub.add_parser("patch", help="run (or resume) an activation-patching sweep described by a config file")
    patch.add_argument("config", help="a .toml/.yaml/.json config (see mmlens/runs/patch.py and analyses/configs/)")
    patch.add_argument("--out", help="output folder (overrides output.dir)")
    patch.add_argument(
        "--overwrite",
        action="store_true",
        help="delete a previous run's results in the output folder instead of resuming or refusing",
    )
    patch.add_argument("--check", action="store_true", help="validate the config against the model and print the plan")
    patch.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_executor_options(patch, "chunks")
    patch.set_defaults(func=cmd_patch)
    evaluate = sub.add_parser("evaluate", help="score explainers on Granger influence, faithfulness and stability")
    evaluate.add_argument(
        "config", help="a .toml/.yaml/.json config (see mmlens/runs/evaluate.py and analyses/configs/)"
    )
    evaluate.add_argument("--out", help="output folder (overrides output.dir)")
    evaluate.add_argument("--overwrite", action="store_true", help="discard finished parts of a previous run")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_executor_options(evaluate, "parts (metric x explainer)")
    evaluate.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader went away (`mmlens hooks ... | head -1`): stop quietly, as on SIGPIPE
        with contextlib.suppress(OSError, ValueError):  # no real stdout (a notebook, a test's capture)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (LookupError, ValueError, TypeError, OSError, RuntimeError) as err:
        print(f"mmlens: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
