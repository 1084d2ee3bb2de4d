"""Inputs: data paths, the model registry (:mod:`.loading`), text-attributed graphs, synthetic tasks."""

from mmlens.data import tiny_audio  # noqa: F401 - registers the audio-language and tri-modal tiny models
