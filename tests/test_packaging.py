"""A regular (non-editable) install ships mmlens, mmlens.hooks, mmlens.analyses and the console script."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_all_packages(tmp_path: Path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("mmlens-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in (
        "mmlens/__init__.py",
        "mmlens/hooks/__init__.py",
        "mmlens/hooks/llava.py",
        "mmlens/analyses/__init__.py",
        "mmlens/analyses/bench_overhead.py",
        "mmlens/models/tea_glm.py",
        "mmlens/data/synonyms.json",
    ):
        assert module in names, f"{module} missing from the wheel"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "mmlens = mmlens.runs.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    code = (
        "import mmlens, mmlens.hooks, mmlens.analyses, mmlens.metrics.perturb; assert mmlens.metrics.perturb.synonym_groups(); "
        "print(mmlens.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert out.stdout.strip().startswith(str(target))
