"""Evaluation batches: every record exactly once, in order, in fixed-size padded batches.

Global batch `b` holds records `[b B, (b + 1) B)`; the last one is padded to `B` rows (mask False,
index -1, label 0, image zeros) so a jitted eval step never recompiles. Process `p` of `P` takes
rows `[p B/P, (p + 1) B/P)` of every global batch.
"""

import math
from collections.abc import Sequence

import grain
import numpy as np

from pagkd_jax.data import augment, image_io
from pagkd_jax.data.records import ImageRecord


def num_eval_batches(n: int, batch_size: int) -> int:
  """ceil(n / batch_size): global batches needed for `n` records."""
  if batch_size < 1 or n < 0:
    raise ValueError(f"need n >= 0 and batch_size >= 1, got {n}, {batch_size}")
  return math.ceil(n / batch_size)


class EvalBatchLoader:
  """Random access to this process's slice of the evaluation batches: `loader[b]`.

  Elements: `{"image": (B_local, H, W, 3) uint8, "label": (B_local,) int32,
  "mask": (B_local,) bool, "index": (B_local,) int32 (row in `records`, -1 for padding)}`.
  """

  def __init__(self, records: Sequence[ImageRecord], *, image_size: int, batch_size: int,
               process_index: int = 0, process_count: int = 1):
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    if batch_size < 1 or batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} must be >= 1 and divisible by process_count "
                       f"{process_count}")
    if image_size < 1:
      raise ValueError(f"image_size must be >= 1, got {image_size}")
    self.records = list(records)
    self.image_size = image_size
    self.batch_size = batch_size
    self.local_batch_size = batch_size // process_count
    self.process_index = process_index

  def __len__(self) -> int:
    return num_eval_batches(len(self.records), self.batch_size)

  def __getitem__(self, batch_index: int) -> dict[str, np.ndarray]:
    if not 0 <= batch_index < len(self):
      raise IndexError(f"batch {batch_index} out of range [0, {len(self)})")
    size, local = self.image_size, self.local_batch_size
    start = batch_index * self.batch_size + self.process_index * local
    batch = {
        "image": np.zeros((local, size, size, 3), dtype=np.uint8),
        "label": np.zeros((local,), dtype=np.int32),
        "mask": np.zeros((local,), dtype=bool),
        "index": np.full((local,), -1, dtype=np.int32),
    }
    for row, index in enumerate(range(start, min(start + local, len(self.records)))):
      record = self.records[index]
      batch["image"][row] = augment.preprocess_eval(image_io.read_image(record), size)
      batch["label"][row] = record.label
      batch["mask"][row] = True
      batch["index"][row] = index
    return batch


def make_eval_iterator(
    records: Sequence[ImageRecord],
    *,
    image_size: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
) -> grain.DatasetIterator:
  """A fresh iterator over `num_eval_batches(len(records), batch_size)` batches of
  `EvalBatchLoader`; call it again for every evaluation pass."""
  if num_workers < 0:
    raise ValueError(f"num_workers must be >= 0, got {num_workers}")
  loader = EvalBatchLoader(records, image_size=image_size, batch_size=batch_size,
                           process_index=process_index, process_count=process_count)
  dataset = grain.MapDataset.source(loader).to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
  if num_workers > 0:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(dataset)
