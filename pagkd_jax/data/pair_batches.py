"""The training batches of the paired stream (spec 8): B pairs a step, both images of a pair under one random draw.

Order: the pairs, sorted by pair_id, are permuted afresh every epoch of the stream (seeded by (seed, epoch)).
With S = `steps_per_epoch` = floor(N / B) steps an epoch, step `s` takes positions `[(s mod S) B, (s mod S + 1) B)`
of the permutation of epoch `s // S`.

Remainder: dropped. The N mod B pairs at the end of an epoch's permutation are left out of that epoch (other
pairs every epoch, as the permutation is fresh), so every batch is full: a fixed shape under jit with no mask, no
padded image in BatchNorm's batch statistics (a mask covers a loss, not those), and no pair twice in a batch.
An epoch shows each pair at most once; there must be at least B pairs (`pairs.require_pairs`).

Augmentation: member j of step s is drawn from the generator seeded by (seed, step, j), once for the pair
(`augment.augment_train_pair`): its WLI and NBI images get the same rotation and flips, other pairs other draws.
The seed sequences start with their own tags (2, 3; the class-group stream uses 0, 1), so the two streams never
share a random stream.

Everything is a pure function of (seed, step): `PairBatchLoader[step]` is the batch of `step`, and the iterator
(`step_iterator.StepIterator`) saves only the next step, so a restored iterator continues with exactly the batches
an uninterrupted run gives. Multi-process: the batch is drawn globally and process `p` of `P` decodes members
`[p B/P, (p + 1) B/P)`; put together, the processes' slices are the single-process batch.
"""

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from pagkd_jax.data import augment, image_io, step_iterator
from pagkd_jax.data.pairs import Pair, require_pairs

# First entries of the seed sequences (class_groups uses 0 and 1).
_ORDER_TAG, _AUGMENT_TAG = 2, 3


def steps_per_epoch(pairs: Sequence[Pair], batch_size: int) -> int:
  """floor(#pairs / batch_size): the full batches of one epoch of the paired stream (the remainder is dropped).

  Raises:
    ValueError: fewer than `batch_size` pairs (`pairs.require_pairs`), naming the count.
  """
  require_pairs(pairs, batch_size)
  return len(pairs) // batch_size


class PairBatchLoader:
  """Random access to the paired training batches: `loader[step]` is the batch of `step`.

  Elements: `{"wli": (B_local, H, W, 3) uint8, "nbi": (B_local, H, W, 3) uint8, "label": (B_local,) int32}`, row
  i of the three the same pair, with `B_local = batch_size // process_count` and `H = W = image_size`. Picklable,
  so grain worker processes can hold it.
  """

  def __init__(
      self,
      pairs: Sequence[Pair],
      *,
      classes: Sequence[str],
      batch_size: int,
      image_size: int,
      aug_config: Any,
      seed: int,
      process_index: int = 0,
      process_count: int = 1,
  ):
    if batch_size < 1 or image_size < 1:
      raise ValueError(f"batch_size and image_size must be >= 1, got {batch_size}, {image_size}")
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    if batch_size % process_count:
      raise ValueError(f"paired batch size {batch_size} is not divisible by process_count {process_count}")
    if seed < 0:
      raise ValueError(f"seed must be >= 0, got {seed}")
    ordered = sorted(pairs, key=lambda p: p.pair_id)
    for first, second in zip(ordered, ordered[1:]):
      if first.pair_id == second.pair_id:
        raise ValueError(f"pair_id {first.pair_id!r} is given twice")
    for pair in ordered:
      if pair.wli.modality != "wli" or pair.nbi.modality != "nbi" or pair.wli.label != pair.nbi.label:
        raise ValueError(f"pair_id {pair.pair_id!r}: expected a WLI and an NBI image of one label, got "
                         f"{image_io.describe(pair.wli)} ({pair.wli.modality}, label {pair.wli.label}) and "
                         f"{image_io.describe(pair.nbi)} ({pair.nbi.modality}, label {pair.nbi.label})")
      if not 0 <= pair.label < len(classes):
        raise ValueError(f"pair_id {pair.pair_id!r} ({image_io.describe(pair.wli)}): label {pair.label} out of "
                         f"range for {len(classes)} classes")
    require_pairs(ordered, batch_size)
    self.pairs = tuple(ordered)
    self.classes = tuple(classes)
    self.batch_size = batch_size
    self.local_batch_size = batch_size // process_count
    self.image_size = image_size
    self.aug_config = aug_config
    self.seed = seed
    self.process_index = process_index
    self.steps_per_epoch = len(ordered) // batch_size
    self._permutation_cache: tuple[int, np.ndarray] | None = None

  def __len__(self) -> int:
    return sys.maxsize

  def _permutation(self, epoch: int) -> np.ndarray:
    """The order of the pairs in epoch `epoch` of the stream, (N,) indices into `self.pairs`."""
    if self._permutation_cache is None or self._permutation_cache[0] != epoch:
      order = np.random.default_rng([self.seed, _ORDER_TAG, epoch]).permutation(len(self.pairs))
      self._permutation_cache = (epoch, order)
    return self._permutation_cache[1]

  def batch_indices(self, step: int) -> np.ndarray:
    """The pairs of `step`, `(batch_size,)` indices into `self.pairs` (the global batch)."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    epoch, position = divmod(step, self.steps_per_epoch)
    return self._permutation(epoch)[position * self.batch_size:(position + 1) * self.batch_size].copy()

  def __getitem__(self, step: int) -> dict[str, np.ndarray]:
    step = int(step)
    size, local = self.image_size, self.local_batch_size
    first = self.process_index * local
    indices = self.batch_indices(step)
    batch = {"wli": np.empty((local, size, size, 3), dtype=np.uint8),
             "nbi": np.empty((local, size, size, 3), dtype=np.uint8),
             "label": np.empty((local,), dtype=np.int32)}
    for row, member in enumerate(range(first, first + local)):
      pair = self.pairs[indices[member]]
      rng = np.random.default_rng([self.seed, _AUGMENT_TAG, step, member])
      batch["wli"][row], batch["nbi"][row] = augment.augment_train_pair(
          image_io.read_image(pair.wli), image_io.read_image(pair.nbi), size, self.aug_config, rng)
      batch["label"][row] = pair.label
    return batch


def make_paired_iterator(
    pairs: Sequence[Pair],
    *,
    classes: Sequence[str],
    batch_size: int,
    image_size: int,
    aug_config: Any,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    worker_buffer_size: int = 2,
) -> step_iterator.StepIterator:
  """An endless, checkpointable iterator over the `PairBatchLoader` batches from step 0.

  `get_state()`/`set_state()` (or `grain.checkpoint.CheckpointSave/CheckpointRestore` with orbax) resume exactly.
  With `num_workers == 0` one background thread prefetches `worker_buffer_size` batches; otherwise `num_workers`
  processes (`mp_prefetch`) each do.
  """
  loader = PairBatchLoader(
      pairs, classes=classes, batch_size=batch_size, image_size=image_size, aug_config=aug_config, seed=seed,
      process_index=process_index, process_count=process_count)
  return step_iterator.StepIterator(loader, num_workers=num_workers, worker_buffer_size=worker_buffer_size)
