"""Notebook friendliness: every progress bar is tqdm.auto (widgets in Jupyter, text in a terminal), and
the long calls take a ``progress=`` switch."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from mmlens.methods.lens import TunedLens
from mmlens.methods.patching import sweep
from mmlens.metrics.desiderata import circuit_faithfulness, faithfulness, granger, stability
from mmlens.runs.evaluate import run_evaluation
from mmlens.runs.patch import run_patch
from mmlens.training.loop import fit

ROOT = Path(__file__).resolve().parents[1]
PLAIN_TQDM = re.compile(r"^\s*(from tqdm(\.std)? import|import tqdm\b)", re.MULTILINE)


def test_every_progress_bar_is_tqdm_auto():
    files = [p for folder in ("mmlens", "hooks", "analyses") for p in (ROOT / folder).rglob("*.py")]
    assert len(files) > 20
    plain = [str(p.relative_to(ROOT)) for p in files if PLAIN_TQDM.search(p.read_text(encoding="utf-8"))]
    assert plain == [], "use `from tqdm.auto import tqdm` (Jupyter widgets, terminal text)"
    assert PLAIN_TQDM.search("from tqdm import tqdm\n") and not PLAIN_TQDM.search("from tqdm.auto import tqdm\n")


LONG_CALLS = [sweep, granger, faithfulness, stability, circuit_faithfulness, TunedLens.fit, run_patch, run_evaluation]


@pytest.mark.parametrize("call", [*LONG_CALLS, fit])
def test_long_calls_take_a_progress_switch(call):
    parameter = inspect.signature(call).parameters.get("progress")
    assert parameter is not None, f"{call.__qualname__} has no progress= switch"
    # the user-facing calls show a bar unless asked not to; the training loop is driven by callers that pass it
    assert parameter.default is (call in LONG_CALLS), call.__qualname__
