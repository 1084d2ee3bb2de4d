"""Inputs: data paths, the model registry (:mod:`.loading`), text-attributed graphs, synthetic tasks."""
