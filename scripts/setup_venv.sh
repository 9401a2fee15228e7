#!/usr/bin/env bash
# Creates .venv on Python >= 3.12 (current JAX needs it) and installs pagkd-jax with its test extra.
#   bash scripts/setup_venv.sh [EXTRA ...]      e.g. bash scripts/setup_venv.sh cuda12 tfds
# Picks $PYTHON if set, else the first Python >= 3.12 among python3.13, python3.12, python3 and pyenv's versions.
set -euo pipefail
cd "$(dirname "$0")/.."

is_new_enough() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }

find_python() {
  local candidates=()
  [[ -n "${PYTHON:-}" ]] && candidates+=("$PYTHON")
  candidates+=(python3.13 python3.12 python3)
  for root in "${PYENV_ROOT:-$HOME/.pyenv}/versions" /usr/local/bin /opt/python; do
    for p in "$root"/3.1[2-9]*/bin/python3 "$root"/python3.1[2-9]; do [[ -x "$p" ]] && candidates+=("$p"); done
  done
  for c in "${candidates[@]}"; do
    if command -v "$c" >/dev/null 2>&1 && is_new_enough "$c"; then command -v "$c"; return 0; fi
  done
  return 1
}

if [[ -x .venv/bin/python ]] && is_new_enough .venv/bin/python; then
  PY_VENV=.venv/bin/python
else
  if ! PY=$(find_python); then
    echo "ERROR: pagkd-jax needs Python >= 3.12 (current JAX does not support older versions)." >&2
    echo "Install it (e.g. 'pyenv install 3.12' or your OS package python3.12) or set PYTHON=/path/to/python3.12." >&2
    exit 1
  fi
  echo "Creating .venv with $PY ($("$PY" --version 2>&1))"
  rm -rf .venv
  "$PY" -m venv .venv
  PY_VENV=.venv/bin/python
fi

extras="test"
for e in "$@"; do extras="$extras,$e"; done
"$PY_VENV" -m pip install --quiet --upgrade pip
"$PY_VENV" -m pip install --quiet -e ".[${extras}]"
"$PY_VENV" -c 'import jax, flax, grain; print(f"pagkd-jax environment ready: jax {jax.__version__}, flax {flax.__version__}, devices {jax.devices()}")'
