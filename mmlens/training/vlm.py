"""An offline *trained* vision-language model: LLaVA around the real TinyStories-656K LM.

``LlavaForConditionalGeneration`` with a tiny CLIP vision tower (32x32 px, patch 8 -> 16 image
tokens, 2 layers, d=64) and LLaVA's two-layer projector, whose language model is the pretrained
TinyStories-656K (Llama, 2 layers, d=128, vocab 2048), weights untouched and frozen. Only the
vision side is trained, in-process and seeded, so that the LM answers a question about a rendered
scene (one shape of one colour on a dark, noisy background) with one word::

    <bos> <image>x16 Q: what color is it? A: it is   ->  red | green | blue | yellow
    <bos> <image>x16 Q: what shape is it? A: a       ->  circle | square | triangle

Training has two stages (:func:`train_vlm`): (1) standing in for CLIP's pretraining, the vision
tower learns the scene attributes through temporary linear heads on its mean patch feature (the LM
is not run); (2) LLaVA's feature alignment: only the projector learns, with cross-entropy on the
answer's first token through the frozen LM. The answer frames ("it is" / "a") end each prompt in a
token of its own, so the two-layer LM knows the question kind at the answer position; with the
question words alone (six tokens back), colour reached 1.0 but shape stayed at 0.4-0.7.

Both prompts are 12 text tokens that differ in tokens 4-5 (``col or▁`` / ``sha pe▁``) and 10-11
(``:▁ it▁is▁`` / ``: ▁a▁``), so every input is 29 tokens with the image at positions 1..16, and
questions about any scenes form same-layout pairs for patching. The target is each answer word's
first token in running text (``word + " "``): ``red▁ green▁ blue▁ yellow▁`` (whole words) and
``c squ tri``.

Image token: TinyStories' vocabulary has no free id, and LLaVA embeds ``input_ids`` before it
overwrites the image positions, so the placeholder is an existing id: :data:`IMAGE_TOKEN_ID` = 79,
the character ``|``, which stories hardly use. :class:`SceneProcessor` writes 16 of it for each
``"<image>"`` in a prompt and refuses text that contains a literal ``|``.

>>> vlm = train_vlm()                 # ~40 s on one CPU thread the first time, then loaded from the cache
>>> vlm.accuracy                      # held-out: {"color": 1.0, "shape": 0.976}
>>> scenes = vlm.test_scenes()[:4]
>>> inputs = vlm.processor.questions(scenes, "color")   # input_ids [4, 29], pixel_values [4, 3, 32, 32]
>>> vlm.model(**inputs).logits[:, -1].argmax(-1) == vlm.processor.answer_ids(scenes, "color")
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from mmlens.data import tasks
from mmlens.data.paths import models_dir
from mmlens.store import config_hash, file_digest
from mmlens.training.loop import RowOrder, fit, train_or_load

Inputs = dict[str, torch.Tensor]

COLORS = tasks.COLORS
"""Colour names (those of :mod:`mmlens.data.tasks`, painted in its :data:`~mmlens.data.tasks.RGB`)."""
SHAPES = tasks.SHAPES[:3]
"""Shape names: circle, square, triangle (a cross would share the circle's first answer token ``c``)."""
QUESTIONS = {"color": "Q: what color is it? A: it is ", "shape": "Q: what shape is it? A: a "}
"""Question kind -> the text after the image: the question, then an answer frame ("it is" / "a")
that ends in a different token per kind; the answer is the scene's colour / shape name."""
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = 79  # "|" in TinyStories' vocabulary: an existing id that stories hardly use
PAD_TOKEN_ID = 0  # "<unk>", TinyStories' pad token
BACKGROUND = (0.08, 0.08, 0.10)
LEARNED_THRESHOLD = 0.9
_VERSION = 2  # bump when rendering, model or training code changes what a configuration produces


def tinystories_path() -> Path:
    """The TinyStories-656K folder (``models_dir()/tinystories-656k``)."""
    return models_dir() / "tinystories-656k"


# -- scenes -----------------------------------------------------------------------------------------


def render_scene(
    color: str,
    shape: str,
    center: tuple[float, float],
    radius: float,
    *,
    size: int = 32,
    noise: float = 0.03,
    seed: int = 0,
) -> np.ndarray:
    """One scene: a ``shape`` of ``color`` on a dark background, anti-aliased, with Gaussian noise.

    Args:
        center: (x, y) of the centre of the shape's bounding box, in pixels from the top left.
        radius: the circle's radius in pixels; the square and the (upward, equilateral) triangle
            have the same area.
        noise: standard deviation of the per-pixel, per-channel noise.
        seed: seed of the noise.

    Returns:
        Float32[3, size, size] in [0, 1].
    """
    sub = 4  # supersampling per axis
    coords = (np.arange(size * sub) + 0.5) / sub
    x, y = coords[None, :] - center[0], coords[:, None] - center[1]
    if shape == "circle":
        inside = x**2 + y**2 <= radius**2
    elif shape == "square":
        half = radius * math.sqrt(math.pi) / 2
        inside = (np.abs(x) <= half) & (np.abs(y) <= half)
    elif shape == "triangle":
        r = radius * math.sqrt(4 * math.pi / (3 * math.sqrt(3)))  # circumradius
        y = y + r / 4  # from the bounding box's centre to the centroid
        inside = (y <= r / 2) & (np.abs(x) * math.sqrt(3) <= y + r)
    else:
        raise ValueError(f"unknown shape {shape!r}; shapes: {SHAPES}")
    cover = inside.reshape(size, sub, size, sub).mean(axis=(1, 3))
    rgb, background = np.array(tasks.RGB[color])[:, None, None], np.array(BACKGROUND)[:, None, None]
    image = background + cover * (rgb - background)
    image = image + np.random.default_rng(seed).normal(0.0, noise, image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


@dataclass
class Scenes:
    """A batch of rendered scenes and their attributes.

    Attributes:
        pixels: Float32[n, 3, size, size] in [0, 1].
        colors, shapes: the attribute names, one per scene.
        centers: Float[n, 2], (x, y) in pixels; radii: Float[n], in pixels.
    """

    pixels: np.ndarray
    colors: list[str]
    shapes: list[str]
    centers: np.ndarray
    radii: np.ndarray

    def __len__(self) -> int:
        return len(self.colors)

    def __getitem__(self, index: slice | Sequence[int]) -> Scenes:
        rows = list(range(len(self))[index]) if isinstance(index, slice) else list(index)
        return Scenes(
            self.pixels[rows],
            [self.colors[i] for i in rows],
            [self.shapes[i] for i in rows],
            self.centers[rows],
            self.radii[rows],
        )

    def answers(self, kind: str) -> list[str]:
        """The answer word of question ``kind`` for every scene."""
        return {"color": self.colors, "shape": self.shapes}[kind]


def make_scenes(
    n: int, seed: int, *, size: int = 32, noise: float = 0.03, radius: tuple[float, float] = (0.17, 0.24)
) -> Scenes:
    """``n`` seeded scenes: colour and shape uniform, radius uniform in ``radius`` (fractions of
    ``size``), the centre uniform in the middle 30% of each axis (shapes stay inside the image)."""
    rng = np.random.default_rng(seed)
    colors = [COLORS[i] for i in rng.integers(len(COLORS), size=n)]
    shapes = [SHAPES[i] for i in rng.integers(len(SHAPES), size=n)]
    radii = rng.uniform(*radius, n) * size
    centers = rng.uniform(0.35, 0.65, (n, 2)) * size
    noise_seeds = rng.integers(2**31, size=n)
    pixels = np.stack(
        [
            render_scene(c, s, tuple(xy), r, size=size, noise=noise, seed=int(k))
            for c, s, xy, r, k in zip(colors, shapes, centers, radii, noise_seeds)
        ]
    )
    return Scenes(pixels, colors, shapes, centers, radii)


# -- inputs -----------------------------------------------------------------------------------------


@dataclass
class SceneProcessor:
    """Builds the model's inputs, as a Hugging Face processor would: ``processor(text=..., images=...)``.

    Each ``"<image>"`` in a text becomes ``n_image_tokens`` copies of :data:`IMAGE_TOKEN_ID`; texts
    start with bos and are padded at the end with :data:`PAD_TOKEN_ID`.
    """

    tokenizer: Any
    image_size: int
    n_image_tokens: int
    _answer_ids: dict[tuple[str, str], int] = field(default_factory=dict, init=False, repr=False)

    def __call__(self, text: str | Sequence[str], images: Any = None, return_tensors: str = "pt") -> Inputs:
        """input_ids and attention_mask Long[b, seq], and pixel_values Float[n_images, 3, s, s] when
        ``images`` are given (one per ``"<image>"``, in order; see :meth:`pixels`)."""
        if return_tensors != "pt":
            raise ValueError(f"only return_tensors='pt' is supported, got {return_tensors!r}")
        texts = [text] if isinstance(text, str) else list(text)
        rows = [self._ids(t) for t in texts]
        length = max(map(len, rows))
        ids = torch.tensor([r + [PAD_TOKEN_ID] * (length - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
        out = {"input_ids": ids, "attention_mask": mask}
        n_slots = sum(t.count(IMAGE_TOKEN) for t in texts)
        pixels = self.pixels(images) if images is not None else None
        n_images = 0 if pixels is None else pixels.shape[0]
        if n_slots != n_images:
            raise ValueError(f"the texts have {n_slots} {IMAGE_TOKEN!r} placeholders but {n_images} images were given")
        if pixels is not None:
            out["pixel_values"] = pixels
        return out

    def _ids(self, text: str) -> list[int]:
        if "|" in text:
            raise ValueError(f"text contains '|', the token reserved for image positions: {text!r}")
        ids = [self.tokenizer.bos_token_id]
        for i, piece in enumerate(text.split(IMAGE_TOKEN)):
            if i:
                ids += [IMAGE_TOKEN_ID] * self.n_image_tokens
            if piece:
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids

    def pixels(self, images: Any) -> torch.Tensor:
        """Images -> normalised pixel_values Float[n, 3, s, s] (``(x - 0.5) / 0.5``: an all-zero
        image is uniform mid-grey). ``images``: a Float[n, 3, s, s] array or tensor in [0, 1], or
        one or a list of PIL images / uint8 HxWx3 arrays (resized to s x s)."""
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            x = torch.as_tensor(images, dtype=torch.float32)
        else:
            x = torch.stack(
                [
                    _image_tensor(im, self.image_size)
                    for im in (images if isinstance(images, (list, tuple)) else [images])
                ]
            )
        if x.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(f"images must be [n, 3, {self.image_size}, {self.image_size}], got {tuple(x.shape)}")
        return (x - 0.5) / 0.5

    def questions(self, scenes: Scenes, kinds: str | Sequence[str]) -> Inputs:
        """Model inputs asking question ``kinds`` (one kind, or one per scene) about ``scenes``:
        input_ids / attention_mask [n, 29], pixel_values [n, 3, s, s]."""
        kinds = _per_scene(kinds, len(scenes))
        return self([IMAGE_TOKEN + QUESTIONS[k] for k in kinds], scenes.pixels)

    def answer_id(self, word: str, kind: str = "color") -> int:
        """The first token of ``word`` answering question ``kind`` in running text: of ``word + " "``
        after the prompt (``red▁ green▁ blue▁ yellow▁`` / ``c squ tri``)."""
        if (word, kind) not in self._answer_ids:
            prompt = self.tokenizer(QUESTIONS[kind], add_special_tokens=False)["input_ids"]
            full = self.tokenizer(QUESTIONS[kind] + word + " ", add_special_tokens=False)["input_ids"]
            if full[: len(prompt)] != prompt:
                raise ValueError(f"{word!r} merges with the prompt's last token; it cannot be an answer")
            self._answer_ids[word, kind] = full[len(prompt)]
        return self._answer_ids[word, kind]

    def answer_ids(self, scenes: Scenes, kinds: str | Sequence[str]) -> torch.Tensor:
        """Long[n]: the first token of each scene's answer to its question."""
        kinds = _per_scene(kinds, len(scenes))
        return torch.tensor([self.answer_id(scenes.answers(k)[i], k) for i, k in enumerate(kinds)])


def _image_tensor(image: Any, size: int) -> torch.Tensor:
    """A PIL image or uint8 HxWx3 array -> Float[3, size, size] in [0, 1]."""
    image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    array = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def _per_scene(kinds: str | Sequence[str], n: int) -> list[str]:
    kinds = [kinds] * n if isinstance(kinds, str) else list(kinds)
    if len(kinds) != n or any(k not in QUESTIONS for k in kinds):
        raise ValueError(f"kinds must be one of {sorted(QUESTIONS)} or one per scene ({n}), got {kinds}")
    return kinds


# -- model ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VLMConfig:
    """Everything that determines the trained weights (the cache key).

    Stage 1: ``vision_steps`` of AdamW (peak ``vision_lr``) on batches of ``vision_batch_size``
    scenes; stage 2: ``steps`` (peak ``lr``) on batches of ``batch_size`` (scene, question) pairs;
    both with the loop's :func:`~mmlens.training.loop.warmup_cosine` schedule. The training scenes are
    ``make_scenes(n_train, 2 * seed)``, the held-out ones ``make_scenes(n_test, 2 * seed + 1)``.
    """

    n_train: int = 6000
    n_test: int = 500
    seed: int = 0
    steps: int = 200
    kinds: tuple[str, ...] = ("color", "shape")
    batch_size: int = 32
    lr: float = 1e-3
    vision_steps: int = 800
    vision_batch_size: int = 64
    vision_lr: float = 2e-3
    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    noise: float = 0.03

    @property
    def n_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def identity(self) -> dict[str, Any]:
        """What identifies the trained weights: this configuration, the code version and the
        sha256 of the LM's weights."""
        return {**asdict(self), "version": _VERSION, "lm_sha256": file_digest(tinystories_path() / "model.safetensors")}

    def key(self) -> str:
        """:func:`~mmlens.store.config_hash` of :meth:`identity` (the artefact store's key)."""
        return config_hash(self.identity())


def build_vlm(config: VLMConfig) -> LlavaForConditionalGeneration:
    """The LLaVA model in float32: vision tower and projector initialised under ``config.seed``,
    the language model and its (tied) unembedding loaded from TinyStories-656K."""
    text_config = AutoConfig.from_pretrained(tinystories_path(), trust_remote_code=False)
    text_config.dtype = torch.float32  # the checkpoint says bfloat16, which the model would be built in
    text_config.pad_token_id = PAD_TOKEN_ID
    vision = CLIPVisionConfig(
        hidden_size=config.vision_hidden,
        intermediate_size=2 * config.vision_hidden,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=4,
        image_size=config.image_size,
        patch_size=config.patch_size,
        projection_dim=config.vision_hidden,
    )
    llava = LlavaConfig(
        vision_config=vision,
        text_config=text_config,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    llava.architectures = [LlavaForConditionalGeneration.__name__]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = LlavaForConditionalGeneration(llava)
    lm = AutoModelForCausalLM.from_pretrained(tinystories_path(), dtype=torch.float32, trust_remote_code=False)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    return model.eval()


TRAINED_PARTS = ("model.vision_tower.", "model.multi_modal_projector.")
"""State-dict prefixes of the trained tensors (the rest is TinyStories-656K, loaded by :func:`build_vlm`)."""


@torch.no_grad()
def answer_accuracy(
    model: LlavaForConditionalGeneration,
    processor: SceneProcessor,
    scenes: Scenes,
    kinds: Sequence[str],
    batch_size: int = 256,
) -> dict[str, float]:
    """Accuracy per question kind: the final position's argmax over the whole vocabulary equals the
    answer's first token."""
    accuracy = {}
    for kind in kinds:
        correct = 0
        for start in range(0, len(scenes), batch_size):
            batch = scenes[start : start + batch_size]
            logits = model(**processor.questions(batch, kind), logits_to_keep=1).logits[:, -1]
            correct += int((logits.argmax(-1) == processor.answer_ids(batch, kind)).sum())
        accuracy[kind] = correct / len(scenes)
    return accuracy


def _pretrain_vision(
    model: LlavaForConditionalGeneration,
    scenes: Scenes,
    processor: SceneProcessor,
    config: VLMConfig,
    generator: torch.Generator,
) -> None:
    """Stage 1, standing in for CLIP's pretraining: the vision tower learns the scene attributes
    through temporary linear heads (one per question kind) on the mean of the patch features that
    LLaVA passes on (last layer, CLS dropped). Cheap: the LM is not run."""
    tower = model.model.vision_tower
    names = {"color": list(COLORS), "shape": list(SHAPES)}
    labels = {k: torch.tensor([names[k].index(a) for a in scenes.answers(k)]) for k in config.kinds}
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(config.vision_hidden, len(names[k])) for k in config.kinds})
    pixels = processor.pixels(scenes.pixels)

    def step(rows: torch.Tensor, index: int) -> torch.Tensor:
        features = tower(pixels[rows], output_hidden_states=True).hidden_states[-1][:, 1:].mean(1)
        return sum(F.cross_entropy(heads[k](features), y[rows], label_smoothing=0.1) for k, y in labels.items())

    fit(
        step,
        [*tower.parameters(), *heads.parameters()],
        steps=config.vision_steps,
        lr=config.vision_lr,
        optimizer="adamw",
        weight_decay=0.01,
        schedule="warmup_cosine",
        order=RowOrder(len(scenes), config.vision_batch_size, generator),
    )


def _align_projector(
    model: LlavaForConditionalGeneration,
    scenes: Scenes,
    processor: SceneProcessor,
    config: VLMConfig,
    generator: torch.Generator,
) -> None:
    """Stage 2, LLaVA's feature alignment: only the projector learns, with cross-entropy on the
    answer's first token at the final position, through the frozen LM (vision tower frozen too)."""
    n = len(scenes)

    def step(rows: torch.Tensor, index: int) -> torch.Tensor:
        batch, kinds = scenes[(rows % n).tolist()], [config.kinds[i] for i in (rows // n).tolist()]
        logits = model(**processor.questions(batch, kinds), logits_to_keep=1).logits[:, -1]
        return F.cross_entropy(logits, processor.answer_ids(batch, kinds))

    fit(
        step,
        model.model.multi_modal_projector.parameters(),
        steps=config.steps,
        lr=config.lr,
        optimizer="adamw",
        weight_decay=0.01,
        schedule="warmup_cosine",
        order=RowOrder(n * len(config.kinds), config.batch_size, generator),
    )


def _train(model: LlavaForConditionalGeneration, processor: SceneProcessor, config: VLMConfig) -> None:
    """Both stages, seeded; leaves ``model`` in eval mode with ``requires_grad`` back on."""
    scenes = make_scenes(config.n_train, 2 * config.seed, size=config.image_size, noise=config.noise)
    generator = torch.Generator().manual_seed(config.seed)
    model.train().requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model.model.vision_tower.requires_grad_(True)
        _pretrain_vision(model, scenes, processor, config, generator)
        model.model.vision_tower.requires_grad_(False)
        model.model.multi_modal_projector.requires_grad_(True)
        _align_projector(model, scenes, processor, config, generator)
    model.eval().requires_grad_(True)


@dataclass
class TrainedVLM:
    """A trained synthetic VLM and what is needed to feed and judge it.

    Attributes:
        model: ``LlavaForConditionalGeneration`` in eval mode, float32, on the CPU.
        tokenizer: TinyStories' tokenizer.
        processor: a :class:`SceneProcessor` (``questions(scenes, kind)`` -> inputs).
        config: the :class:`VLMConfig` it was trained with.
        accuracy: held-out accuracy per question kind (see :func:`answer_accuracy`).
        train_seconds: wall time of the training run (on a cache hit: of the run that filled the cache).
        learned: every kind's accuracy is at least :data:`LEARNED_THRESHOLD`.
        path: the cached weights of the trained parts (safetensors; the artefact store's
            ``manifest.json`` beside it), or None if not cached.
    """

    model: LlavaForConditionalGeneration
    tokenizer: Any
    processor: SceneProcessor
    config: VLMConfig
    accuracy: dict[str, float]
    train_seconds: float
    learned: bool
    path: Path | None = None

    def test_scenes(self) -> Scenes:
        """The held-out scenes the accuracy was measured on."""
        c = self.config
        return make_scenes(c.n_test, 2 * c.seed + 1, size=c.image_size, noise=c.noise)


def train_vlm(
    *,
    n_train: int = 6000,
    n_test: int = 500,
    seed: int = 0,
    steps: int = 200,
    kinds: Sequence[str] = ("color", "shape"),
    cache: bool = True,
    **options: Any,
) -> TrainedVLM:
    """Train (or load from the cache) the synthetic VLM; the same arguments give identical weights.

    Args:
        n_train, n_test: training / held-out scenes; each training scene is asked every question kind.
        seed: seeds the vision tower's initialisation, the scenes and the batch order.
        steps: optimiser steps of stage 2 (the projector through the LM; ~0.07 s each).
        kinds: question kinds to train (keys of :data:`QUESTIONS`).
        cache: read and write the artefact store's ``<cache>/vlm/vlm-<key>/`` (``<cache>`` being
            ``MMLENS_CACHE`` or ``~/.cache/mmlens``, ``<key>`` :meth:`VLMConfig.key`); a hit loads
            without training.
        options: other :class:`VLMConfig` fields (batch_size, lr, image_size, ...).
    """
    config = VLMConfig(n_train=n_train, n_test=n_test, seed=seed, steps=steps, kinds=tuple(kinds), **options)
    if not config.kinds or set(config.kinds) - set(QUESTIONS):
        raise ValueError(f"kinds must be a non-empty subset of {sorted(QUESTIONS)}, got {config.kinds}")
    tokenizer = AutoTokenizer.from_pretrained(tinystories_path(), trust_remote_code=False)
    processor = SceneProcessor(tokenizer, config.image_size, config.n_image_tokens)
    model = build_vlm(config)

    def train() -> dict[str, Any]:
        start = time.perf_counter()
        _train(model, processor, config)
        seconds = time.perf_counter() - start
        test = make_scenes(config.n_test, 2 * config.seed + 1, size=config.image_size, noise=config.noise)
        accuracy = answer_accuracy(model, processor, test, config.kinds)
        return {
            "config": asdict(config),
            "key": config.key(),
            "accuracy": accuracy,
            "train_seconds": seconds,
            "learned": min(accuracy.values()) >= LEARNED_THRESHOLD,
            "image_token_id": IMAGE_TOKEN_ID,
        }

    cached = train_or_load("vlm", config.identity(), model, train, name="vlm", parts=TRAINED_PARTS, cache=cache)
    meta = cached.meta
    return TrainedVLM(
        model, tokenizer, processor, config, meta["accuracy"], meta["train_seconds"], meta["learned"], cached.path
    )
