"""Seeded image + text classification tasks whose dependence on each modality is known by construction.

Every example is a 16x16 RGB scene (one coloured shape at a random position on a dark, noisy
background; or no shape) and a short text over a fixed vocabulary (:data:`VOCAB`, id 0 = padding,
padded at the end). The label rule says which modality the label depends on:

==============  ===========================================================  ==================
task            label                                                        ``depends_on``
==============  ===========================================================  ==================
``image_only``  the shape's colour; the text is filler words                 image
``text_only``   the colour word in the text; the image is noise, no shape    text
``shortcut``    the colour word in the text; the image shows a shape whose   text
                colour is drawn independently of the label (looks relevant)
``redundant``   the shape's colour, which the text's colour word repeats     image, text (either suffices)
``synergistic`` 1 iff the shape's colour (red / blue) is the colour word in    image, text (both needed)
                the text (red / blue): an XOR, neither modality alone beats 50%
==============  ===========================================================  ==================

>>> task = make_task("synergistic", n=1000, seed=0)
>>> task.batch(range(4))          # {"pixel_values": [4, 3, 16, 16], "input_ids": [4, 12], "attention_mask": [4, 12]}
>>> bayes_accuracy(task, "image") # ~0.5
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import ClassVar, TypeVar

import numpy as np
import torch
from torch import Tensor

from mmlens.core.names import nearest_names

IMAGE_SIZE = 16
"""Image height and width, pixels."""
PATCH_SIZE = 4
"""Patch side (pixels) of the models these tasks are made for: (16 / 4)^2 = 16 image patches."""
TEXT_LEN = 12
"""Token positions per text (sentences have 4..12 words, then padding)."""

COLORS = ("red", "green", "blue", "yellow")
"""Colour names, in label order."""
SHAPES = ("circle", "square", "triangle", "cross")
"""Shape names, in attribute order."""
RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.15, 0.1),
    "green": (0.15, 0.8, 0.2),
    "blue": (0.15, 0.3, 0.95),
    "yellow": (0.9, 0.85, 0.1),
}
"""Colour name -> RGB in [0, 1] of the shapes (before the per-image brightness)."""
FILLERS = (
    "the",
    "a",
    "this",
    "that",
    "is",
    "there",
    "here",
    "picture",
    "image",
    "photo",
    "shows",
    "with",
    "of",
    "in",
    "on",
    "and",
    "some",
    "object",
    "thing",
    "look",
    "at",
    "see",
    "it",
    "very",
    "small",
    "big",
    "near",
    "maybe",
    "what",
    "scene",
    "cat",
    "dog",
    "tree",
    "house",
    "car",
    "boat",
    "bird",
    "sun",
    "sky",
    "left",
    "right",
    "top",
)
VOCAB: tuple[str, ...] = ("<pad>", *COLORS, *FILLERS)
"""id -> word; id 0 is padding (the adapter's neutral text)."""
WORD_ID = {word: i for i, word in enumerate(VOCAB)}

_RGB = np.array([RGB[c] for c in COLORS])
_FILLER_IDS = np.array([WORD_ID[w] for w in FILLERS])
TASK_KINDS = ("image_only", "text_only", "shortcut", "redundant", "synergistic")
"""The kinds of dependence of the image + text tasks (``TaskData.kind``)."""


def row_index(index: Iterable[int] | slice | Tensor | None) -> slice | Tensor:
    """Rows to select: all for None, a slice or tensor as given, any other iterable as a Long tensor."""
    if index is None:
        return slice(None)
    if isinstance(index, (slice, Tensor)):
        return index
    return torch.as_tensor(list(index), dtype=torch.long)


@dataclass
class SyntheticTask:
    """The base of the synthetic tasks' containers: ``n`` examples of one task, their text (``T``
    positions) and their ground truth; subclasses add the other modality's fields.

    Attributes:
        name, kind: the task and its kind of dependence; ``rule``: the label rule in words.
        depends_on: the modalities whose content determines the label.
        input_ids: Long[n, T], ids into ``vocab``, 0 at padding; attention_mask: Long[n, T], 1 = word.
        labels: Long[n], indices into ``class_names``.
        text_attrs: the generating attributes of the texts, each Long[n] (empty when none).
        text_key: Bool[n, T], the position of the attribute word.
        seed: the generator's seed.
    """

    INPUTS: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask")
    """The model inputs :meth:`batch` returns, in order."""
    SHARED: ClassVar[tuple[str, ...]] = ()
    """Tensor fields without an example axis (e.g. the whole graph): never row-selected."""
    MODALITIES: ClassVar[tuple[str, ...]] = ("text",)
    """Modalities with a ``<modality>_attrs`` field."""

    name: str
    kind: str
    depends_on: frozenset[str]
    rule: str
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    class_names: tuple[str, ...]
    vocab: tuple[str, ...]
    text_attrs: dict[str, Tensor]
    text_key: Tensor
    seed: int

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def batch(self, index: Iterable[int] | slice | Tensor | None = None) -> dict[str, Tensor]:
        """Model inputs (:attr:`INPUTS`) of the rows ``index`` (all rows when None), as the task's
        model and ``mmlens.wrap`` take them; :attr:`SHARED` inputs come whole with every batch."""
        rows = row_index(index)
        return {k: getattr(self, k) if k in self.SHARED else getattr(self, k)[rows] for k in self.INPUTS}

    def subset(self, index: Iterable[int] | slice | Tensor) -> SyntheticTask:
        """The same task restricted to the example rows ``index``."""
        rows = row_index(index)
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor) and f.name not in self.SHARED:
                value = value[rows]
            elif isinstance(value, dict):
                value = {k: v[rows] for k, v in value.items()}
            values[f.name] = value
        return type(self)(**values)

    def text(self, row: int) -> str:
        """The words of row ``row`` without padding."""
        ids = self.input_ids[row][self.attention_mask[row].bool()]
        return " ".join(self.vocab[i] for i in ids.tolist())

    def key_positions(self, row: int) -> dict[str, Tensor | None]:
        """The position-level truth of example ``row``: per modality, Bool[n_m] over that modality's
        elements in the order a model places them (text: the words, padding dropped), True where
        the label depends on the element; ``None``: every element (graph tokens, which encode the
        target's whole neighbourhood); an empty Bool[0]: none. A modality outside ``depends_on`` has
        no key element (a shortcut's salient but irrelevant shape is not key)."""
        out: dict[str, Tensor | None] = {}
        for modality in self.MODALITIES:
            key = self.text_key[row][self.attention_mask[row].bool()] if modality == "text" else None
            key = self.element_key(modality, row) if modality != "text" else key
            if modality not in self.depends_on:
                key = torch.zeros(0, dtype=torch.bool) if key is None else torch.zeros_like(key)
            out[modality] = key
        return out

    def element_key(self, modality: str, row: int) -> Tensor | None:
        """Bool[n_m]: the key elements of a non-text ``modality`` in ``row`` (None: all of them)."""
        return None

    def attrs(self, modality: str) -> dict[str, Tensor]:
        """The generating attributes of ``modality`` (one of :attr:`MODALITIES`), each Long[n]."""
        if modality not in self.MODALITIES:
            raise KeyError(f"{type(self).__name__} has no modality {modality!r}; modalities: {self.MODALITIES}")
        return getattr(self, f"{modality}_attrs")


