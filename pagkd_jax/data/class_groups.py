"""The training pipeline: every batch holds a group of exactly K images of every class (spec §2).

For each (modality, class) there is an endless stream of that class's images: a permutation of
them, reshuffled every epoch of the stream (seeded by (seed, modality, class, epoch)) and repeated
forever. Step `s` takes positions `[s K, (s + 1) K)` of every stream, so over whole epochs each
image of a class is seen equally often, a class with fewer than K images is drawn with repetition,
and WLI and NBI streams are independent (unpaired). Everything is a pure function of
(seed, step): the grain pipeline is a random-access `MapDataset` over steps, whose iterator state is
the next step (`step_iterator.StepIterator`), so restoring it continues with exactly the batches an
uninterrupted run gives, whatever the number of worker processes.

Options a training method may ask for (off by default, and then the batches are exactly those without them):
`views=2` adds a second, independent augmentation of every image under `"<modality>_view2"` (CRCKD's teacher
view), and `row_indices=True` adds `"<modality>_row"`, each image's row: its position in `row_records(records,
modality)`, the training records of that modality in their given order, so a row names the same image in every
process and after a resume (CRCKD's memory banks have one row per training image).

Multi-process: the groups are drawn globally (same indices on every process) and process `p` of
`P` decodes only members `[p K/P, (p + 1) K/P)` of every group. Augmentation randomness depends on
(seed, step, modality, class, member), never on the process, so the processes' slices put together
are exactly the single-process batch.
"""

import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from pagkd_jax.data import augment, image_io, step_iterator
from pagkd_jax.data.records import MODALITIES, ImageRecord

# First entries of the seed sequences, so index streams and augmentation never share a seed.
_STREAM_TAG, _AUGMENT_TAG, _VIEW2_TAG = 0, 1, 2


def _check_labels(records: Sequence[ImageRecord], classes: Sequence[str]) -> None:
  for record in records:
    if not 0 <= record.label < len(classes):
      raise ValueError(f"{image_io.describe(record)}: label {record.label} out of range for "
                       f"{len(classes)} classes")


def row_records(records: Sequence[ImageRecord], modality: str) -> list[ImageRecord]:
  """The records of `modality` in their given order: row r of a batch's `"<modality>_row"` is the r-th."""
  return [r for r in records if r.modality == modality]


# The key of the second augmented view of `modality`'s images, and of their rows (`ClassGroupLoader` options).
def view2_key(modality: str) -> str:
  return f"{modality}_view2"


def row_key(modality: str) -> str:
  return f"{modality}_row"


def group_keys(modalities: Sequence[str], views: int = 1, row_indices: bool = False) -> tuple[str, ...]:
  """The keys of a batch whose arrays are (C, K_local, ...) groups (all but "label"), for these loader options."""
  keys = []
  for m in modalities:
    keys += [m] + ([view2_key(m)] if views == 2 else []) + ([row_key(m)] if row_indices else [])
  return tuple(keys)


def steps_per_epoch(records: Sequence[ImageRecord], classes: Sequence[str], modality: str,
                    group_size: int) -> int:
  """ceil(#images of `modality` / (C * group_size)): steps that show each image about once."""
  count = sum(r.modality == modality for r in records)
  if count == 0:
    raise ValueError(f"no {modality} images: cannot define an epoch")
  return math.ceil(count / (len(classes) * group_size))


