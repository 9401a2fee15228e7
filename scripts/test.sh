#!/usr/bin/env bash
# Runs the test suite in .venv (creating it first if needed). Extra arguments go to pytest.
# Test files run in parallel (pytest-xdist), each file's tests together in one worker process so that its module
# fixtures are built once; PAGKD_TEST_WORKERS sets the number of workers (default: the CPU count, at most 4;
# 0 runs everything in one process, as pytest alone does).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/python ]] || bash scripts/setup_venv.sh
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
cpus=$(nproc 2>/dev/null || echo 1)
workers=${PAGKD_TEST_WORKERS:-$(( cpus < 4 ? cpus : 4 ))}
exec .venv/bin/python -m pytest tests -q --durations=15 -n "$workers" --dist loadfile "$@"
