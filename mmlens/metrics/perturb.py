"""Small meaning-preserving perturbations of one modality, for the stability desideratum.

Stability is a Lipschitz ratio ``||E(x) - E(x')|| / ||x - x'||`` between explanations compared
position by position, so every perturbation here keeps the input's layout: the same sequence
length and the same modality spans (checked for every returned input). Only the perturbed
modality's inputs change; every other input is the same tensor object.

Which input of a modality a kind changes, and that input's layout, are the adapter's facts: each
adapter table declares ``perturbations`` (modality -> kind -> :data:`Prepare`), built from the
tensor primitives here by :func:`token_perturbations`, :func:`image_perturbations` and
:func:`graph_perturbations` and :func:`audio_perturbations`; :func:`perturb` dispatches through ``hooked.adapter``.

Kinds (the built-in ones per modality in ``PERTURBATIONS``; the strength ``scale`` of each, with
its default in ``DEFAULT_SCALE``):

- text (token ids, text positions only; needs the tokenizer):
  ``synonym_swap`` (``scale`` words per row, each replaced by a word of its group in the shipped
  list ``mmlens/data/synonyms.json``) and ``punctuation_edit`` (``scale`` tokens per row:
  ``.`` <-> ``!``, ``,`` <-> ``;``). A token is swapped only for a single token of the same
  whitespace form (``"▁big"`` -> ``"▁large"``, ``"big▁"`` -> ``"large▁"``, ``"Ġbig"`` ->
  ``"Ġlarge"``), and a word only where it is a whole word. The new ids need not be the tokenizer's
  own encoding of the new text (which may merge differently); the model reads them as given.
  There is no whitespace edit: BPE tokenizers fold spaces into the neighbouring tokens, so adding
  or removing one changes the token count (and a space token's merge partner), which breaks the
  layout.
- image (images of any leading shape ``[..., C, H, W]``): ``shift`` (by up to ``scale``
  pixels in x and y, edges replicated), ``brightness`` (a constant offset per image, uniform in
  ``[-scale, scale]`` times the image's pixel std), ``gaussian_noise`` (sigma = ``scale`` times
  the image's pixel std). Images of zero std (e.g. all-zero padding images) stay unchanged.
- audio (Whisper log-mel features ``[items, mel, frames]``, as Qwen2-Audio, Voxtral and Qwen2.5-Omni
  take them; the waveform is not an input, so each kind is the waveform edit carried into the
  extractor's log-mel): ``gain`` (uniform in ``[-scale, scale]`` dB per audio: ``dB / 40`` added
  above the silence floor), ``audio_noise`` (Gaussian on the log-mel of the real frames, sigma =
  ``scale`` times their std, clamped at the extractor's floor), ``time_shift`` (by up to ``scale``
  frames of 10 ms inside the real frames, vacated frames filled with the extractor's value for zero
  samples). The audio keeps its length, so its token count and the spans stay.
- graph: ``drop_edges`` (a fraction ``scale`` of the node pairs of the ``[2, E]`` edge list, at
  least one; both directions of a pair go together), ``feature_noise`` (sigma = ``scale`` times
  the std of all entries of the ``[n_nodes, d]`` node features), ``embedding_noise`` on node
  representations ``[b, d]`` given directly (sigma = ``scale`` times each row's std).

:func:`input_distance` measures every modality in one space: the LM's input embeddings
(``fusion.embeds``, else ``lm.embed``) at that modality's positions.

>>> variants = perturb(hm, inputs, "image", n=8)
>>> input_distance(hm, inputs, variants[0].inputs, "image")   # Float[b]
"""

from __future__ import annotations

import json
import weakref
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from importlib import resources
from typing import Any

import torch
from torch import Tensor

from mmlens.core.spans import ModalitySpans
from mmlens.core.wrapper import HookedModel
from mmlens.methods.setups import embedding_point

__all__ = [
    "DEFAULT_SCALE",
    "PERTURBATIONS",
    "PUNCTUATION",
    "WHISPER_FLOOR",
    "WHISPER_RANGE",
    "CannotPerturb",
    "Draw",
    "Perturbed",
    "Prepare",
    "audio_gain",
    "audio_noise",
    "audio_perturbations",
    "audio_time_shift",
    "brightness",
    "drop_edges",
    "embedding_noise",
    "feature_noise",
    "gaussian_noise",
    "graph_perturbations",
    "image_perturbations",
    "input_distance",
    "perturb",
    "punctuation_edit",
    "relative_input_change",
    "shift",
    "synonym_groups",
    "synonym_swap",
    "token_perturbations",
]

