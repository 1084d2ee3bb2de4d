"""The bad-input catalogue: every careless input ends in a clear error (type + a message naming the
field or value and the fix), never a silent wrong result and never a traceback of library internals.

Each case is ``(id, action, error type, patterns the message must contain)``; actions get a
``Models`` helper (tiny models, built once) and a temporary folder. CLI cases assert the exit code
and the message on stderr instead of an exception.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import mmlens
from mmlens.runs.cli import main
from mmlens.runs.config import ConfigError
from mmlens.runs.patch import PatchConfig, run_patch
from mmlens.runs.record import ResumeError
from mmlens.store import FolderBusyError, output_lock

NAN, INF = float("nan"), float("inf")


@functools.cache
def model(name: str) -> tuple[mmlens.HookedModel, dict[str, torch.Tensor]]:
    loaded = mmlens.load_model(name)
    return mmlens.wrap(loaded.model, tokenizer=loaded.tokenizer), loaded.example_inputs()


def text() -> tuple[mmlens.HookedModel, dict[str, torch.Tensor]]:
    return model("tinystories-656k")


def vlm() -> tuple[mmlens.HookedModel, dict[str, torch.Tensor]]:
    return model("tiny-random-llava")


def graph() -> tuple[mmlens.HookedModel, dict[str, torch.Tensor]]:
    return model("tea-glm-tiny")


def changed(inputs: dict, key: str, value: Any) -> dict:
    return {**inputs, key: value}


def run_with(get: Callable, edit: Callable[[dict], dict], **kwargs: Any) -> Callable[[Path], Any]:
    def action(tmp: Path) -> Any:
        hooked, inputs = get()
        return hooked.run(edit(dict(inputs)), **kwargs)

    return action


def with_value(get: Callable, key: str, fill: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], Any]:
    return run_with(get, lambda x: changed(x, key, fill(x[key])))


def nan_at(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = NAN
    return t


def inf_at(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[-1] = INF
    return t


API_INPUTS = [
    ("inputs-a-string", lambda tmp: text()[0].run("Once upon a time"), TypeError, ["dict of tensors", "to_inputs"]),
    ("inputs-a-list", lambda tmp: text()[0].run([1, 2, 3]), TypeError, ["dict of tensors"]),
    ("inputs-a-tensor", lambda tmp: text()[0].run(torch.ones(1, 3).long()), TypeError, ["dict of tensors"]),
    (
        "required-key-misspelt",
        run_with(text, lambda x: {"input_id": x["input_ids"]}),
        KeyError,
        ["lack", "input_ids", "did you mean", "input_id"],
    ),
    (
        "mask-key-misspelt",
        run_with(text, lambda x: {**x, "attention_masks": x.pop("attention_mask")}),
        KeyError,
        ["attention_masks", "attention_mask", "Rename"],
    ),
    (
        "pixel-key-misspelt",
        run_with(vlm, lambda x: {**x, "pixel_value": x.pop("pixel_values")}),
        KeyError,
        ["pixel_value", "pixel_values", "would run without it"],
    ),
    ("unknown-key", run_with(text, lambda x: {**x, "foo": torch.ones(1)}), KeyError, ["'foo'", "not an input"]),
    (
        "nan-pixels",
        with_value(vlm, "pixel_values", nan_at),
        ValueError,
        ["pixel_values", "non-finite", "allow_nonfinite"],
    ),
    ("inf-pixels", with_value(vlm, "pixel_values", inf_at), ValueError, ["pixel_values", "non-finite"]),
    (
        "nan-node-features",
        with_value(graph, "node_features", nan_at),
        ValueError,
        ["node_features", "non-finite", "allow_nonfinite"],
    ),
    ("inf-node-features", with_value(graph, "node_features", inf_at), ValueError, ["node_features", "NaN or Inf"]),
    (
        "uint8-pixels",
        with_value(vlm, "pixel_values", lambda t: (t.clamp(0, 1) * 255).to(torch.uint8)),
        TypeError,
        ["pixel_values", "floating point", "uint8", "processor"],
    ),
    (
        "int-pixels",
        with_value(vlm, "pixel_values", lambda t: t.long()),
        TypeError,
        ["pixel_values", "int64", "processor"],
    ),
    (
        "raw-0-255-pixels",
        with_value(vlm, "pixel_values", lambda t: t.clamp(0, 1) * 255),
        ValueError,
        ["pixel_values", "0-255", "processor"],
    ),
    (
        "token-id-past-vocab",
        with_value(text, "input_ids", lambda t: t.clone().fill_(5000)),
        ValueError,
        ["input_ids", "5000", "2048", "tokenizer"],
    ),
    (
        "negative-token-id",
        with_value(text, "input_ids", lambda t: t.clone().fill_(-1)),
        ValueError,
        ["input_ids", "-1", "negative"],
    ),
    (
        "float-token-ids",
        with_value(text, "input_ids", lambda t: t.float()),
        TypeError,
        ["input_ids", "integer", ".long()"],
    ),
    (
        "all-zero-mask-row",
        with_value(text, "attention_mask", torch.zeros_like),
        ValueError,
        ["attention_mask", "all zeros", "[0]", "Drop the rows"],
    ),
    (
        "node-id-minus-one",
        with_value(graph, "node_ids", lambda t: t.clone().fill_(-1)),
        ValueError,
        ["node_ids", "negative"],
    ),
    (
        "node-id-past-graph",
        with_value(graph, "node_ids", lambda t: t.clone().fill_(10**6)),
        ValueError,
        ["node_ids", "1000000", "table of"],
    ),
    (
        "edge-past-graph",
        with_value(graph, "edge_index", lambda t: t.clone().fill_(10**6)),
        ValueError,
        ["edge_index", "1000000"],
    ),
    ("unknown-run-kwarg", lambda tmp: text()[0].run(text()[1], foo=1), TypeError, ["'foo'", "unknown keyword"]),
    ("misspelt-cache-kwarg", lambda tmp: text()[0].run(text()[1], cahce=True), TypeError, ["'cahce'", "cache"]),
    ("unknown-backend", lambda tmp: text()[0].run(text()[1], backend="jax"), ValueError, ["'jax'", "torch", "nnsight"]),
    (
        "cache-pattern-matches-nothing",
        lambda tmp: text()[0].run(text()[1], cache="lm.blocks.*.resid_psot"),
        KeyError,
        ["resid_psot", "nearest"],
    ),
    ("cache-entry-not-a-name", lambda tmp: text()[0].run(text()[1], cache=[3]), TypeError, ["hook names or globs"]),
    (
        "edit-unknown-hook",
        lambda tmp: text()[0].run(text()[1], edits=[mmlens.ablate("lm.blocks.0.resid_psot")]),
        KeyError,
        ["resid_psot", "lm.blocks.0.resid_post"],
    ),
    ("edits-not-edits", lambda tmp: text()[0].run(text()[1], edits=["ablate"]), TypeError, ["mmlens.replace"]),
    (
        "unknown-span",
        lambda tmp: text()[0].run(text()[1], edits=[mmlens.ablate("lm.blocks.0.resid_post", at="imag")]),
        KeyError,
        ["'imag'", "spans here"],
    ),
]


def nested_run(tmp: Path) -> Any:
    hooked, inputs = text()
    with hooked.hooked(inputs, edits=[mmlens.ablate("lm.blocks.0.resid_post", at="last")]):
        return hooked.run({k: v[:, :4] for k, v in inputs.items()})


def recursive_edit(tmp: Path) -> Any:
    hooked, inputs = text()
    return hooked.run(inputs, edits=[mmlens.apply("lm.blocks.0.resid_post", lambda a, ctx: hooked.run(inputs) and a)])


def sweep_with(**kwargs: Any) -> Callable[[Path], Any]:
    def action(tmp: Path) -> Any:
        hooked, inputs = text()
        corrupted = {**inputs, "input_ids": inputs["input_ids"].flip(1)}
        return mmlens.sweep(hooked, inputs, corrupted, "kl", **{"hook": "lm.blocks.0.resid_post", **kwargs})

    return action


EDITS_AND_METHODS = [
    (
        "replace-with-a-string",
        lambda tmp: mmlens.replace("lm.blocks.0.resid_post", "zero"),
        TypeError,
        ["'zero'", "tensor or a number", "mmlens.ablate"],
    ),
    ("replace-with-none", lambda tmp: mmlens.replace("lm.blocks.0.resid_post", None), TypeError, ["NoneType"]),
    (
        "replace-with-nan",
        lambda tmp: mmlens.replace("lm.blocks.0.resid_post", torch.full((4,), NAN)),
        ValueError,
        ["NaN or Inf", "finite"],
    ),
    ("add-infinity", lambda tmp: mmlens.add("lm.blocks.0.resid_post", INF), ValueError, ["mmlens.add", "NaN or Inf"]),
    (
        "apply-one-argument",
        lambda tmp: mmlens.apply("lm.blocks.0.resid_post", lambda act: act),
        TypeError,
        ["two arguments (activation, ctx)", "lambda act, ctx"],
    ),
    ("apply-not-callable", lambda tmp: mmlens.apply("lm.blocks.0.resid_post", 3), TypeError, ["fn(activation, ctx)"]),
    ("edit-hook-not-a-name", lambda tmp: mmlens.ablate(3), TypeError, ["hook point name"]),
    (
        "apply-returns-wrong-shape",
        lambda tmp: text()[0].run(text()[1], edits=[mmlens.apply("lm.blocks.0.resid_post", lambda a, c: a[:, :1])]),
        ValueError,
        ["returned", "must return a tensor of shape"],
    ),
    ("run-inside-hooked", nested_run, RuntimeError, ["inside a hm.hooked", "outside the block"]),
    ("edit-function-runs-the-model", recursive_edit, RuntimeError, ["edit function that calls hm.run"]),
    ("sweep-batch-size-0", sweep_with(batch_size=0), ValueError, ["batch_size", ">= 1", "got 0"]),
    ("sweep-batch-size-negative", sweep_with(batch_size=-2), ValueError, ["batch_size", "got -2"]),
    ("sweep-batch-size-float", sweep_with(batch_size=2.5), TypeError, ["batch_size", "integer"]),
    ("sweep-unknown-direction", sweep_with(direction="sideways"), ValueError, ["'sideways'", "denoise"]),
    ("lens-k-0", lambda tmp: mmlens.logit_lens(text()[0], text()[1], k=0), ValueError, ["k must be", "got 0"]),
    (
        "lens-k-past-vocab",
        lambda tmp: mmlens.logit_lens(text()[0], text()[1], k=10**6),
        ValueError,
        ["k must be between 1 and 2048", "1000000"],
    ),
]

LOADING = [
    (
        "unknown-model",
        lambda tmp: mmlens.load_model("tiny-random-lava"),
        ValueError,
        ["tiny-random-lava", "tiny-random-llava"],
    ),
    ("device-meta", lambda tmp: mmlens.load_model("tiny-random-gpt2", device="meta"), ValueError, ["meta", "cpu"]),
    (
        "device-not-a-device",
        lambda tmp: mmlens.load_model("tiny-random-gpt2", device="gpu0"),
        ValueError,
        ["gpu0", "'cpu'"],
    ),
    (
        "disk-without-offload-folder",
        lambda tmp: mmlens.load_model("tinystories-656k", device_map={"model": "disk", "lm_head": "cpu"}),
        ValueError,
        ["disk", "offload_folder"],
    ),
    (
        "data-dir-missing",
        lambda tmp: mmlens.data.graphs.load_text_attributed_graph("cora", data_dir=tmp / "nowhere"),
        FileNotFoundError,
        ["nowhere", "MMLENS_DATA"],
    ),
]
if not torch.cuda.is_available():
    LOADING.append(
        (
            "device-cuda-without-gpu",
            lambda tmp: mmlens.load_model("tiny-random-gpt2", device="cuda"),
            ValueError,
            ["cuda", "no CUDA GPU", "device='cpu'"],
        )
    )

CONFIG = """
seed = {seed}
[model]
name = "tinystories-656k"
[[inputs.pairs]]
clean = "Tom had a red ball. He gave it to"
corrupted = "Sue had a red ball. She gave it to"
[patch]
hook = "resid_post"
[metric]
kind = "kl"
[output]
dir = "{out}"
"""


def config_file(text: str, name: str = "c.toml", encoding: str = "utf-8") -> Callable[[Path], Any]:
    def action(tmp: Path) -> Any:
        path = tmp / name
        path.write_text(text.replace("{out}", str(tmp / "out")), encoding=encoding)
        return PatchConfig.from_file(path)

    return action


def toml(seed: str = "0", **replace: str) -> str:
    text = CONFIG.replace("{seed}", seed)
    for old, new in replace.items():
        text = text.replace(old.replace("_", " "), new)
    return text


YAML = """
seed: 0
model: {name: tinystories-656k}
inputs:
  pairs:
    - {clean: "Tom had a red ball. He gave it to", corrupted: "Sue had a red ball. She gave it to"}
