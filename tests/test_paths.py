"""The bundled data: found with no environment, checked against its checksums, overridable."""

from __future__ import annotations

import shutil

import pytest

from mmlens.data import paths
from mmlens.data.graphs import load_text_attributed_graph


def test_without_environment_the_bundled_copy_is_used_and_verified(monkeypatch):
    monkeypatch.delenv("MMLENS_DATA", raising=False)
    monkeypatch.delenv("MMLENS_MODELS", raising=False)
    assert paths.data_dir() == paths.BUNDLED
    assert paths.models_dir() == paths.BUNDLED / "models"
    assert (paths.models_dir() / "tinystories-656k" / "model.safetensors").is_file()
    assert load_text_attributed_graph("cora").num_nodes == 2708


def test_every_bundled_file_is_listed_with_its_checksum():
    listed = {line.split(maxsplit=1)[1] for line in (paths.BUNDLED / "SHA256SUMS").read_text().splitlines()}
    shipped = {
        str(p.relative_to(paths.BUNDLED))
        for p in paths.BUNDLED.rglob("*")
        if p.is_file() and p.name not in ("SHA256SUMS",) and p.parent != paths.BUNDLED
    }
    assert shipped == listed


def test_a_changed_bundled_file_is_refused_with_the_fix(tmp_path):
    copy = tmp_path / "bundled"
    shutil.copytree(paths.BUNDLED, copy)
    assert paths.verify_bundled(copy) == copy
    damaged = tmp_path / "damaged"
    shutil.copytree(paths.BUNDLED, damaged)
    (damaged / "cora_tag" / "labels.json").write_text("{}")
    with pytest.raises(OSError, match=r"labels\.json does not match its checksum.*git checkout"):
        paths.verify_bundled(damaged)
    (damaged / "cora_tag" / "labels.json").unlink()
    paths.verify_bundled.cache_clear()
    with pytest.raises(FileNotFoundError, match=r"labels\.json is missing"):
        paths.verify_bundled(damaged)


def test_overrides_win_and_a_missing_override_names_its_source(tmp_path, monkeypatch):
    monkeypatch.setenv("MMLENS_DATA", str(tmp_path))
    assert paths.data_dir() == tmp_path
    monkeypatch.setenv("MMLENS_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere.*MMLENS_DATA.*unset MMLENS_DATA"):
        paths.data_dir()
    monkeypatch.setenv("MMLENS_MODELS", "~/surely-not-a-folder")
    with pytest.raises(FileNotFoundError, match="surely-not-a-folder.*MMLENS_MODELS"):
        paths.models_dir()
