"""The checkpointable iterator of a training stream: batch `step` of a random-access loader, step after step.

A training stream (`class_groups.ClassGroupLoader`, `pair_batches.PairBatchLoader`) is a pure function of
(seed, step): `loader[step]` is the batch of that step. Its iterator's state is the next step, so a restored
iterator continues with exactly the batches an uninterrupted run gives, whatever the number of worker processes.
"""

from typing import Any

import grain
import numpy as np


class StepIterator(grain.DatasetIterator):
  """Iterates `loader[step]` for step = start, start + 1, ...; its state is `{"step": next step}`.

  The state does not depend on `num_workers`, so a run may resume with another worker count (or
  on another machine). The grain pipeline (one prefetch thread, plus `mp_prefetch` worker
  processes when `num_workers > 0`) starts on the first `next` or `start_prefetch`, and restarts
  from the new step on `set_state`.

  `loader`: `loader[step]` is the batch of `step` (a dict of NumPy arrays), `len(loader)` is `sys.maxsize` for
  an endless stream; picklable when `num_workers > 0`.
  """

  def __init__(self, loader: Any, *, num_workers: int = 0,
               worker_buffer_size: int = 2):
    super().__init__()
    if num_workers < 0 or worker_buffer_size < 1:
      raise ValueError(f"need num_workers >= 0 and worker_buffer_size >= 1, got {num_workers}, "
                       f"{worker_buffer_size}")
    self.loader = loader
    self._num_workers = num_workers
    self._buffer_size = worker_buffer_size
    self._step = 0
    self._pipeline: grain.DatasetIterator | None = None

  def _start(self) -> grain.DatasetIterator:
    if self._pipeline is None:
      dataset = grain.MapDataset.source(self.loader)[self._step:].to_iter_dataset(
          grain.ReadOptions(num_threads=1, prefetch_buffer_size=self._buffer_size))
      if self._num_workers > 0:
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=self._num_workers, per_worker_buffer_size=self._buffer_size))
      self._pipeline = iter(dataset)
    return self._pipeline

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    batch = next(self._start())
    self._step += 1
    return batch

  def get_state(self) -> dict[str, int]:
    return {"step": self._step}

  def set_state(self, state: dict[str, Any]) -> None:
    step = int(state["step"])
    if step < 0:
      raise ValueError(f"invalid iterator state {state}")
    if step != self._step:
      self._stop()
      self._step = step

  def start_prefetch(self) -> None:
    self._start()

  def _stop(self) -> None:
    if self._pipeline is not None:
      self._pipeline.close()
      self._pipeline = None

  def close(self) -> None:
    self._stop()
    super().close()
