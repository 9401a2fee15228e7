"""Shared test set-up: a persistent compilation cache and parsed absl flags (grain needs them)."""

import os
import pathlib

import pytest
from absl import flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE_DIR = os.environ.get("PAGKD_JAX_CACHE", str(REPO_ROOT / ".jax_cache"))
os.environ.setdefault("PAGKD_JAX_CACHE", CACHE_DIR)

import jax  # noqa: E402  (after the environment is set)

jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
  return REPO_ROOT


# The files that take longest (minutes each on a 2-core CPU; measured with --durations=0), collected first: with
# parallel workers (scripts/test.sh, one file per worker at a time) they start at once instead of ending the run
# alone. Every other file keeps its order.
LONGEST_FIRST = ("test_pagkd_step.py", "test_multiprocess.py", "test_paired_training.py", "test_negative_controls.py",
                 "test_ablations.py", "test_crckd_training.py", "test_transfer_headroom.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
