"""Process set-up shared by train.py and eval.py: logging, the persistent compilation cache, multi-host."""

import logging as py_logging
import os

import jax
from absl import flags
from absl import logging

# Libraries whose INFO chatter (every checkpoint step, every pipeline event) would drown the progress line.
_QUIET_BELOW_WARNING = ("/orbax/", "/grain/", "/jax/_src/")


class _LibraryInfoFilter(py_logging.Filter):

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or not any(p in record.pathname for p in _QUIET_BELOW_WARNING)


_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: host:port of process 0, reachable from every process; with "
    "--num_processes and --process_id it joins the processes with jax.distributed.initialize.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (one per host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, 0 .. num_processes - 1.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-host: jax.distributed.initialize() with the cluster read from the environment "
    "(Slurm, Open MPI, Cloud TPU) instead of the three flags above.")


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, auto: bool = False) -> None:
  """Joins the processes of a multi-host run (nothing for a single process). Must precede any JAX computation."""
  explicit = (coordinator_address, num_processes, process_id)
  if not auto and all(v is None for v in explicit):
    return
  if not auto and any(v is None for v in explicit):
    raise ValueError("Multi-host runs need all of --coordinator_address, --num_processes and --process_id "
                     f"(got {explicit}), or --distributed for Slurm / Open MPI / Cloud TPU.")
  # CPU-only processes (tests, CPU clusters) exchange collectives through gloo; GPUs use NCCL regardless.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if auto:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  logging.info("Process %d of %d; %d local and %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def initialize() -> None:
  """INFO logging for this project (libraries: warnings only), multi-host start-up from the command-line flags,
  and a persistent XLA compilation cache ($PAGKD_JAX_CACHE, default ~/.cache/pagkd_jax/xla), so a rerun or a
  resumed run does not compile again."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())
  cache = os.environ.get("PAGKD_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pagkd_jax", "xla"))
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED.value)
