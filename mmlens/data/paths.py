"""Where mmlens looks for shared data, local model folders and its own cache.

Resolution order for each folder: an explicit argument, then an environment variable, then the
conventional ``shared/`` folder next to (or one level above) the current directory or the
repository checkout that this package was installed from.

- data:   ``MMLENS_DATA``   (holds ``cora_tag/``, ``planetoid_cora/``)
- models: ``MMLENS_MODELS`` (holds ``tinystories-656k/``); defaults to ``<data>/../models``
- cache:  ``MMLENS_CACHE``  (converted checkpoints, downloads); defaults to ``~/.cache/mmlens``
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_dirs() -> list[Path]:
    """The conventional ``shared/`` folders, in search order: beside and one level above the
    current directory, then the repository checkout."""
    bases = [Path.cwd(), _REPO_ROOT]
    found: list[Path] = []
    for base in bases:
        for shared in (base / "shared", base.parent / "shared"):
            if shared not in found:
                found.append(shared)
    return found


def _resolve(explicit: str | os.PathLike | None, env_var: str, sub: str) -> tuple[Path | None, list[str]]:
    looked: list[str] = []
    if explicit is not None:
        return Path(explicit), looked
    if os.environ.get(env_var):
        return Path(os.environ[env_var]), looked
    for shared in shared_dirs():
        candidate = shared / sub
        looked.append(str(candidate))
        if candidate.is_dir():
            return candidate, looked
    return None, looked


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The shared data folder; raises FileNotFoundError saying where it looked and how to set it."""
    path, looked = _resolve(explicit, "MMLENS_DATA", "data")
    if path is None or not path.is_dir():
        where = str(path) if path is not None else ", ".join(looked)
        raise FileNotFoundError(
            f"mmlens data folder not found (looked in: {where}). Set MMLENS_DATA=/path/to/shared/data "
            "or pass --data-dir."
        )
    return path


def models_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The folder of local model checkpoints (``MMLENS_MODELS``, else ``<data>/../models``)."""
    if explicit is None and not os.environ.get("MMLENS_MODELS") and os.environ.get("MMLENS_DATA"):
        return Path(os.environ["MMLENS_DATA"]).parent / "models"
    path, looked = _resolve(explicit, "MMLENS_MODELS", "models")
    if path is None or not path.is_dir():
        where = str(path) if path is not None else ", ".join(looked)
        raise FileNotFoundError(
            f"mmlens models folder not found (looked in: {where}). Set MMLENS_MODELS=/path/to/shared/models."
        )
    return path


def cache_dir() -> Path:
    """mmlens's own cache folder (created on first use)."""
    path = Path(os.environ.get("MMLENS_CACHE", Path.home() / ".cache" / "mmlens"))
    path.mkdir(parents=True, exist_ok=True)
    return path