PERTURBATIONS: dict[str, list[str]] = {
    "text": ["synonym_swap", "punctuation_edit"],
    "image": ["shift", "brightness", "gaussian_noise"],
    "graph": ["drop_edges", "feature_noise", "embedding_noise"],
    "audio": ["gain", "audio_noise", "time_shift"],
}
"""Modality -> the built-in perturbation kinds (what the shipped adapters declare); ``perturb(kind=None)``
tries every kind the model's adapter declares for the modality."""

DEFAULT_SCALE: dict[str, float] = {
    "synonym_swap": 1,
    "punctuation_edit": 1,
    "shift": 1,
    "brightness": 0.1,
    "gaussian_noise": 0.05,
    "drop_edges": 0.05,
    "feature_noise": 0.05,
    "embedding_noise": 0.05,
    "gain": 3.0,
    "audio_noise": 0.05,
    "time_shift": 5,
}
"""Kind -> default ``scale``: a count (words, tokens, pixels), a fraction of edges, or a sigma in stds."""

_COUNTS = ("synonym_swap", "punctuation_edit", "shift", "time_shift")

PUNCTUATION: dict[str, list[str]] = {".": ["!"], "!": ["."], ",": [";"], ";": [","]}
"""Punctuation token -> its near-equivalent replacements."""

_SPACE = "▁Ġ "  # whitespace markers of SentencePiece, byte-level BPE, and plain vocabularies
_BREAK = _SPACE + "Ċ\n\t"


@dataclass
class Perturbed:
    """One perturbed copy of the inputs.

    Attributes:
        inputs: the model inputs, same batch size and layout as the original.
        modality: the perturbed modality; ``kind``: the perturbation kind.
        description: what was changed (positions and words, offsets, edges dropped, sigma).
    """

    inputs: dict
    modality: str
    kind: str
    description: str


class CannotPerturb(Exception):
    """Raised by a :data:`Prepare` when its kind cannot change these inputs; the message says why."""


# -- text --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def synonym_groups() -> list[list[str]]:
    """The shipped synonym groups (``mmlens/data/synonyms.json``): lists of lowercase words."""
    text = resources.files("mmlens").joinpath("data/synonyms.json").read_text(encoding="utf-8")
    return json.loads(text)["groups"]


def _synonym_table() -> dict[str, list[str]]:
    return {word: [w for w in group if w != word] for group in synonym_groups() for word in group}


def _split(token: str) -> tuple[str, str, str]:
    """A token string -> (leading whitespace markers, core, trailing whitespace markers)."""
    core = token.lstrip(_SPACE)
    prefix = token[: len(token) - len(core)]
    stripped = core.rstrip(_SPACE)
    return prefix, stripped, core[len(stripped) :]


def _case_like(core: str, word: str) -> str | None:
    """``word`` in the case of ``core`` (lower, Title or UPPER); None for mixed case."""
    if not core.isalpha() or core.islower():
        return word
    if core.isupper() and len(core) > 1:
        return word.upper()
    if core[0].isupper() and core[1:].islower():
        return word.capitalize()
    return None


def _breaks(char: str) -> bool:
    """Whether a neighbour token's adjacent character ends a word."""
    return char == "" or char in _BREAK or not char.isalnum()


def _whole_word(tokens: list[str], text: list[bool], p: int) -> bool:
    """Whether token ``p`` is a whole word: whitespace, punctuation or a non-text position on both sides."""
    prefix, _, suffix = _split(tokens[p])
    before = bool(prefix) or p == 0 or not text[p - 1] or _breaks(tokens[p - 1][-1:])
    after = bool(suffix) or p + 1 == len(tokens) or not text[p + 1] or _breaks(tokens[p + 1][:1])
    return before and after


def _not_in_number(tokens: list[str], text: list[bool], p: int) -> bool:
    """Whether punctuation token ``p`` is not between two digits (``3.5``, ``1,000``)."""
    digit_before = p > 0 and text[p - 1] and tokens[p - 1][-1:].isdigit()
    digit_after = p + 1 < len(tokens) and text[p + 1] and tokens[p + 1][:1].isdigit()
    return not (digit_before and digit_after)


_VOCABULARIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vocabulary(tokenizer: Any) -> dict[str, int]:
    """``tokenizer.get_vocab()`` (token -> id), kept per tokenizer while its size is unchanged: building
    it takes ~65 ms for a 49k vocabulary, once per perturbed input otherwise."""
    try:
        size = len(tokenizer)
        cached = _VOCABULARIES.get(tokenizer)
        if cached is None or cached[0] != size:
            cached = _VOCABULARIES[tokenizer] = (size, tokenizer.get_vocab())
    except TypeError:  # no size, or not weakly referable: not kept
        return tokenizer.get_vocab()
    return cached[1]


