#!/usr/bin/env bash
# Create .venv and install mmlens with its test extras. torch goes first, pinned to the CPU build
# (otherwise pip resolves a multi-GB CUDA build); torchvision is never installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
echo "mmlens installed in $(pwd)/.venv"
