#!/usr/bin/env bash
# Creates .venv in the repository root and installs localcl into it (idempotent).
# TORCH_SPEC picks the torch build: the default takes the CPU wheel; a GPU user installs a CUDA
# build first, e.g. TORCH_SPEC="torch==2.13.0" PIP_EXTRA_INDEX_URL=<pytorch cuda index>.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
