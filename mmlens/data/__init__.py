"""Inputs: data paths, the model registry (:mod:`.loading`), text-attributed graphs, synthetic tasks.

Importing the package registers the registry entries that live in their own modules (tiny random
models of the audio-language, Qwen/Gemma and automatic-adapter classes)."""

from mmlens.data import (
    tiny_audio,  # noqa: F401 - registers the audio-language and tri-modal tiny models
    tiny_auto,  # noqa: F401 - registers tiny models of classes wrapped by automatic adapters
    tiny_qwen_gemma,  # noqa: F401 - registers tiny-random-qwen2-vl, -qwen2.5-vl, -gemma3
)
