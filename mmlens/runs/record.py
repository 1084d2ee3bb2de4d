"""The one resumable record: what a run (``mmlens patch``, ``mmlens evaluate``, the synthetic
benchmark) has finished, so that a rerun continues instead of starting again.

A record is a JSON-lines file. Its first line is a header that says which computation it holds:
``kind``, the ``config_hash`` (:func:`mmlens.store.config_hash`) of the configuration that
identifies the result, library ``versions`` and the ``config`` itself; every further line is one
finished entry, a dict with a unique ``key``. Each change rewrites the file through
:func:`mmlens.store.atomic_write`, so a run killed at any moment leaves the record as of its last
finished entry. A record of another configuration is never continued (:meth:`Record.continuing`
raises :class:`ResumeError` naming the fields that changed).

>>> record = Record.continuing(path, config) or Record.create(path, "my-run", config)   # doctest: +SKIP
>>> entry = record.get_or_add("part1", lambda: {"value": compute()})
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mmlens.store import atomic_write, canonical, config_hash, versions

RECORD_VERSION = 1


class ResumeError(ValueError):
    """The output folder holds a run of a different config (or an unreadable record)."""


class Record:
    """The finished entries of one run, in the order they finished (see the module docstring)."""

    def __init__(self, path: str | Path, header: dict[str, Any], entries: list[dict[str, Any]]):
        self.path, self.header, self.entries = Path(path), header, entries
        self._by_key = {entry["key"]: entry for entry in entries}

    @classmethod
    def create(cls, path: str | Path, kind: str, config: Any, **extra: Any) -> Record:
        """A new, empty record at ``path`` (replacing any there) of the computation that ``config``
        identifies; ``extra`` fields go into the header."""
        header = {
            "kind": kind,
            "version": RECORD_VERSION,
            "config_hash": config_hash(config),
            **extra,
            "versions": versions(),
            "config": canonical(config),
        }
        record = cls(path, header, [])
        record.write()
        return record

    @classmethod
    def read(cls, path: str | Path) -> Record | None:
        """The record at ``path``; None when there is none, ResumeError when it is unreadable."""
        path = Path(path)
        if not path.is_file():
            return None
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        try:
            return cls(path, json.loads(lines[0]), [json.loads(line) for line in lines[1:]])
        except (IndexError, KeyError, json.JSONDecodeError) as err:
            raise ResumeError(f"{path} is unreadable ({err!r}); pass --overwrite to start again") from None

    @classmethod
    def continuing(cls, path: str | Path, config: Any, *, overwrite: bool = False) -> Record | None:
        """The record at ``path`` when it holds the run of ``config`` (to continue it); None when there
        is none, or with ``overwrite``; ResumeError when it holds another configuration's run."""
        record = None if overwrite else cls.read(path)
        if record is None or record.header.get("config_hash") == config_hash(config):
            return record
        changed = config_changes(record.header.get("config", {}), canonical(config))
        raise ResumeError(
            f"{Path(path).parent} holds a run of a different config (hash {record.header.get('config_hash')}, this "
            f"config {config_hash(config)}; changed: {', '.join(changed) or 'unknown'}); runs are never mixed. Use "
            "another output folder (--out), or --overwrite to delete that run"
        )

    @property
    def keys(self) -> list[str]:
        """The keys of the finished entries, in the order they finished."""
        return list(self._by_key)

    def get(self, key: str) -> dict[str, Any] | None:
        """The finished entry ``key``, or None."""
        return self._by_key.get(key)

    def add(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """Record a finished entry (a dict with a new ``key``) and write the record."""
        entry = dict(entry)
        if entry["key"] in self._by_key:
            raise ValueError(f"{self.path} already holds an entry {entry['key']!r}")
        self.entries.append(entry)
        self._by_key[entry["key"]] = entry
        self.write()
        return entry

    def get_or_add(
        self, key: str, compute: Callable[[], Mapping[str, Any]], seconds: dict[str, float] | None = None
    ) -> dict[str, Any]:
        """The entry ``key``: the finished one, else ``compute()``'s, added under ``key``; the time
        ``compute`` took goes to ``seconds[key]``."""
        found = self.get(key)
        if found is not None:
            return found
        start = time.perf_counter()
        entry = compute()
        if seconds is not None:
            seconds[key] = time.perf_counter() - start
        return self.add({"key": key, **entry})

    def write(self) -> None:
        """Write the header and every entry (atomically)."""
        lines = [json.dumps(line, default=_plain) for line in (self.header, *self.entries)]
        atomic_write(self.path, "\n".join(lines) + "\n")


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted paths of the fields that differ between two configurations."""
    out = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(old.get(key), Mapping) and isinstance(new.get(key), Mapping):
            out += config_changes(old[key], new[key], path)
        elif old.get(key) != new.get(key):
            out.append(path)
    return out


def _plain(value: Any) -> Any:
    """numpy and torch scalars as Python numbers (``json.dumps``'s ``default``)."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot record a {type(value).__name__}: {value!r}")
