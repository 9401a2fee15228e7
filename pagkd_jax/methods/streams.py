"""Extra training streams a method's program can add beside the class-group stream (`program.extra_streams`).

A stream is what the trainer needs to run it (the `pagkd_jax.methods` docstring): a `name`, an iterator with its
steps per epoch, the layout of its batches over the device mesh and a pure update. `PairedStream` is the paired
stream of "PaGKD (all)" (spec 8): batches of `data.paired_batch_size` pairs of the training split
(`pagkd_jax.data.pair_batches`), each pair's two images under one augmentation draw.
"""

import dataclasses
from typing import Callable

from pagkd_jax.data import pair_batches
from pagkd_jax.data import pairs as pairs_lib


def training_pairs(data) -> list[pairs_lib.Pair]:
  """The pairs of `data`'s training split (an `experiment.SplitData`)."""
  return pairs_lib.training_pairs(data.records, data.splits, data.classes)


def unpaired_stream_records(data) -> list:
  """The records of the class-group stream that runs beside the paired one (the release's split, spec 8): the
  training WLI images in no pair and every training NBI image."""
  return pairs_lib.unpaired_stream_records(data.records, data.splits, training_pairs(data))


@dataclasses.dataclass(frozen=True)
class PairedStream:
  """The paired stream: batches {"wli", "nbi": (B, H, W, 3) uint8, "label": (B,) int32}, B = data.paired_batch_size,
  split over the devices along B.

  update_factory(model, tx, config, steps_per_epoch) -> update(state, batch, *frozen) -> (state, metrics): the
  paired update (steps_per_epoch counts the updates of all streams, see `trainer`).
  """

  update_factory: Callable
  name: str = "paired"

  def make_iterator(self, config, data, process_index: int, process_count: int):
    """(iterator, steps per epoch) of the paired batches; fewer than data.paired_batch_size training pairs raise
    ValueError naming the count found (`pairs.require_pairs`)."""
    pairs = training_pairs(data)
    batch_size = config.data.paired_batch_size
    pairs_lib.require_pairs(pairs, batch_size)
    iterator = pair_batches.make_paired_iterator(
        pairs, classes=data.classes, batch_size=batch_size, image_size=config.data.image_size,
        aug_config=config.data.augment, seed=config.seed, process_index=process_index, process_count=process_count,
        num_workers=config.data.num_workers, worker_buffer_size=config.data.worker_buffer_size)
    return iterator, pair_batches.steps_per_epoch(pairs, batch_size)

  def batch_layout(self, config) -> dict:
    """{key: (global shape, split over the devices along its first axis)}."""
    b, size = config.data.paired_batch_size, config.data.image_size
    return {"wli": ((b, size, size, 3), True), "nbi": ((b, size, size, 3), True), "label": ((b,), True)}

  def images_per_step(self, config) -> int:
    """Images a step decodes (both images of each pair), for the images/s of the progress line."""
    return 2 * config.data.paired_batch_size

  def make_update(self, model, tx, config, steps_per_epoch: int) -> Callable:
    return self.update_factory(model, tx, config, steps_per_epoch)
