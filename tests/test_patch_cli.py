"""`mmlens patch CONFIG`: config validation, outputs, equality with a direct sweep, resuming, refusal."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest

import mmlens
import mmlens.runs.patch as patch_cmd
from mmlens.data.images import make_image
from mmlens.data.loading import encode
from mmlens.methods.patching import corrupt, sweep
from mmlens.runs.cli import main
from mmlens.runs.config import ConfigError
from mmlens.runs.patch import PatchConfig, prepare

CONFIGS = Path(__file__).resolve().parents[1] / "analyses" / "configs"
CLEAN, CORRUPTED = "Tom had a red ball. He gave it to", "Sue had a red ball. She gave it to"  # 9 tokens each
STORY = "Once upon a time there was a little girl who"

# TinyStories-656K, 2 layers: pair 0 gives its corrupted text, pair 1 takes text noise from [corruption].
TINY = f"""
seed = 0

[model]
name = "tinystories-656k"

[[inputs.pairs]]
clean = "{CLEAN}"
corrupted = "{CORRUPTED}"

[[inputs.pairs]]
clean = "{STORY}"

[corruption]
modality = "text"
method = "noise"
noise = 2.0

[patch]
batch_size = 8

[metric]
kind = "kl"

[output]
dir = "unused-because-of---out"
"""


def _raw() -> dict:
    import tomllib

    return tomllib.loads(TINY)


def _write(tmp_path: Path, text: str = TINY, name: str = "tiny.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _results(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "results.csv")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted CLI run of the TinyStories config: (config path, output folder)."""
    tmp = tmp_path_factory.mktemp("patch")
    config = _write(tmp)
    out = tmp / "run"
    assert main(["patch", str(config), "--out", str(out), "--no-progress"]) == 0
    return config, out


# --- the example configs ---------------------------------------------------------------------------


def test_example_configs_parse_and_validate_against_their_models():
    smol = PatchConfig.from_file(CONFIGS / "patch_smollm2_text.toml")
    assert smol.model.name == "smollm2-135m-instruct" and smol.metric.answer == " Mary"
    assert smol.patch.layers and len(smol.inputs.pairs) == 1
    prepared = prepare(smol)  # single-token answers, equal token counts, layers that exist
    assert prepared.pairs[0].metric_tokens["answer"]["text"] == " Mary"
    assert len(prepared.chunks) == len(smol.patch.layers)
    llava = PatchConfig.from_file(CONFIGS / "patch_llava_image.yaml")
    assert llava.inputs.example == (0,) and llava.corruption.modality == "image" and llava.metric.kind == "kl"
    assert "valid" in patch_cmd.describe(prepare(llava))


def test_multimodal_example_runs(tmp_path, capsys):
    out = tmp_path / "llava"
    assert main(["patch", str(CONFIGS / "patch_llava_image.yaml"), "--out", str(out), "--no-progress"]) == 0
    table = _results(out)
    assert len(table) == 2 * 24 and (table.modality == "image").sum() == 2 * 16
    meta = json.loads((out / "meta.json").read_text())
    assert meta["baselines"][0]["clean"] == 0.0 and meta["baselines"][0]["corrupted"] > 0  # KL: the image matters
    assert meta["sweep_methods"] == ["replay + kv"]
    # the 4 text tokens before the image are identical in both runs; at layer 0 (embeddings) the 4 after it too
    assert meta["no_op_cells_skipped"] == (4 + 4) + 4
    assert (out / "heatmap_pair0.png").is_file() and (out / "heatmap_pair0.svg").is_file()
    assert str(out / "results.csv") in capsys.readouterr().out


# --- a run: outputs, and the same numbers as sweep ------------------------------------------------------


