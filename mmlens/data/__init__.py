"""Inputs: data paths, the model registry (:mod:`.loading`), text-attributed graphs, synthetic tasks.

Importing the package registers the registry entries that live in their own modules
(:mod:`.tiny_auto`: tiny models of classes wrapped by automatic adapters)."""

from mmlens.data import tiny_auto  # noqa: F401  (registers its models with mmlens.data.loading.register)