def _swap_candidates(
    token_ids: Tensor,
    where: Tensor,
    tokenizer: Any,
    table: Mapping[str, list[str]],
    fits: Callable[[list[str], list[bool], int], bool],
) -> list[list[tuple[int, list[int]]]]:
    """Per row, the positions that can be swapped and the single-token replacements of each."""
    vocab = _vocabulary(tokenizer)
    special = set(tokenizer.all_special_ids)
    rows = []
    for ids, text in zip(token_ids.tolist(), where.tolist()):
        tokens = tokenizer.convert_ids_to_tokens(ids)
        forbidden = special | {i for i, t in zip(ids, text) if not t}  # never create a placeholder id
        row = []
        for p, (tok_id, token) in enumerate(zip(ids, tokens)):
            if not text[p] or tok_id in special:
                continue
            prefix, core, suffix = _split(token)
            words = table.get(core.lower(), [])
            if not words or not fits(tokens, text, p):
                continue
            forms = [_case_like(core, w) for w in words]
            options = [vocab.get(f"{prefix}{f}{suffix}") for f in forms if f is not None]
            options = [o for o in options if o is not None and o not in forbidden]
            if options:
                row.append((p, options))
        rows.append(row)
    return rows


def _swap(
    token_ids: Tensor, candidates: list[list[tuple[int, list[int]]]], count: int, generator: torch.Generator
) -> tuple[Tensor, list[list[tuple[int, int, int]]]]:
    """Swap up to ``count`` candidate positions per row: (new ids, per row [(position, old id, new id)])."""
    new = token_ids.clone()
    done = []
    for r, row in enumerate(candidates):
        picks = sorted(torch.randperm(len(row), generator=generator)[:count].tolist())
        swaps = []
        for j in picks:
            p, options = row[j]
            choice = options[int(torch.randint(len(options), (1,), generator=generator))]
            swaps.append((p, int(token_ids[r, p]), choice))
            new[r, p] = choice
        done.append(swaps)
    return new, done


def synonym_swap(
    token_ids: Tensor, where: Tensor, tokenizer: Any, *, words: int = 1, generator: torch.Generator | None = None
) -> tuple[Tensor, list[list[tuple[int, int, int]]]]:
    """Replace up to ``words`` whole words per row by a synonym of the same token form.

    Args:
        token_ids: Long[b, seq]; where: Bool[b, seq], the positions that may change (the text span).
        tokenizer: the model's tokenizer (``get_vocab``, ``convert_ids_to_tokens``).

    Returns:
        (Long[b, seq] new ids, per row the swaps ``(position, old id, new id)``); rows with no
        listed word keep their ids.
    """
    if words < 1:
        raise ValueError(f"words must be at least 1, got {words}")
    candidates = _swap_candidates(token_ids.cpu(), where.cpu(), tokenizer, _synonym_table(), _whole_word)
    new, swaps = _swap(token_ids.cpu(), candidates, words, generator or torch.Generator())
    return new.to(token_ids.device), swaps


def punctuation_edit(
    token_ids: Tensor, where: Tensor, tokenizer: Any, *, edits: int = 1, generator: torch.Generator | None = None
) -> tuple[Tensor, list[list[tuple[int, int, int]]]]:
    """Replace up to ``edits`` punctuation tokens per row by a near-equivalent (:data:`PUNCTUATION`) of
    the same token form; as :func:`synonym_swap` otherwise. Punctuation between digits is kept."""
    if edits < 1:
        raise ValueError(f"edits must be at least 1, got {edits}")
    candidates = _swap_candidates(token_ids.cpu(), where.cpu(), tokenizer, PUNCTUATION, _not_in_number)
    new, swaps = _swap(token_ids.cpu(), candidates, edits, generator or torch.Generator())
    return new.to(token_ids.device), swaps


# -- image -------------------------------------------------------------------------------------------


def shift(images: Tensor, dx: int, dy: int) -> Tensor:
    """``images`` ``[..., C, H, W]`` moved ``dx`` pixels right and ``dy`` down; the vacated
    edge repeats the nearest edge row/column."""
    h, w = images.shape[-2:]
    if abs(dx) >= w or abs(dy) >= h:
        raise ValueError(f"shift ({dx}, {dy}) is not smaller than the image ({h}x{w})")
    rows = (torch.arange(h, device=images.device) - dy).clamp(0, h - 1)
    cols = (torch.arange(w, device=images.device) - dx).clamp(0, w - 1)
    return images.index_select(-2, rows).index_select(-1, cols)


def _image_std(images: Tensor) -> Tensor:
    """Each image's pixel std, shaped ``[..., 1, 1, 1]``."""
    return images.float().flatten(-3).std(-1)[..., None, None, None]