@dataclass
class TaskData(SyntheticTask):
    """An image + text task. ``P`` = 16 patches of :data:`PATCH_SIZE` pixels in row-major order;
    ``kind`` is one of :data:`TASK_KINDS`; modalities "image" and "text".

    Attributes:
        pixel_values: Float[n, 3, 16, 16], values in [0, 1].
        image_attrs: "shape" (index into :data:`SHAPES`), "color" (into :data:`COLORS`): Long[n], -1
            where the image has no shape.
        text_attrs: "color": the colour word of each text (index into :data:`COLORS`).
        image_key: Bool[n, P], the patches the shape touches.
    """

    INPUTS: ClassVar[tuple[str, ...]] = ("pixel_values", "input_ids", "attention_mask")
    MODALITIES: ClassVar[tuple[str, ...]] = ("image", "text")

    pixel_values: Tensor
    image_attrs: dict[str, Tensor]
    image_key: Tensor

    def element_key(self, modality: str, row: int) -> Tensor | None:
        """Bool[P]: the patches the shape touches (row-major, as the patch tokens are ordered)."""
        return self.image_key[row] if modality == "image" else None


Task = TypeVar("Task", bound=SyntheticTask)


def texts(
    rng: np.random.Generator, key_word: np.ndarray | None, n: int, filler_ids: np.ndarray, length: int, min_words: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Sentences of ``min_words``..``length`` words drawn from ``filler_ids``, with word id
    ``key_word[i]`` (Long[n]) at a random position when given -> input_ids, attention_mask
    Long[n, length] (padded at the end with 0), key Bool[n, length]."""
    words_per_text = rng.integers(min_words, length + 1, n)
    ids = np.zeros((n, length), dtype=np.int64)
    words = rng.choice(filler_ids, (n, length))
    valid = np.arange(length)[None] < words_per_text[:, None]
    ids[valid] = words[valid]
    key = np.zeros((n, length), dtype=bool)
    if key_word is not None:
        position = rng.integers(0, words_per_text)
        ids[np.arange(n), position] = key_word
        key[np.arange(n), position] = True
    return torch.from_numpy(ids), torch.from_numpy(valid.astype(np.int64)), torch.from_numpy(key)


# --- rendering ---------------------------------------------------------------------------------------


def _scenes(rng: np.random.Generator, shape: np.ndarray, color: np.ndarray) -> tuple[Tensor, Tensor]:
    """Images of one shape each (``shape`` / ``color`` Long[n]; -1: no shape) -> pixel_values
    Float[n, 3, 16, 16] in [0, 1] and the touched patches Bool[n, P].

    Background: a dark per-image tone in [0, 0.15]^3 plus N(0, 0.05) pixel noise. Shapes have a size
    r in [3, 4] px, a centre anywhere they fit, the colour at brightness 0.8..1.
    """
    n, s = len(shape), IMAGE_SIZE
    r = rng.uniform(3.0, 4.0, n)[:, None, None]
    cy, cx = (rng.uniform(r[:, 0, 0], s - r[:, 0, 0])[:, None, None] for _ in range(2))
    grid = np.arange(s) + 0.5
    dy, dx = grid[None, :, None] - cy, grid[None, None, :] - cx
    arm = 0.35 * r
    masks = np.stack(
        [
            dx**2 + dy**2 <= r**2,  # circle
            np.maximum(abs(dx), abs(dy)) <= 0.85 * r,  # square of about the circle's area
            (abs(dy) <= r) & (abs(dx) <= (dy + r) / 2),  # triangle, apex up
            ((abs(dx) <= arm) & (abs(dy) <= r)) | ((abs(dy) <= arm) & (abs(dx) <= r)),  # cross
        ]
    )
    mask = masks[np.maximum(shape, 0), np.arange(n)] & (shape >= 0)[:, None, None]  # [n, s, s]
    background = rng.uniform(0, 0.15, (n, 3, 1, 1))
    paint = _RGB[np.maximum(color, 0)][:, :, None, None] * rng.uniform(0.8, 1.0, (n, 1, 1, 1))
    pixels = np.where(mask[:, None], paint, background) + rng.normal(0, 0.05, (n, 3, s, s))
    p = PATCH_SIZE
    key = mask.reshape(n, s // p, p, s // p, p).any(axis=(2, 4)).reshape(n, -1)
    return torch.tensor(pixels.clip(0, 1), dtype=torch.float32), torch.from_numpy(key)


def _task(
    name: str,
    kind: str,
    depends_on: set[str],
    rule: str,
    rng: np.random.Generator,
    seed: int,
    labels: np.ndarray,
    class_names: tuple[str, ...],
    image: dict[str, np.ndarray],
    text: dict[str, np.ndarray],
    key_word: np.ndarray | None,
) -> TaskData:
    pixels, image_key = _scenes(rng, image["shape"], image["color"])
    ids, mask, text_key = texts(rng, key_word, len(labels), _FILLER_IDS, TEXT_LEN, 4)
    return TaskData(
        name=name,
        kind=kind,
        depends_on=frozenset(depends_on),
        rule=rule,
        pixel_values=pixels,
        input_ids=ids,
        attention_mask=mask,
        labels=torch.from_numpy(labels),
        class_names=class_names,
        vocab=VOCAB,
        image_attrs={k: torch.from_numpy(v) for k, v in image.items()},
        text_attrs={k: torch.from_numpy(v) for k, v in text.items()},
        image_key=image_key,
        text_key=text_key,
        seed=seed,
    )


def _color_words(color: np.ndarray) -> np.ndarray:
    return np.array([WORD_ID[c] for c in COLORS])[color]


# --- the tasks ---------------------------------------------------------------------------------------


def image_only(n: int, seed: int) -> TaskData:
    """Label: the shape's colour (4 classes); any of 4 shapes; the text is filler words."""
    rng = np.random.default_rng(seed)
    color, shape = rng.integers(0, 4, n), rng.integers(0, 4, n)
    return _task(
        "image_only",
        "image_only",
        {"image"},
        "label = colour of the shape in the image",
        rng,
        seed,
        color,
        COLORS,
        {"shape": shape, "color": color},
        {},
        None,
    )


def text_only(n: int, seed: int) -> TaskData:
    """Label: the colour word in the text (4 classes); the image is background noise with no shape."""
    rng = np.random.default_rng(seed)
    word = rng.integers(0, 4, n)
    none = np.full(n, -1)
    return _task(
        "text_only",
        "text_only",
        {"text"},
        "label = colour word in the text",
        rng,
        seed,
        word,
        COLORS,
        {"shape": none, "color": none},
        {"color": word},
        _color_words(word),
    )


def shortcut(n: int, seed: int) -> TaskData:
    """Label: the colour word in the text (4 classes); the image shows a coloured shape whose colour
    is independent of the label, so it looks relevant but carries no label information."""
    rng = np.random.default_rng(seed)
    word, color, shape = rng.integers(0, 4, n), rng.integers(0, 4, n), rng.integers(0, 4, n)
    return _task(
        "shortcut",
        "shortcut",
        {"text"},
        "label = colour word in the text (the shape's colour is random)",
        rng,
        seed,
        word,
        COLORS,
        {"shape": shape, "color": color},
        {"color": word},
        _color_words(word),
    )


def redundant(n: int, seed: int) -> TaskData:
    """Label: the shape's colour, which the colour word in the text repeats (4 classes)."""
    rng = np.random.default_rng(seed)
    color, shape = rng.integers(0, 4, n), rng.integers(0, 4, n)
    return _task(
        "redundant",
        "redundant",
        {"image", "text"},
        "label = colour of the shape = colour word in the text",
        rng,
        seed,
        color,
        COLORS,
        {"shape": shape, "color": color},
        {"color": color},
        _color_words(color),
    )


def synergistic(n: int, seed: int) -> TaskData:
    """Label: 1 ("yes") iff the shape's colour (red or blue; any of 4 shapes) is the colour the text
    names (red or blue): ``label = 1 - (colour XOR word)``; each alone is independent of it."""
    rng = np.random.default_rng(seed)
    pair = np.array([COLORS.index("red"), COLORS.index("blue")])
    color, word, shape = pair[rng.integers(0, 2, n)], pair[rng.integers(0, 2, n)], rng.integers(0, 4, n)
    return _task(
        "synergistic",
        "synergistic",
        {"image", "text"},
        "label = yes iff the shape's colour (red/blue) is the colour word in the text (red/blue)",
        rng,
        seed,
        (color == word).astype(np.int64),
        ("no", "yes"),
        {"shape": shape, "color": color},
        {"color": word},
        _color_words(word),
    )


TASKS: dict[str, Callable[[int, int], TaskData]] = {
    "image_only": image_only,
    "text_only": text_only,
    "shortcut": shortcut,
    "redundant": redundant,
    "synergistic": synergistic,
}
"""Task name -> generator ``(n, seed) -> TaskData``."""


def generate(generators: Mapping[str, Callable[[int, int], Task]], name: str, n: int, seed: int, what: str) -> Task:
    """``generators[name](n, seed)``, after checking ``n >= 1`` and that ``name`` (a ``what``, for
    the error message, which suggests near names) is known."""
    if name not in generators:
        near = nearest_names(name, generators, n=3, cutoff=0.3, fallback=False)
        raise ValueError(f"unknown {what} {name!r}; did you mean {near}? Tasks: {sorted(generators)}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return generators[name](n, seed)


def make_task(name: str, n: int, seed: int = 0) -> TaskData:
    """``n`` examples of task ``name`` (a key of :data:`TASKS`), a function of ``(name, n, seed)`` only."""
    return generate(TASKS, name, n, seed, "synthetic task")


def truth_mask(keys: Mapping[str, Tensor | None], masks: Mapping[str, Tensor]) -> Tensor:
    """Bool[seq]: the position-level truth of one example on the fused sequence. ``keys`` (from
    :meth:`SyntheticTask.key_positions`) per modality, Bool[n_m] or None (all); ``masks`` the
    modality spans of that example's row, Bool[seq] per modality (``spans.masks[m][row]``), whose
    True positions hold the modality's elements in order."""
    out: Tensor | None = None
    for modality, key in keys.items():
        if modality not in masks:
            raise ValueError(f"truth names modality {modality!r}, the spans have {sorted(masks)}; check the model")
        mask = masks[modality].bool().cpu()
        out = torch.zeros_like(mask) if out is None else out
        positions = mask.nonzero()[:, 0]
        if key is None or key.numel() == 0:
            out[positions] = key is None
            continue
        if len(key) != len(positions):
            raise ValueError(
                f"{modality} truth has {len(key)} elements, the spans {len(positions)} positions; the model "
                "must place one token per element (patch, word) in order"
            )
        out[positions] = key.bool().cpu()
    if out is None:
        raise ValueError("keys is empty; give at least one modality's truth")
    return out


def bayes_accuracy(task: SyntheticTask, modality: str) -> float:
    """Accuracy of the best predictor of the label from one modality's generating attributes
    (``task.attrs(modality)``; majority label per combination of values, in-sample): what that
    modality alone can tell about the label. Chance is the majority-class rate."""
    attrs = task.attrs(modality)
    keys = torch.stack([torch.zeros_like(task.labels), *attrs.values()], dim=1)
    _, group = torch.unique(keys, dim=0, return_inverse=True)
    counts = torch.zeros(int(group.max()) + 1, task.n_classes, dtype=torch.long)
    counts.index_put_((group, task.labels), torch.ones_like(task.labels), accumulate=True)
    return int(counts.max(1).values.sum()) / len(task)


__all__ = [
    "COLORS",
    "FILLERS",
    "IMAGE_SIZE",
    "PATCH_SIZE",
    "RGB",
    "SHAPES",
    "TASKS",
    "TASK_KINDS",
    "TEXT_LEN",
    "VOCAB",
    "WORD_ID",
    "SyntheticTask",
    "TaskData",
    "bayes_accuracy",
    "generate",
    "image_only",
    "make_task",
    "redundant",
    "row_index",
    "shortcut",
    "synergistic",
    "text_only",
    "texts",
    "truth_mask",
]
