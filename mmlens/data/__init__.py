"""Inputs: data paths, the model registry (:mod:`.loading`), text-attributed graphs, synthetic tasks."""

from mmlens.data import (
    tiny_audio,  # noqa: F401 - registers the audio-language and tri-modal tiny models
    tiny_qwen_gemma,  # noqa: F401 - registers tiny-random-qwen2-vl, -qwen2.5-vl, -gemma3
)