def brightness(images: Tensor, offset: Tensor | float) -> Tensor:
    """``images`` ``[..., C, H, W]`` plus ``offset`` (a float, or one per image ``[...]``)
    times each image's pixel std."""
    offset = torch.as_tensor(offset, dtype=torch.float32, device=images.device)
    shifted = images.float() + offset[..., None, None, None] * _image_std(images)
    return shifted.to(images.dtype)


def _noise(x: Tensor, sigma: Tensor, generator: torch.Generator | None) -> Tensor:
    noise = torch.randn(x.shape, generator=generator).to(x.device)
    return (x.float() + noise * sigma).to(x.dtype)


def gaussian_noise(images: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """``images`` ``[..., C, H, W]`` plus Gaussian noise of std ``sigma`` times each image's pixel std."""
    return _noise(images, sigma * _image_std(images), generator)


# -- audio (Whisper log-mel features) ----------------------------------------------------------------

WHISPER_FLOOR = -1.5
"""The scaled log-mel of silence in Whisper's feature extractor: ``(log10(1e-10) + 4) / 4``."""
WHISPER_RANGE = 2.0
"""The extractor's dynamic range after scaling: values are clamped below at ``max - 8`` (log10 units),
``max - 2`` once scaled by 1/4."""


def _audio_frames(features: Tensor, valid: Tensor | None) -> Tensor:
    """Bool[..., frames]: the frames of real audio (all of them when ``valid`` is None)."""
    if valid is None:
        return torch.ones(features.shape[:-2] + features.shape[-1:], dtype=torch.bool, device=features.device)
    return valid.to(features.device).bool()


def _zero_samples(features: Tensor) -> Tensor:
    """Each item's log-mel of zero samples ``[..., 1, 1]``: its max minus the dynamic range, at least the
    floor (what the extractor writes on frames of padding)."""
    top = features.float().flatten(-2).max(-1).values[..., None, None]
    return (top - WHISPER_RANGE).clamp(min=WHISPER_FLOOR)


def audio_gain(features: Tensor, gain_db: Tensor | float) -> Tensor:
    """Whisper log-mel ``[..., mel, frames]`` of the waveform scaled by ``gain_db`` decibels (one value,
    or one per item ``[...]``).

    Gain ``g`` multiplies the mel power by ``g^2``, i.e. adds ``log10(g^2) = gain_db / 10`` to the
    log10 mel and ``gain_db / 40`` after the extractor's scaling; the extractor's ``max - 8``
    clamp moves with the max, so frames of padding move too. Values at the silence floor
    (:data:`WHISPER_FLOOR`) stay there (scaled silence is silence) and no value falls below it.
    """
    step = torch.as_tensor(gain_db, dtype=torch.float32, device=features.device)[..., None, None] / 40
    moved = (features.float() + step).clamp(min=WHISPER_FLOOR)
    return torch.where(features > WHISPER_FLOOR, moved, features.float()).to(features.dtype)


def audio_time_shift(features: Tensor, frames: int, valid: Tensor | None = None) -> Tensor:
    """Whisper log-mel ``[..., mel, frames]`` of the waveform delayed by ``frames`` frames (10 ms each;
    advanced when negative) inside each item's real frames ``valid`` Bool[..., frames] (all when None).

    Frames moved past the end of the real audio are dropped, vacated frames get the extractor's
    value for zero samples (the item's max minus 2, at least the floor), padding frames are left as
    they are; so the audio keeps its length and its token count.
    """
    real = _audio_frames(features, valid)
    if not 0 <= abs(frames) < int(real.sum(-1).min()):
        raise ValueError(
            f"time shift {frames} is not shorter than the shortest audio ({int(real.sum(-1).min())} frames)"
        )
    n = features.shape[-1]
    t = torch.arange(n, device=features.device)
    length = real.long().sum(-1, keepdim=True)  # [..., 1]; real frames come first
    source = t - frames  # frame t of the delayed audio is frame t - frames of the original
    inside = (source >= 0) & (source < length) & real
    index = source.clamp(0, n - 1).expand(real.shape)[..., None, :].expand(features.shape)
    moved = torch.where(inside[..., None, :], features.gather(-1, index), _zero_samples(features).to(features.dtype))
    return torch.where(real[..., None, :], moved, features)


def audio_noise(
    features: Tensor, sigma: float, valid: Tensor | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Whisper log-mel ``[..., mel, frames]`` plus Gaussian noise on the real frames, of std ``sigma`` times
    the std of each item's real-frame values, clamped below at the item's extractor floor (its max
    minus 2), so the result stays in the range the extractor produces. Noise on the log-mel, not on the
    waveform (whose effect on a log-mel depends on the signal power in each bin)."""
    real = _audio_frames(features, valid)[..., None, :].expand(features.shape)
    values = features.float()
    count = real.flatten(-2).sum(-1).clamp(min=2)
    mean = (values * real).flatten(-2).sum(-1) / count
    var = ((values - mean[..., None, None]) ** 2 * real).flatten(-2).sum(-1) / (count - 1)
    noisy = _noise(values, sigma * var.sqrt()[..., None, None], generator).clamp(min=_zero_samples(features))
    return torch.where(real, noisy, values).to(features.dtype)


# -- graph -------------------------------------------------------------------------------------------


def drop_edges(edges: Tensor, fraction: float, generator: torch.Generator | None = None) -> Tensor:
    """An edge list ``[2, E]`` without a random ``fraction`` of its node pairs (at least one).

    Columns are grouped by unordered node pair, so an undirected graph stored in both directions
    loses both directions of a dropped edge (and duplicates go together). Returns ``[2, E' < E]``,
    the kept columns in their original order.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if edges.shape[1] == 0:
        raise ValueError("the edge list has no edges to drop")
    low, high = edges.min(0).values, edges.max(0).values
    pairs, group = torch.unique(low * (int(high.max()) + 1) + high, return_inverse=True)
    count = max(1, round(fraction * len(pairs)))
    dropped = torch.randperm(len(pairs), generator=generator)[:count].to(edges.device)
    return edges[:, ~torch.isin(group, dropped)]


def feature_noise(features: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """Node features ``[n_nodes, d]`` plus Gaussian noise of std ``sigma`` times the std of all entries."""
    return _noise(features, sigma * features.float().std(), generator)


def embedding_noise(embeds: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """Node representations ``[b, d]`` plus Gaussian noise of std ``sigma`` times each row's std."""
    return _noise(embeds, sigma * embeds.float().std(-1, keepdim=True), generator)


# -- the preparers an adapter declares ------------------------------------------------------------

Draw = Callable[[int], tuple[dict, str]]
"""Draw index -> (perturbed inputs, description)."""
Prepare = Callable[[HookedModel, dict, ModalitySpans, float, torch.Generator], Draw]
"""``(hooked, inputs, spans, scale, generator) -> draw``: one kind bound to its input key; raises
:class:`CannotPerturb` when the kind cannot change these inputs."""


def _core(tokenizer: Any, token_id: int) -> str:
    return _split(tokenizer.convert_ids_to_tokens(token_id))[1]


def _token_swaps(
    hooked: HookedModel,
    inputs: dict,
    spans: ModalitySpans,
    count: int,
    generator: torch.Generator,
    *,
    kind: str,
    key: str,
    modality: str,
) -> Draw:
    tokenizer = hooked.require_tokenizer("text perturbations")
    ids = inputs[key]
    table, fits = (_synonym_table(), _whole_word) if kind == "synonym_swap" else (PUNCTUATION, _not_in_number)
    candidates = _swap_candidates(ids.cpu(), spans.masks[modality].cpu(), tokenizer, table, fits)
    if not any(candidates):
        what = "word of the synonym list" if kind == "synonym_swap" else f"punctuation token {sorted(PUNCTUATION)}"
        raise CannotPerturb(f"no {what} in the {modality} span is a single token with a single-token replacement")

    def draw(i: int) -> tuple[dict, str]:
        new, swaps = _swap(ids.cpu(), candidates, count, generator)
        parts = [
            f"row {r}: "
            + ", ".join(f"{_core(tokenizer, old)!r}->{_core(tokenizer, rep)!r} at {p}" for p, old, rep in row)
            for r, row in enumerate(swaps)
            if row
        ]
        return {**inputs, key: new.to(ids.device)}, "; ".join(parts)

    return draw


def _shifts(
    hooked: HookedModel, inputs: dict, spans: ModalitySpans, scale: int, generator: torch.Generator, *, key: str
) -> Draw:
    offsets = [(dx, dy) for dx in range(-scale, scale + 1) for dy in range(-scale, scale + 1) if (dx, dy) != (0, 0)]
    order = torch.randperm(len(offsets), generator=generator).tolist()

    def draw(i: int) -> tuple[dict, str]:
        dx, dy = offsets[order[i % len(order)]]
        return {**inputs, key: shift(inputs[key], dx, dy)}, f"shift by dx={dx}, dy={dy} px"

    return draw


def _brightness(
    hooked: HookedModel, inputs: dict, spans: ModalitySpans, scale: float, generator: torch.Generator, *, key: str
) -> Draw:
    pixels = inputs[key]

    def draw(i: int) -> tuple[dict, str]:
        offset = (torch.rand(pixels.shape[:-3], generator=generator) * 2 - 1) * scale
        values = [round(v, 4) for v in offset.flatten().tolist()]
        return {**inputs, key: brightness(pixels, offset)}, f"brightness offset {values} x pixel std per image"

    return draw


def _noise_kind(key: str, fn: Callable[[Tensor, float, torch.Generator], Tensor], what: str) -> Prepare:
    def prepare(
        hooked: HookedModel, inputs: dict, spans: ModalitySpans, scale: float, generator: torch.Generator
    ) -> Draw:
        if key not in inputs:
            raise CannotPerturb(f"these inputs have no {key!r}")

        def draw(i: int) -> tuple[dict, str]:
            return {
                **inputs,
                key: fn(inputs[key], scale, generator),
            }, f"Gaussian noise on {key}, sigma = {scale} x {what}"

        return draw

    return prepare


def _drops(
    hooked: HookedModel, inputs: dict, spans: ModalitySpans, scale: float, generator: torch.Generator, *, key: str
) -> Draw:
    if key not in inputs:
        raise CannotPerturb(f"these inputs have no {key!r} (they give the node representations directly)")
    edges = inputs[key]
    if edges.shape[1] == 0:
        raise CannotPerturb(f"{key} has no edges")

    def draw(i: int) -> tuple[dict, str]:
        kept = drop_edges(edges, scale, generator)
        return {**inputs, key: kept}, f"dropped {edges.shape[1] - kept.shape[1]} of {edges.shape[1]} edges"

    return draw


def _gains(
    hooked: HookedModel, inputs: dict, spans: ModalitySpans, scale: float, generator: torch.Generator, *, key: str
) -> Draw:
    features = inputs[key]

    def draw(i: int) -> tuple[dict, str]:
        db = (torch.rand(features.shape[:-2], generator=generator) * 2 - 1) * scale
        values = [round(v, 2) for v in db.flatten().tolist()]
        return {**inputs, key: audio_gain(features, db)}, f"gain {values} dB per audio"

    return draw


def _time_shifts(
    hooked: HookedModel,
    inputs: dict,
    spans: ModalitySpans,
    scale: int,
    generator: torch.Generator,
    *,
    key: str,
    valid: str | None,
) -> Draw:
    offsets = [k for k in range(-scale, scale + 1) if k != 0]
    order = torch.randperm(len(offsets), generator=generator).tolist()
    mask = inputs.get(valid) if valid else None

    def draw(i: int) -> tuple[dict, str]:
        k = offsets[order[i % len(order)]]
        return {**inputs, key: audio_time_shift(inputs[key], k, mask)}, f"time shift by {k} frames ({10 * k} ms)"

    return draw


def _audio_noises(
    hooked: HookedModel,
    inputs: dict,
    spans: ModalitySpans,
    scale: float,
    generator: torch.Generator,
    *,
    key: str,
    valid: str | None,
) -> Draw:
    mask = inputs.get(valid) if valid else None

    def draw(i: int) -> tuple[dict, str]:
        noisy = audio_noise(inputs[key], scale, mask, generator)
        return {**inputs, key: noisy}, f"Gaussian noise on the log-mel, sigma = {scale} x its std"

    return draw


def token_perturbations(key: str, modality: str = "text") -> dict[str, Prepare]:
    """The text kinds (``synonym_swap``, ``punctuation_edit``) on the token ids ``Long[b, seq]`` at input
    ``key``, changing only the positions of span ``modality``."""
    return {
        kind: partial(_token_swaps, kind=kind, key=key, modality=modality)
        for kind in ("synonym_swap", "punctuation_edit")
    }


def image_perturbations(key: str) -> dict[str, Prepare]:
    """The image kinds (``shift``, ``brightness``, ``gaussian_noise``) on images ``[..., C, H, W]`` at
    input ``key`` (an adapter whose images have another layout declares its own preparers)."""
    return {
        "shift": partial(_shifts, key=key),
        "brightness": partial(_brightness, key=key),
        "gaussian_noise": _noise_kind(key, gaussian_noise, "each image's pixel std"),
    }


def audio_perturbations(key: str, valid: str | None = None) -> dict[str, Prepare]:
    """The audio kinds (``gain``, ``audio_noise``, ``time_shift``) on Whisper log-mel features
    ``[items, mel, frames]`` at input ``key``; ``valid`` names the frame mask ``[items, frames]`` of
    real audio when the model takes one (else every frame is audio). See :func:`audio_gain`,
    :func:`audio_noise`, :func:`audio_time_shift` for how each acts on the features."""
    return {
        "gain": partial(_gains, key=key),
        "audio_noise": partial(_audio_noises, key=key, valid=valid),
        "time_shift": partial(_time_shifts, key=key, valid=valid),
    }


def graph_perturbations(
    *, features: str | None = None, edges: str | None = None, embeds: str | None = None
) -> dict[str, Prepare]:
    """The graph kinds for the inputs a model has: ``drop_edges`` on the edge list ``Long[2, E]`` at
    ``edges``, ``feature_noise`` on the node features ``[n_nodes, d]`` at ``features``,
    ``embedding_noise`` on node representations ``[b, d]`` given directly at ``embeds``."""
    kinds: dict[str, Prepare] = {}
    if edges is not None:
        kinds["drop_edges"] = partial(_drops, key=edges)
    if features is not None:
        kinds["feature_noise"] = _noise_kind(features, feature_noise, "the std of all node features")
    if embeds is not None:
        kinds["embedding_noise"] = _noise_kind(embeds, embedding_noise, "each row's std")
    return kinds


# -- one entry point ---------------------------------------------------------------------------------


def _declared(hooked: HookedModel, modality: str) -> Mapping[str, Prepare]:
    """The kinds ``hooked``'s adapter declares for ``modality`` (kind -> preparer)."""
    declared = hooked.adapter.perturbations
    if modality not in declared:
        raise ValueError(
            f"adapter {hooked.adapter.name!r} declares no {modality} perturbations (it declares "
            f"{sorted(declared)}); add them to its table's perturbations"
        )
    return declared[modality]


def _kinds(hooked: HookedModel, modality: str, kind: str | Sequence[str] | None) -> list[str]:
    known = {**PERTURBATIONS, **{m: list(kinds) for m, kinds in hooked.adapter.perturbations.items()}}
    if modality not in known:
        raise ValueError(f"unknown modality {modality!r}; perturbations exist for {sorted(known)}")
    kinds = known[modality] if kind is None else [kind] if isinstance(kind, str) else list(kind)
    bad = [k for k in kinds if k not in known[modality]]
    if bad or not kinds:
        elsewhere = {k: m for k in bad for m in known if k in known[m]}
        hint = "".join(f" ({k!r} is for {m})" for k, m in elsewhere.items())
        raise ValueError(f"unknown {modality} perturbation kind(s) {bad}{hint}; {modality} kinds are {known[modality]}")
    return kinds


def _scale(kind: str, scale: float | Mapping[str, float] | None) -> float:
    value = scale.get(kind) if isinstance(scale, Mapping) else scale
    value = DEFAULT_SCALE.get(kind) if value is None else value
    if value is None:
        raise ValueError(f"{kind} has no default scale (it is not a built-in kind); pass scale={{{kind!r}: ...}}")
    if kind in _COUNTS and not (isinstance(value, int) and value >= 1):
        unit = {"shift": "pixels", "time_shift": "frames"}.get(kind, "tokens per row")
        raise ValueError(f"{kind}'s scale is a count of {unit}, an int >= 1; got {value!r}")
    if kind == "drop_edges" and not 0 < value <= 1:
        raise ValueError(f"drop_edges' scale is the fraction of edges to drop, in (0, 1]; got {value!r}")
    if not value > 0:
        raise ValueError(f"{kind}'s scale is a multiple of the input's std, > 0; got {value!r}")
    return value


def _check_modality(hooked: HookedModel, inputs: Mapping[str, Any], spans: ModalitySpans, modality: str) -> None:
    if modality not in spans.masks or not spans.masks[modality].any():
        raise ValueError(
            f"modality {modality!r} is not in these inputs; their modalities are "
            f"{[m for m in spans.modalities if spans.masks[m].any()]}"
        )
    keys = list(hooked.adapter.modality_inputs.get(modality, ()))
    if not any(key in inputs for key in keys):
        raise ValueError(
            f"these inputs have {modality} positions but none of its inputs {keys}; got keys {sorted(inputs)}"
        )


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return all(
        a[k] is b[k] or (isinstance(a[k], Tensor) and a[k].shape == b[k].shape and torch.equal(a[k], b[k])) for k in a
    )


def perturb(
    hooked: HookedModel,
    inputs: Mapping[str, Any],
    modality: str,
    kind: str | Sequence[str] | None = None,
    *,
    n: int = 8,
    scale: float | Mapping[str, float] | None = None,
    seed: int = 0,
) -> list[Perturbed]:
    """Up to ``n`` distinct perturbed copies of ``inputs`` per kind, changing only ``modality``.

    Args:
        hooked: the wrapped model (its spans define the layout; text kinds use its tokenizer).
        inputs: a batch of model inputs.
        modality: a modality the adapter declares perturbations for (``hooked.adapter.perturbations``;
            the built-in ones: ``"text"``, ``"image"``, ``"graph"``, see :data:`PERTURBATIONS`).
        kind: a kind of that modality, a list of them, or None for every kind the adapter declares.
        n: draws per kind; draws that leave the input unchanged or repeat an earlier one are left
            out, so a kind with few options (one synonym in the text) returns fewer.
        scale: each kind's strength (see :data:`DEFAULT_SCALE`): one number for every kind, or a
            dict kind -> number; defaults where missing.
        seed: each kind draws from its own generator seeded by (seed, kind), so results are
            reproducible and a smaller ``n`` gives a prefix of a larger ``n``'s draws.

    Returns:
        :class:`Perturbed` inputs with the input's batch size and layout. Rows the kind cannot
        change (a text row with no listed word) stay as they were (``input_distance`` 0 there).

    Raises:
        ValueError: unknown modality or kind, a modality absent from ``inputs``, a bad ``scale``,
            or no kind could change the input (the message gives each kind's reason).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    kinds = _kinds(hooked, modality, kind)
    if isinstance(scale, Mapping) and set(scale) - set(kinds):
        raise ValueError(f"scale given for kinds {sorted(set(scale) - set(kinds))} that are not perturbed here {kinds}")
    scales = {k: _scale(k, scale) for k in kinds}
    inputs = dict(inputs)
    spans = hooked.spans(inputs)
    _check_modality(hooked, inputs, spans, modality)
    prepare = _declared(hooked, modality)
    made: list[Perturbed] = []
    reasons: dict[str, str] = {}
    for k in kinds:
        generator = torch.Generator().manual_seed(zlib.crc32(f"{k}/{seed}".encode()))
        try:
            draw = prepare[k](hooked, inputs, spans, scales[k], generator)
        except CannotPerturb as why:
            reasons[k] = str(why)
            continue
        own: list[Perturbed] = []
        for i in range(n):
            new, description = draw(i)
            if _same(new, inputs) or any(_same(new, p.inputs) for p in own):
                continue
            if not hooked.spans(new).same_layout(spans):
                raise RuntimeError(
                    f"{k} changed the layout of the inputs (a bug in mmlens.metrics.perturb): {description}"
                )
            own.append(Perturbed(new, modality, k, f"{k}: {description}"))
        if not own:
            reasons[k] = (
                f"all {n} draws left the input unchanged (an input of zero std, or scale {scales[k]} too small)"
            )
        made += own
    if not made:
        why = "; ".join(f"{k}: {r}" for k, r in reasons.items())
        raise ValueError(f"no {modality} perturbation could be made with kinds {kinds}: {why}")
    return made


def input_distance(hooked: HookedModel, a: Mapping[str, Any], b: Mapping[str, Any], modality: str) -> Tensor:
    """Per row, the L2 distance between ``a`` and ``b`` in the LM's input embeddings at ``modality``'s positions.

    Every modality enters the LM as embeddings at its positions (``fusion.embeds`` on multimodal
    models, ``lm.embed`` on text LMs): token embeddings for text, projected image tokens, graph
    tokens. Measuring there gives text, image and graph perturbations a distance in one space,
    the denominator of the stability ratio. ``a`` and ``b`` must have the same layout.

    Args:
        modality: a modality of the spans (or any span selector, e.g. ``"all"``).

    Returns:
        Float[b]: ``sqrt(sum over the positions and width of (e_a - e_b)^2)``.
    """
    spans = hooked.spans(a)
    if not spans.same_layout(hooked.spans(b)):
        raise ValueError("a and b have different layouts (modality spans); distances compare position by position")
    mask = spans.mask(modality)
    point = embedding_point(hooked)
    ea, eb = (hooked.run(x, cache=point).cache[point].float() for x in (a, b))
    diff = torch.where(mask.to(ea.device)[..., None], ea - eb, 0.0)
    return diff.flatten(1).norm(dim=1)


def relative_input_change(hooked: HookedModel, a: Mapping[str, Any], b: Mapping[str, Any], modality: str) -> float:
    """How much ``modality``'s raw inputs changed from ``a`` to ``b`` (batch 1), relative to ``a``: the
    root sum of squares over the adapter's ``modality_inputs`` keys of ||a_k - b_k|| / ||a_k|| for
    float tensors, and of the fraction of entries that differ for integer ones (token ids, edge
    lists; a change of size counts as the fraction of entries added or removed)."""
    keys = hooked.adapter.modality_inputs.get(modality, ())
    if not keys:
        raise ValueError(
            f"adapter {hooked.adapter.name!r} declares no modality_inputs for {modality!r}; add them to the adapter table"
        )
    total = 0.0
    for key in keys:
        x, y = a.get(key), b.get(key)
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            continue
        if x.shape != y.shape:
            change = abs(x.numel() - y.numel()) / max(x.numel(), 1)
        elif x.is_floating_point():
            change = float((x.float() - y.float()).norm() / x.float().norm().clamp_min(1e-30))
        else:
            change = float((x != y).float().mean()) if x.numel() else 0.0
        total += change**2
    return total**0.5