patch: {hook: resid_post}
metric: {kind: kl}
output: {dir: "{out}"}
"""

CONFIGS = [
    (
        "config-unknown-key",
        config_file(toml(**{'kind = "kl"': 'kind = "kl"\ncolour = 1'})),
        ConfigError,
        ["metric.colour"],
    ),
    ("config-wrong-type", config_file(toml(seed='"zero"')), ConfigError, ["seed", "integer"]),
    ("config-seed-too-big", config_file(toml(seed="100000000000000000000")), ConfigError, ["seed", "<= 4294967295"]),
    ("config-seed-float", config_file(toml(seed="1e20")), ConfigError, ["seed", "integer"]),
    ("config-seed-negative", config_file(toml(seed="-1")), ConfigError, ["seed", ">= 0"]),
    (
        "config-unknown-metric",
        config_file(toml(**{'kind = "kl"': 'kind = "kll"'})),
        ConfigError,
        ["metric.kind", "'kll'"],
    ),
    (
        "config-noise-infinite",
        config_file(toml(**{"[patch]": '[corruption]\nmodality = "text"\nmethod = "noise"\nnoise = inf\n[patch]'})),
        ConfigError,
        ["corruption.noise", "finite"],
    ),
    (
        "config-noise-nan",
        config_file(toml(**{"[patch]": '[corruption]\nmodality = "text"\nmethod = "noise"\nnoise = nan\n[patch]'})),
        ConfigError,
        ["corruption.noise", "finite"],
    ),
    (
        "config-toml-duplicate-key",
        config_file(toml(seed="0\nseed = 1")),
        ConfigError,
        ["not valid TOML", "'seed'", "given twice"],
    ),
    (
        "config-yaml-duplicate-key",
        config_file(YAML + "seed: 3\n", "c.yaml"),
        ConfigError,
        ["seed", "given twice", "delete one"],
    ),
    (
        "config-json-duplicate-key",
        config_file('{"seed": 0, "seed": 1}', "c.json"),
        ConfigError,
        ["seed", "given twice"],
    ),
    (
        "config-utf16",
        config_file(toml(), encoding="utf-16"),
        ConfigError,
        ["c.toml", "not UTF-8", "save the file as UTF-8"],
    ),
    ("config-bad-syntax", config_file("seed = = 0"), ConfigError, ["not valid TOML", "c.toml"]),
    ("config-bad-extension", config_file(toml(), "c.ini"), ConfigError, ["'.ini'", ".toml"]),
    ("config-top-level-list", config_file("- 1\n- 2\n", "c.yaml"), ConfigError, ["top level", "table"]),
    ("config-empty", config_file(""), ConfigError, ["model"]),
    (
        "config-empty-output-dir",
        config_file(toml().replace('dir = "{out}"', 'dir = " "')),
        ConfigError,
        ["output.dir", "folder"],
    ),
    (
        "config-missing-file",
        lambda tmp: PatchConfig.from_file(tmp / "nope.toml"),
        FileNotFoundError,
        ["nope.toml", "not found"],
    ),
    ("config-is-a-folder", lambda tmp: PatchConfig.from_file(tmp), FileNotFoundError, ["is a folder", "config file"]),
    ("config-rows-bool", config_file(toml(**{"[patch]": "[patch]\nrows = [true]"})), ConfigError, ["patch.rows"]),
]


def patch_into(out: Callable[[Path], Path]) -> Callable[[Path], Any]:
    def action(tmp: Path) -> Any:
        path = tmp / "c.toml"
        path.write_text(toml().replace("{out}", str(out(tmp))))
        return run_patch(path, progress=False)

    return action


def busy(tmp: Path) -> Any:
    with output_lock(tmp / "out"):
        return patch_into(lambda t: t / "out")(tmp)


def file_at(tmp: Path, name: str) -> Path:
    (tmp / name).write_text("")
    return tmp / name


def corrupt_record(tmp: Path) -> Any:
    (tmp / "out").mkdir()
    (tmp / "out" / "chunks.jsonl").write_text("{not json\n")
    return patch_into(lambda t: t / "out")(tmp)


RUNS = [
    ("output-is-a-file", patch_into(lambda t: file_at(t, "out")), OSError, ["cannot use", "output folder", "--out"]),
    ("output-under-a-file", patch_into(lambda t: file_at(t, "f") / "out"), OSError, ["cannot use", "f/out"]),
    ("output-busy", busy, FolderBusyError, ["another mmlens run", "pid", "wait for it"]),
    ("record-corrupt", corrupt_record, ResumeError, ["chunks.jsonl", "unreadable", "--overwrite"]),
]


@dataclass
class Cli:
    argv: list[str]
    files: dict[str, str]


CLI = [
    ("cli-unknown-model", Cli(["hooks", "tiny-random-lava"], {}), ["tiny-random-lava", "tiny-random-llava"]),
    ("cli-missing-config", Cli(["patch", "{tmp}/nope.toml"], {}), ["nope.toml", "not found"]),
    ("cli-config-folder", Cli(["patch", "{tmp}"], {}), ["is a folder"]),
    ("cli-bad-config-field", Cli(["patch", "{tmp}/c.toml"], {"c.toml": toml(seed='"x"')}), ["seed", "integer"]),
    (
        "cli-workers-without-ray",
        Cli(["patch", "{tmp}/c.toml", "--workers", "2"], {"c.toml": toml()}),
        ["--executor ray"],
    ),
    ("cli-evaluate-missing", Cli(["evaluate", "{tmp}/none.yaml"], {}), ["none.yaml", "not found"]),
    (
        "cli-output-is-a-file",
        Cli(["patch", "{tmp}/c.toml", "--out", "{tmp}/c.toml"], {"c.toml": toml()}),
        ["cannot use"],
    ),
]

CASES = API_INPUTS + EDITS_AND_METHODS + LOADING + CONFIGS + RUNS


def _check_message(message: str, patterns: list[str]) -> None:
    for pattern in patterns:
        assert pattern in message, f"message lacks {pattern!r}: {message}"


@pytest.mark.parametrize(("action", "error", "patterns"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_clearly(action, error, patterns, tmp_path):
    with pytest.raises(error) as caught:
        action(tmp_path)
    message = str(caught.value.args[0]) if isinstance(caught.value, KeyError) else str(caught.value)
    _check_message(message, patterns)


@pytest.mark.parametrize(("case", "patterns"), [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_bad_cli_input_exits_2_with_the_reason(case, patterns, tmp_path, capsys):
    for name, content in case.files.items():
        (tmp_path / name).write_text(content.replace("{out}", str(tmp_path / "out")))
    assert main([a.replace("{tmp}", str(tmp_path)) for a in case.argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    _check_message(err, patterns)


def test_the_catalogue_has_at_least_80_cases():
    assert len(CASES) + len(CLI) >= 80, len(CASES) + len(CLI)


def test_allow_nonfinite_lets_nan_through_on_purpose():
    loaded = mmlens.load_model("tiny-random-llava")
    hooked = mmlens.wrap(loaded.model, allow_nonfinite=True)
    inputs = loaded.example_inputs()
    inputs["pixel_values"] = nan_at(inputs["pixel_values"])
    assert torch.isnan(hooked.run(inputs).logits).any()


def test_broken_pipe_ends_quietly(monkeypatch, capsys):
    def boom(args):
        raise BrokenPipeError

    monkeypatch.setattr("mmlens.runs.cli.cmd_models", boom, raising=False)
    code = main(["models"])
    assert code in (0, 141)
    assert "Traceback" not in capsys.readouterr().err


def test_inputs_checked_once_are_checked_again_after_an_in_place_edit():
    loaded = mmlens.load_model("tiny-random-llava")
    hooked = mmlens.wrap(loaded.model)
    inputs = loaded.example_inputs()
    hooked.run(inputs)
    hooked.run(inputs)  # remembered by identity: not re-checked, same result
    inputs["pixel_values"].fill_(NAN)  # in place: a new version of the same tensor
    with pytest.raises(ValueError, match="pixel_values.*non-finite"):
        hooked.run(inputs)
    inputs["pixel_values"] = torch.full_like(inputs["pixel_values"], INF)  # a new object
    with pytest.raises(ValueError, match="pixel_values.*non-finite"):
        hooked.run(inputs)
