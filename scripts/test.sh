#!/usr/bin/env bash
# Runs the test suite in .venv (creating it first if needed). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/python ]] || bash scripts/setup_venv.sh
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
exec .venv/bin/python -m pytest tests -q --durations=15 "$@"
