"""Process set-up shared by train.py and eval.py: logging, the persistent compilation cache, multi-host."""

import os

import jax
from absl import logging


def initialize() -> None:
  """Sets INFO logging and a persistent XLA compilation cache ($PAGKD_JAX_CACHE, default
  ~/.cache/pagkd_jax/xla), so a rerun or a resumed run does not compile again."""
  logging.set_verbosity(logging.INFO)
  cache = os.environ.get("PAGKD_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pagkd_jax", "xla"))
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