class ClassGroupLoader:
  """Random access to the training batches: `loader[step]` is the batch of `step`.

  Elements: `{modality: (C, K_local, H, W, 3) uint8 for each requested modality,
  "label": (C,) int32 = arange(C)}` with `K_local = group_size // process_count` and
  `H = W = image_size`; with `views=2` also `view2_key(modality)`: (C, K_local, H, W, 3) uint8, a second
  augmentation of the same images (its own random draw); with `row_indices` also `row_key(modality)`:
  (C, K_local) int32, each image's row in `row_records(records, modality)`. Picklable, so grain worker processes
  can hold it.
  """

  def __init__(
      self,
      records: Sequence[ImageRecord],
      *,
      classes: Sequence[str],
      modalities: Sequence[str],
      group_size: int,
      image_size: int,
      aug_config: Any,
      seed: int,
      process_index: int = 0,
      process_count: int = 1,
      views: int = 1,
      row_indices: bool = False,
  ):
    modalities = tuple(modalities)
    if views not in (1, 2):
      raise ValueError(f"views must be 1 or 2, got {views}")
    if not modalities or len(set(modalities)) != len(modalities) or any(
        m not in MODALITIES for m in modalities):
      raise ValueError(f"modalities must be distinct values of {MODALITIES}, got {modalities}")
    if group_size < 1 or image_size < 1:
      raise ValueError(f"group_size and image_size must be >= 1, got {group_size}, {image_size}")
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    if group_size % process_count:
      raise ValueError(f"group_size {group_size} is not divisible by process_count "
                       f"{process_count}")
    if seed < 0:
      raise ValueError(f"seed must be >= 0, got {seed}")
    _check_labels(records, classes)
    self.classes = tuple(classes)
    self.modalities = modalities
    self.group_size = group_size
    self.local_group_size = group_size // process_count
    self.image_size = image_size
    self.aug_config = aug_config
    self.seed = seed
    self.process_index = process_index
    self.views = views
    self.row_indices = row_indices
    # members[modality][c]: the images of class c, in the given order.
    self.members: dict[str, list[list[ImageRecord]]] = {
        m: [[r for r in records if r.modality == m and r.label == c]
            for c in range(len(self.classes))] for m in modalities}
    # rows[modality][c][i]: the row of members[modality][c][i] in row_records(records, modality).
    self.rows: dict[str, list[np.ndarray]] = {}
    if row_indices:
      for m in modalities:
        row_of = {id(r): i for i, r in enumerate(row_records(records, m))}
        self.rows[m] = [np.asarray([row_of[id(r)] for r in images], np.int32) for images in self.members[m]]
    for m in modalities:
      for c, images in enumerate(self.members[m]):
        if not images:
          raise ValueError(f"class {self.classes[c]!r} has no {m} images; every class needs "
                           f"{m} images for this stage")
        if len(images) < group_size:
          logging.warning("class %r has only %d %s images for groups of %d: drawing with "
                          "repetition", self.classes[c], len(images), m, group_size)
    self._permutations: dict[tuple[int, int, int], np.ndarray] = {}

  def __len__(self) -> int:
    return sys.maxsize

  def _permutation(self, modality_id: int, label: int, epoch: int) -> np.ndarray:
    """The order of class `label`'s images in epoch `epoch` of its stream, (n,)."""
    key = (modality_id, label, epoch)
    permutation = self._permutations.get(key)
    if permutation is None:
      n = len(self.members[MODALITIES[modality_id]][label])
      permutation = np.random.default_rng(
          [self.seed, _STREAM_TAG, modality_id, label, epoch]).permutation(n)
      if len(self._permutations) > 8 * len(self.classes) * len(self.modalities):
        self._permutations.clear()
      self._permutations[key] = permutation
    return permutation

  def group_indices(self, step: int, modality: str) -> np.ndarray:
    """Global groups of `step`: `(C, group_size)` indices into `members[modality][c]`."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    modality_id = MODALITIES.index(modality)
    positions = step * self.group_size + np.arange(self.group_size)
    out = np.empty((len(self.classes), self.group_size), dtype=np.int64)
    for c, images in enumerate(self.members[modality]):
      epochs, offsets = np.divmod(positions, len(images))
      for k, (epoch, offset) in enumerate(zip(epochs.tolist(), offsets.tolist())):
        out[c, k] = self._permutation(modality_id, c, epoch)[offset]
    return out

  def __getitem__(self, step: int) -> dict[str, np.ndarray]:
    step = int(step)
    size, local = self.image_size, self.local_group_size
    first = self.process_index * local
    batch = {}
    for modality in self.modalities:
      modality_id = MODALITIES.index(modality)
      indices = self.group_indices(step, modality)
      images = np.empty((len(self.classes), local, size, size, 3), dtype=np.uint8)
      second = np.empty_like(images) if self.views == 2 else None
      for c, class_images in enumerate(self.members[modality]):
        for j, k in enumerate(range(first, first + local)):
          rng = np.random.default_rng([self.seed, _AUGMENT_TAG, step, modality_id, c, k])
          image = image_io.read_image(class_images[indices[c, k]])
          images[c, j] = augment.augment_train(image, size, self.aug_config, rng)
          if second is not None:  # Its own seed: the first view's draws are those of a run without it.
            rng = np.random.default_rng([self.seed, _VIEW2_TAG, step, modality_id, c, k])
            second[c, j] = augment.augment_train(image, size, self.aug_config, rng)
      batch[modality] = images
      if second is not None:
        batch[view2_key(modality)] = second
      if self.row_indices:
        batch[row_key(modality)] = np.stack([self.rows[modality][c][indices[c, first:first + local]]
                                             for c in range(len(self.classes))]).astype(np.int32)
    batch["label"] = np.arange(len(self.classes), dtype=np.int32)
    return batch


def make_train_iterator(
    records: Sequence[ImageRecord],
    *,
    classes: Sequence[str],
    modalities: Sequence[str],
    group_size: int,
    image_size: int,
    aug_config: Any,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    worker_buffer_size: int = 2,
    views: int = 1,
    row_indices: bool = False,
) -> step_iterator.StepIterator:
  """An endless, checkpointable iterator over the `ClassGroupLoader` batches from step 0.

  `get_state()`/`set_state()` (or `grain.checkpoint.CheckpointSave/CheckpointRestore` with
  orbax) resume exactly. With `num_workers == 0` one background thread prefetches
  `worker_buffer_size` batches; otherwise `num_workers` processes (`mp_prefetch`) each do.
  `views`, `row_indices`: the `ClassGroupLoader` options (extra batch keys; off, the batches are unchanged).
  """
  loader = ClassGroupLoader(
      records, classes=classes, modalities=modalities, group_size=group_size,
      image_size=image_size, aug_config=aug_config, seed=seed, process_index=process_index,
      process_count=process_count, views=views, row_indices=row_indices)
  return step_iterator.StepIterator(loader, num_workers=num_workers, worker_buffer_size=worker_buffer_size)
