"""Metrics as JSON lines (`metrics.jsonl`), TensorBoard event files and a console progress line."""

import json
import math
import os
import sys
import time
from typing import Mapping

import jax
from absl import logging


def _to_float(v) -> float | None:
  v = float(v)
  return v if math.isfinite(v) else None


def _summary_writer_class():
  """tensorboardX's SummaryWriter (standard event files without TensorFlow), imported without PyTorch.

  tensorboardX imports PyTorch whenever it is installed (e.g. for weight import), only to accept torch tensors,
  which are never logged here: that would cost every training process seconds of start-up and load a second
  copy of PyTorch's native runtime beside JAX's.
  """
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles.
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricLog:
  """Writes scalars from process 0: one JSON object per line with its step, and TensorBoard scalars.

  Appends, so a resumed run continues the same files. `resume_step`: the step the run resumes from; rows of later
  steps (written after that checkpoint by a run that was then killed) are dropped first, so metrics.jsonl holds
  each step once.
  """

  def __init__(self, workdir: str, enabled: bool | None = None, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      if resume_step is not None and os.path.exists(path):
        _drop_rows_after(path, resume_step)
      self._jsonl = open(path, "a", buffering=1)
      self._tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _to_float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step" and v is not None:
        self._tb.add_scalar(k, v, int(step))

  def flush(self) -> None:
    if self.enabled:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _drop_rows_after(path: str, step: int) -> None:
  """Rewrites the JSON-lines file `path` without rows of steps > `step` (and without a torn last line)."""
  kept = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # A line cut short by a kill.
        continue
      if row.get("step", 0) <= step:
        kept.append(json.dumps(row) + "\n")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


class Progress:
  """Console line: step, loss, images/s and ETA, measured between calls."""

  def __init__(self, total_steps: int, images_per_step: int, start_step: int):
    self.total = total_steps
    self.images_per_step = images_per_step
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def report(self, step: int, scalars: Mapping[str, float]) -> dict:
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    sec_per_step = (now - self._last_time) / steps
    self._last_step, self._last_time = step, now
    eta = sec_per_step * (self.total - step)
    loss_terms = " ".join(f"{k}={float(v):.4f}" for k, v in scalars.items() if k.startswith("train/loss"))
    logging.info("step %d/%d %s | %.1f img/s | ETA %s", step, self.total, loss_terms,
                 self.images_per_step / max(sec_per_step, 1e-9), _format_seconds(eta))
    return {"perf/images_per_sec": self.images_per_step / max(sec_per_step, 1e-9),
            "perf/sec_per_step": sec_per_step}


def _format_seconds(s: float) -> str:
  s = int(max(s, 0))
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