def test_run_writes_results_meta_and_heatmaps(finished):
    _, out = finished
    for name in (
        "results.csv",
        "meta.json",
        "chunks.jsonl",
        "heatmap_pair0.png",
        "heatmap_pair0.svg",
        "heatmap_pair1.png",
        "heatmap_pair1.svg",
    ):
        assert (out / name).is_file(), name
    meta = json.loads((out / "meta.json").read_text())
    assert set(meta["versions"]) >= {"mmlens", "torch", "transformers"} and meta["seed"] == 0
    assert meta["config"]["model"]["name"] == "tinystories-656k" and meta["config"]["output"]["dir"] == str(out)
    assert len(meta["config_hash"]) == 16 and meta["config_hash"] == PatchConfig.from_file(finished[0]).hash()
    assert {"load_model", "prepare_inputs", "sweep", "write_results", "plots", "total"} <= set(meta["timings_s"])
    assert meta["chunks"] == {"total": 4, "computed_this_run": 4, "reused": 0, "unit": "pair x layer"}
    assert [b["pair"] for b in meta["baselines"]] == [0, 1]
    assert all(b["clean"] == 0.0 and b["corrupted"] > 0 for b in meta["baselines"])
    assert meta["baselines"][1]["corruption"].startswith("text: Gaussian noise")


def test_results_equal_a_direct_sweep(finished, loaded):
    _, out = finished
    lm = loaded("tinystories-656k")
    hm = mmlens.wrap(lm.model, tokenizer=lm.tokenizer)
    clean0, corrupted0 = (dict(lm.tokenizer([t], return_tensors="pt")) for t in (CLEAN, CORRUPTED))
    clean1 = dict(lm.tokenizer([STORY], return_tensors="pt"))
    direct = [
        sweep(hm, clean0, corrupted0, "kl", batch_size=8, progress=False),
        sweep(hm, clean1, corrupt(hm, clean1, "text", "noise", noise=2.0, seed=0), "kl", batch_size=8, progress=False),
    ]
    expected = pd.concat([r.table.assign(pair=i) for i, r in enumerate(direct)], ignore_index=True)
    got = _results(out)
    assert (
        list(got.columns)
        == list(expected.columns)
        == ["pair", "layer", "position", "token", "modality", "value", "normalized"]
    )
    assert len(got) == len(expected) == 2 * (9 + 10)
    for column in ("pair", "layer", "position"):
        assert (got[column] == expected[column]).all()
    assert (got.modality == expected.modality).all()
    pd.testing.assert_series_equal(got.value, expected.value, rtol=1e-5, atol=1e-6)
    pd.testing.assert_series_equal(got.normalized, expected.normalized, rtol=1e-4, atol=1e-5)
    meta = json.loads((out / "meta.json").read_text())
    assert [b["corrupted"] for b in meta["baselines"]] == pytest.approx([r.corrupted[0] for r in direct], rel=1e-6)


# --- resuming ----------------------------------------------------------------------------------


