"""Where mmlens finds its data, local model folders and its own cache.

The small files the main job and the tests need ship inside the package (``mmlens/data/bundled``:
text-attributed and Planetoid Cora, TinyStories-656K; provenance, licences and SHA-256 checksums in
its ``README.md`` and ``SHA256SUMS``). Each folder resolves, in order, to an explicit argument, then
an environment variable, then the bundled copy:

- data:   ``MMLENS_DATA``   (holds ``cora_tag/``, ``planetoid_cora/``)
- models: ``MMLENS_MODELS`` (holds ``tinystories-656k/``); else ``<MMLENS_DATA>/../models`` when that
  folder exists
- cache:  ``MMLENS_CACHE``  (converted checkpoints, downloads); defaults to ``~/.cache/mmlens``

The bundled files are checked against their checksums the first time a process uses them.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

BUNDLED = Path(__file__).resolve().parent / "bundled"
"""The data and model files shipped with mmlens."""


@functools.cache
def verify_bundled(folder: Path = BUNDLED) -> Path:
    """Check every file listed in ``folder/SHA256SUMS``; raises naming the file, both digests and the fix.

    Runs once per process and folder (about 10 ms for the 4.8 MB shipped)."""
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        raise FileNotFoundError(f"{sums} is missing; restore it with `git checkout -- {folder}` or reinstall mmlens")
    for line in sums.read_text(encoding="utf-8").splitlines():
        expected, name = line.split(maxsplit=1)
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"bundled file {path} is missing; restore it with `git checkout -- {folder}`")
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            raise OSError(
                f"bundled file {path} does not match its checksum (sha256 {actual}, expected {expected}); "
                f"it was changed or truncated: restore it with `git checkout -- {path}`"
            )
    return folder


def _from_env(explicit: str | os.PathLike | None, env_var: str) -> tuple[Path | None, str]:
    if explicit is not None:
        return Path(explicit).expanduser(), "the argument"
    if os.environ.get(env_var):
        return Path(os.environ[env_var]).expanduser(), env_var
    return None, ""


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data folder: ``explicit``, else ``MMLENS_DATA``, else the bundled copy (checksum-verified).

    Raises FileNotFoundError naming where the folder was expected and how to set it."""
    path, source = _from_env(explicit, "MMLENS_DATA")
    if path is None:
        return verify_bundled()
    if not path.is_dir():
        raise FileNotFoundError(
            f"mmlens data folder {path} (from {source}) does not exist; point it at a folder holding "
            "cora_tag/ and planetoid_cora/, or unset MMLENS_DATA to use the bundled copy"
        )
    return path


def models_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The folder of local model checkpoints: ``explicit``, else ``MMLENS_MODELS``, else
    ``<MMLENS_DATA>/../models`` when it exists, else the bundled copy (checksum-verified)."""
    path, source = _from_env(explicit, "MMLENS_MODELS")
    if path is None:
        beside_data = _from_env(None, "MMLENS_DATA")[0]
        if beside_data is not None and (beside_data.parent / "models").is_dir():
            return beside_data.parent / "models"
        return verify_bundled() / "models"
    if not path.is_dir():
        raise FileNotFoundError(
            f"mmlens models folder {path} (from {source}) does not exist; point it at a folder holding "
            "tinystories-656k/, or unset MMLENS_MODELS to use the bundled copy"
        )
    return path


def cache_dir() -> Path:
    """mmlens's own cache folder (created on first use)."""
    path = Path(os.environ.get("MMLENS_CACHE", Path.home() / ".cache" / "mmlens")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
