"""The commands: config loading and checking, the resumable record, ``mmlens patch`` and ``mmlens evaluate``."""
