#!/usr/bin/env bash
# The README's main command: set up .venv, then run the whole pipeline on the embedded
# phantom (or pass --data PATH for an MSD dataset such as ACDC).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/localcl demo "$@"
