"""Stopping on SIGTERM (what cloud preemption and `kill` send) with a checkpoint saved first.

Single process: a Python handler records the signal and the training loop stops after the step in flight. Several
processes: JAX's preemption service (started by `jax.distributed.initialize`) catches the signal on any process
and agrees with the others on one step to stop at, so that every process saves the same checkpoint.
"""

import signal

import jax
from absl import logging


class Preempted(Exception):
  """Training stopped on SIGTERM after saving a checkpoint; rerunning the same command resumes."""

  def __init__(self, step: int, workdir: str):
    self.step, self.workdir = step, workdir
    super().__init__(f"Stopped by SIGTERM after step {step}; its checkpoint is saved in {workdir}. Rerun the same "
                     f"command to resume.")


class PreemptionWatch:
  """Context manager: `stop_now(step)` is True once a SIGTERM has arrived (in any process)."""

  def __init__(self):
    self._requested = False
    self._previous = None
    self._multiprocess = jax.process_count() > 1

  def _handle(self, signum, frame):
    del frame
    if not self._requested:
      logging.warning("Received signal %d: saving a checkpoint after the current step, then stopping.", signum)
    self._requested = True

  def __enter__(self) -> "PreemptionWatch":
    if not self._multiprocess:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # Not the main thread (e.g. inside a notebook worker): no handler, run on.
        logging.warning("Not in the main thread: SIGTERM will not save a checkpoint before stopping.")
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def stop_now(self, step: int) -> bool:
    if self._multiprocess:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested
