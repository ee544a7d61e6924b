#!/usr/bin/env bash
# Lint and type checks (the tools come with the test extra: bash scripts/setup.sh).
# ruff: lint + format check (settings in pyproject.toml [tool.ruff]); mypy: [tool.mypy].
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy localcl storage ray_jobs
