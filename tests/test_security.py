"""Loading never runs untrusted code: checkpoints load with weights_only, remote code only on request."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import mmlens

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for folder in ("mmlens", "hooks", "analyses") for p in (ROOT / folder).rglob("*.py")]


def _calls(name: str):
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    yield path, node


def _keyword(node: ast.Call, name: str):
    return next((kw.value for kw in node.keywords if kw.arg == name), None)


def test_every_torch_load_is_weights_only():
    calls = list(_calls("load"))
    loads = [
        (p, n) for p, n in calls if isinstance(n.func, ast.Attribute) and getattr(n.func.value, "id", "") == "torch"
    ]
    assert loads, "expected torch.load calls to check"
    for path, node in loads:
        value = _keyword(node, "weights_only")
        assert isinstance(value, ast.Constant) and value.value is True, (
            f"{path}:{node.lineno} torch.load without weights_only=True"
        )


def test_every_from_pretrained_says_whether_remote_code_runs():
    calls = list(_calls("from_pretrained"))
    assert calls, "expected from_pretrained calls to check"
    for path, node in calls:
        assert _keyword(node, "trust_remote_code") is not None or any(kw.arg is None for kw in node.keywords), (
            f"{path}:{node.lineno} from_pretrained without an explicit trust_remote_code"
        )


def test_a_checkpoint_with_remote_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code_ran"
    (tmp_path / "configuration_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\nclass EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    )
    config = {"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code"):
        mmlens.load_model(str(tmp_path))
    assert not marker.exists()
