"""Process set-up shared by train.py and eval.py: logging, the persistent compilation cache, multi-host."""

import logging as py_logging
import os

import jax
from absl import logging

# Libraries whose INFO chatter (every checkpoint step, every pipeline event) would drown the progress line.
_QUIET_BELOW_WARNING = ("/orbax/", "/grain/", "/jax/_src/")


class _LibraryInfoFilter(py_logging.Filter):

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or not any(p in record.pathname for p in _QUIET_BELOW_WARNING)


def initialize() -> None:
  """INFO logging for this project (libraries: warnings only) and a persistent XLA compilation cache
  ($PAGKD_JAX_CACHE, default ~/.cache/pagkd_jax/xla), so a rerun or a resumed run does not compile again."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())
  cache = os.environ.get("PAGKD_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pagkd_jax", "xla"))
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
