"""Runnable experiments and benchmarks: ``python -m mmlens.analyses.NAME`` (installed as ``mmlens.analyses``)."""