def test_an_interrupted_run_resumes_without_recomputing_finished_chunks(finished, tmp_path, monkeypatch, capsys):
    config = _write(tmp_path)
    out = tmp_path / "resumed"
    calls = []

    def interrupted_sweep(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # Ctrl-C during the second chunk
        calls.append(kwargs["hook"])
        return sweep(*args, **kwargs)

    monkeypatch.setattr(patch_cmd, "sweep", interrupted_sweep)
    assert main(["patch", str(config), "--out", str(out), "--no-progress"]) == 130
    assert "interrupted" in capsys.readouterr().err
    lines = (out / "chunks.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["key"] == "pair0/layer0"  # header + the finished chunk
    assert not (out / "results.csv").exists()
    assert sorted(p.name for p in out.iterdir()) == [".mmlens.lock", "chunks.jsonl"]  # no temporary files

    hooks = []

    def counting_sweep(*args, **kwargs):
        hooks.append(kwargs["hook"])
        return sweep(*args, **kwargs)

    monkeypatch.setattr(patch_cmd, "sweep", counting_sweep)
    assert main(["patch", str(config), "--out", str(out), "--no-progress"]) == 0
    assert hooks == ["lm.blocks.1.resid_pre", "lm.blocks.0.resid_pre", "lm.blocks.1.resid_pre"]  # not pair 0 layer 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["chunks"]["computed_this_run"] == 3 and meta["chunks"]["reused"] == 1
    pd.testing.assert_frame_equal(_results(out), _results(finished[1]))

    hooks.clear()
    assert main(["patch", str(config), "--out", str(out), "--no-progress"]) == 0  # finished: nothing to compute
    assert hooks == [] and json.loads((out / "meta.json").read_text())["chunks"]["reused"] == 4


def test_a_changed_config_in_the_same_folder_is_refused_unless_overwrite(finished, tmp_path, capsys):
    _, out = finished
    before = (out / "chunks.jsonl").read_text()
    changed = _write(tmp_path, TINY.replace("noise = 2.0", "noise = 2.5"))
    assert main(["patch", str(changed), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "corruption.noise" in err and "--overwrite" in err
    assert (out / "chunks.jsonl").read_text() == before  # untouched

    copy_out = tmp_path / "copy"
    copy_out.mkdir()
    for f in out.iterdir():
        (copy_out / f.name).write_bytes(f.read_bytes())
    quick = _write(tmp_path, TINY.replace("noise = 2.0", "noise = 2.5") + "plots = false\n", "quick.toml")
    assert main(["patch", str(quick), "--out", str(copy_out), "--overwrite", "--no-progress"]) == 0
    meta = json.loads((copy_out / "meta.json").read_text())
    assert meta["config"]["corruption"]["noise"] == 2.5 and meta["chunks"]["computed_this_run"] == 4
    assert not (copy_out / "heatmap_pair0.png").exists()  # the old run's files went with --overwrite


def test_output_only_changes_keep_the_hash():
    raw = _raw()
    other = copy.deepcopy(raw)
    other["output"].update(dir="elsewhere", plots=False)
    other["patch"]["axes"] = ["layer", "position"]  # the default spelled out
    assert PatchConfig.from_dict(raw).hash() == PatchConfig.from_dict(other).hash()
    other["patch"]["batch_size"] = 4
    assert PatchConfig.from_dict(raw).hash() != PatchConfig.from_dict(other).hash()


# --- errors name the field -----------------------------------------------------------------------


def _set(raw: dict, dotted: str, value) -> dict:
    raw = copy.deepcopy(raw)
    *parents, last = dotted.split(".")
    node = raw
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    key = int(last) if isinstance(node, list) else last
    if value is _DELETE:
        del node[key]
    else:
        node[key] = value
    return raw


_DELETE = object()
STATIC_ERRORS = [
    ("metric.kind", "logits", "metric.kind", "expected one of 'logit_diff', 'logprob', 'prob' or 'kl', got 'logits'"),
    ("patch.hooks", "resid_pre", "patch.hooks", "valid keys in [patch]: axes, batch_size, direction, hook"),
    ("seeds", 1, "seeds", "valid keys in the top level"),
    ("patch.batch_size", "32", "patch.batch_size", "expected an integer, got '32' (str)"),
    ("patch.batch_size", 0, "patch.batch_size", "expected a value >= 1"),
    ("patch.axes", ["position", "layer"], "patch.axes", "not a supported combination"),
    ("patch.layers", [0, -1], "patch.layers[1]", "expected a value >= 0"),
    ("patch.layers", [1, 1], "patch.layers", "repeated layers"),
    ("patch.direction", "forward", "patch.direction", "'denoise' or 'noise'"),
    ("corruption.method", "blur", "corruption.method", "'neutral', 'noise' or 'swap'"),
    ("corruption.noise", -1.0, "corruption.noise", "expected a value > 0"),
    ("corruption.swap_row", 1, "corruption.swap_row", "only applies to method = 'swap'"),
    ("output.format", "xlsx", "output.format", "'csv' or 'parquet'"),
    ("output.dir", " ", "output.dir", "expected a folder path"),
    ("output.dir", _DELETE, "output.dir", "missing"),
    ("model", _DELETE, "model", "missing section"),
    ("inputs.pairs", [], "inputs.pairs", "expected at least 1 item"),
    ("inputs.pairs.0", "text", "inputs.pairs[0]", "expected a table"),
    ("inputs.pairs.0.answer", True, "inputs.pairs[0].answer", "a single-token string or a token id"),
    ("inputs.pairs.0.clean", _DELETE, "inputs.pairs[0].clean", "missing"),
    ("inputs.pairs.0.image", "generated:teal-square", "inputs.pairs[0].image", "unknown generated image"),
    ("inputs.pairs.1.target", " the", "inputs.pairs[1].target", "takes no tokens"),
    ("metric.kind", "logit_diff", "metric.answer", "needs answer and wrong"),
    ("corruption", _DELETE, "inputs.pairs[1].corrupted", "[corruption]"),
]


@pytest.mark.parametrize(
    "dotted, value, field, hint", STATIC_ERRORS, ids=[e[2] + ":" + str(e[1]) for e in STATIC_ERRORS]
)
def test_bad_fields_are_named(dotted, value, field, hint):
    with pytest.raises(ConfigError) as info:
        PatchConfig.from_dict(_set(_raw(), dotted, value))
    assert info.value.field == field and hint in str(info.value)


MODEL_ERRORS = [
    ({"metric": {"kind": "logit_diff", "answer": " Mary", "wrong": 380}}, "metric.answer", "['▁', 'M"),
    ({"metric": {"kind": "prob", "target": 99999}}, "metric.target", "outside the vocabulary"),
    ({"patch": {"layers": [0, 5]}}, "patch.layers", "layers [5] do not exist"),
    ({"patch": {"hook": "resid_pree"}}, "patch.hook", "resid_pre"),
    ({"model": {"name": "no-such-model-here"}}, "model.name", "tinystories-656k"),
    ({"corruption": {"modality": "image"}}, "corruption.modality", "not in the inputs"),
]


@pytest.mark.parametrize("change, field, hint", MODEL_ERRORS, ids=[e[1] for e in MODEL_ERRORS])
def test_model_dependent_errors_are_named(change, field, hint):
    raw = _raw()
    for section, values in change.items():
        raw[section] = {**raw.get(section, {}), **values} if section != "metric" else values
    with pytest.raises(ConfigError) as info:
        prepare(PatchConfig.from_dict(raw))
    assert info.value.field == field and hint in str(info.value)


def test_unequal_token_counts_and_images_without_a_processor_are_named():
    raw = _raw()
    raw["inputs"]["pairs"][0].update(
        clean="Lily and Ben went to the park. Ben gave the ball to",  # 9 tokens
        corrupted="Lily and Ben went to the park. Lily gave the ball to",
    )  # 8 tokens
    with pytest.raises(ConfigError) as info:
        prepare(PatchConfig.from_dict(raw))
    assert info.value.field == "inputs.pairs[0]" and "different shapes" in str(info.value)
    assert "'.▁Lily▁'" in str(info.value)  # the tokens of both inputs are shown
    raw = _raw()
    raw["inputs"]["pairs"][0]["image"] = "generated:red-square"
    with pytest.raises(ConfigError, match=r"inputs\.pairs\[0\]\.image: .*has no processor"):
        prepare(PatchConfig.from_dict(raw))


def test_cli_errors_name_the_file_and_field(tmp_path, capsys, monkeypatch):
    bad = _write(tmp_path, TINY.replace('kind = "kl"', 'kind = "kl-div"'))
    assert main(["patch", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert f"{bad}: metric.kind: expected one of" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["patch", str(_write(tmp_path, "[model\n", "broken.toml"))]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    monkeypatch.setattr(patch_cmd, "has_parquet_engine", lambda: False)
    parquet = _write(tmp_path, TINY + 'format = "parquet"\n', "parquet.toml")
    assert main(["patch", str(parquet), "--check"]) == 2
    assert "output.format: 'parquet' needs pyarrow" in capsys.readouterr().err


def test_generated_images():
    image = make_image("generated:red-square")
    assert image.size == (64, 64) and image.getpixel((32, 32)) == (200, 40, 40)
    assert image.getpixel((2, 2)) != (200, 40, 40)
    assert make_image("generated:blue").getpixel((0, 0)) == (40, 70, 200)


def test_image_pairs_go_through_the_processor_in_a_chat_turn():
    import torch

    calls = []

    class Processor:
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, add_generation_prompt):
            return f"<image>{messages[0]['content'][1]['text']}"

        def __call__(self, images=None, text=None, return_tensors=None):
            calls.append((images, text))
            return {"input_ids": torch.ones(1, 3, dtype=torch.long), "pixel_values": torch.zeros(1, 3, 8, 8)}

    class Loaded:
        name, tokenizer, processor = "fake", None, Processor()
        model = torch.nn.Linear(2, 2).to(torch.float16)

    inputs = encode(Loaded(), "What colour?", make_image("generated:green-circle"))
    ((images, text),) = calls
    assert text == ["<image>What colour?"] and images[0].getpixel((32, 32)) == (40, 160, 60)
    assert inputs["pixel_values"].dtype == torch.float16 and inputs["input_ids"].dtype == torch.long


# --- the resumable record and the hashing rule ------------------------------------------------------


def test_the_record_continues_its_own_config_and_refuses_another(tmp_path):
    from mmlens.runs.record import Record, ResumeError

    path, config = tmp_path / "run" / "record.jsonl", {"model": "m", "method": {"noise": 2.0}}
    assert Record.continuing(path, config) is None  # nothing to continue
    record = Record.create(path, "test", config, n_parts=2)
    calls = []
    first = record.get_or_add("a", lambda: calls.append(1) or {"value": 1.5})
    again = Record.continuing(path, {"method": {"noise": 2.0}, "model": "m"})  # key order does not matter
    assert again.keys == ["a"] and again.get_or_add("a", lambda: calls.append(2) or {}) == first == {
        "key": "a",
        "value": 1.5,
    }
    assert calls == [1] and again.header["n_parts"] == 2
    with pytest.raises(ResumeError, match=r"different config .*changed: method\.noise"):
        Record.continuing(path, {"model": "m", "method": {"noise": 3.0}})
    assert Record.continuing(path, {"model": "m"}, overwrite=True) is None
    path.write_text("{not json\n")
    with pytest.raises(ResumeError, match="unreadable"):
        Record.continuing(path, config)


def test_the_hash_names_image_contents_not_the_output_folder(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    raw = _raw()
    raw["inputs"]["pairs"][0]["image"] = "a.png"
    config = PatchConfig.from_dict(raw, source=tmp_path / "tiny.toml")
    assert config.input_files() == {"a.png": tmp_path / "a.png"}
    before = config.hash()
    assert config.with_output(tmp_path / "elsewhere").hash() == before
    Image.new("RGB", (8, 8), (3, 2, 1)).save(tmp_path / "a.png")
    assert config.hash() != before


def test_tokenizer_of_finds_a_processor_tokenizer():
    from types import SimpleNamespace

    from mmlens.data.loading import tokenizer_of

    tok = object()
    assert tokenizer_of(SimpleNamespace(tokenizer=tok, processor=None)) is tok
    assert tokenizer_of(SimpleNamespace(tokenizer=None, processor=SimpleNamespace(tokenizer=tok))) is tok
    assert tokenizer_of(SimpleNamespace(tokenizer=None, processor=None)) is None
