"""Files: the one atomic writer, the one hashing rule and the one artefact store.

Everything mmlens writes (records, results, figures, checkpoints, trained models) goes through
:func:`atomic_write` (or :func:`atomic_path` for libraries that write to a path themselves), so a
killed run leaves either the old file or the new one, never a partial one. Everything cached is
keyed by :func:`config_hash` of what identifies the result (model identity, inputs, method; never
an output folder) and lives in an :class:`ArtefactStore` folder named by that hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

HASH_DIGITS = 16


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask is process-wide


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` through a temporary file in the same folder,
    flushed to disk and renamed into place. Parent folders are created. Returns the path."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def write_json(path: str | Path, value: Any) -> Path:
    """Strict JSON (``NaN``/``Infinity`` raise), indented, written atomically."""
    return atomic_write(path, json.dumps(value, indent=1, allow_nan=False, default=_jsonable) + "\n")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block exits
    normally and removed when it raises. For writers that want a path (``save_file``, ``savefig``):
    keep ``path``'s suffix so the writer picks the right format."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}-", suffix=target.suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the mode a plain open() would
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot hash or write a {type(value).__name__} as JSON: {value!r}")


def canonical(value: Any) -> Any:
    """``value`` as plain JSON data: dataclasses become dicts, tuples lists, paths strings, so that
    equal configurations compare and hash equal however they were spelled."""
    return json.loads(json.dumps(value, sort_keys=True, default=_jsonable))


def config_hash(value: Any, digits: int = HASH_DIGITS) -> str:
    """The one hashing rule: sha256 of the canonical JSON of ``value``, ``digits`` hex digits.

    Pass what identifies a result (model identity, inputs, method and their options), never an
    output folder: the same computation written to two folders has one hash."""
    blob = json.dumps(canonical(value), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:digits]


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (hex), for hashing weights and images into a configuration."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    """Versions of mmlens and the libraries that change its numbers, for run metadata."""
    import torch
    import transformers

    import mmlens

    return {
        "mmlens": mmlens.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


class ArtefactStore:
    """Cached artefacts in ``root/<kind>/<name>-<hash>/``, one folder per configuration.

    >>> store = ArtefactStore(tmp)                       # doctest: +SKIP
    >>> folder = store.folder("fusion", config, name="image_only")
    >>> if not store.complete(folder): ...train, write files..., store.finish(folder, meta)
    """

    MANIFEST = "manifest.json"

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def folder(self, kind: str, config: Any, name: str = "") -> Path:
        """The folder of the artefact identified by ``config`` (created)."""
        key = config_hash(config)
        folder = self.root / kind / (f"{name}-{key}" if name else key)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def complete(self, folder: Path) -> bool:
        """Whether :meth:`finish` was called on ``folder``."""
        return (folder / self.MANIFEST).is_file()

    def finish(self, folder: Path, meta: Mapping[str, Any]) -> Path:
        """Mark ``folder`` complete, recording ``meta`` (written last, atomically)."""
        return write_json(folder / self.MANIFEST, {**canonical(dict(meta)), "versions": versions()})

    def manifest(self, folder: Path) -> dict[str, Any]:
        """The metadata recorded by :meth:`finish`."""
        return json.loads((folder / self.MANIFEST).read_text(encoding="utf-8"))

    def get_or_build(self, kind: str, config: Any, build: Callable[[Path], Mapping[str, Any]], name: str = "") -> Path:
        """The folder for ``config``; ``build(folder)`` writes the files and returns metadata when the
        folder is not complete yet."""
        folder = self.folder(kind, config, name)
        if not self.complete(folder):
            self.finish(folder, build(folder))
        return folder


class FolderBusyError(RuntimeError):
    """Another run holds the output folder's lock."""


LOCK_FILE = ".mmlens.lock"


@contextmanager
def output_lock(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder``'s lock (``folder/.mmlens.lock``, an OS advisory lock released when the process
    ends, also on SIGKILL) while the block runs; a second run into the same folder raises
    :class:`FolderBusyError` naming the holder instead of computing everything twice."""
    import fcntl

    target = Path(folder).expanduser()
    try:
        target.mkdir(parents=True, exist_ok=True)
        handle = open(target / LOCK_FILE, "a+", encoding="utf-8")
    except OSError as err:
        raise OSError(
            f"cannot use {target} as the output folder ({err.strerror}); choose a writable folder (--out)"
        ) from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise FolderBusyError(
                f"another mmlens run ({holder}) is writing to {target}; wait for it to finish, or choose another "
                "output folder (--out)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {platform.node()}")
        handle.flush()
        yield target
    finally:
        handle.close()


def weights_fingerprint(folder: str | Path, full_hash_limit: int = 1 << 28) -> dict[str, str]:
    """``{file: fingerprint}`` of a local checkpoint's weight and config files, for run identities.

    Files up to ``full_hash_limit`` bytes (256 MiB) are hashed whole (sha256); larger ones by size,
    modification time and the sha256 of their first and last MiB, so a 15 GB checkpoint costs
    milliseconds while any re-save changes its fingerprint."""
    root = Path(folder)
    patterns = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.json")
    files = sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()})
    out = {}
    for path in files:
        size = path.stat().st_size
        if size <= full_hash_limit:
            out[path.name] = file_digest(path)
            continue
        digest = hashlib.sha256(f"{size}:{path.stat().st_mtime_ns}".encode())
        with open(path, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(-(1 << 20), os.SEEK_END)
            digest.update(f.read(1 << 20))
        out[path.name] = "sampled:" + digest.hexdigest()
    return out
