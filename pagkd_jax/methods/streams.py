"""Extra training streams a method's program can add beside the class-group stream (`program.extra_streams`).

A stream is what the trainer needs to run it (the `pagkd_jax.methods` docstring): a `name`, an iterator with its
steps per epoch, the layout of its batches over the device mesh and a pure update. `PairedStream` is the paired
stream of "PaGKD (all)" (spec 8): batches of `data.paired_batch_size` pairs of the training split
(`pagkd_jax.data.pair_batches`), each pair's two images under one augmentation draw.
"""

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from pagkd_jax.data import pair_batches
from pagkd_jax.data.normalization import normalize_images
from pagkd_jax.data import pairs as pairs_lib
from pagkd_jax.distill import pagkd
from pagkd_jax.methods import classifier
from pagkd_jax.training.train_state import TrainState, create_train_state


def gradient_update(loss_fn: Callable, tx) -> Callable:
  """update(state, batch, teacher) -> (state, metrics): one optimiser step of
  loss_fn(params, batch_stats, step, batch, teacher) -> (loss, (terms, new batch_stats)); metrics are the loss, the
  terms and the global gradient norm. The update of every method trained on pairs (KD, FitNets, ADD)."""

  def update(state, batch, teacher):
    (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, state.step, batch, teacher)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = {"loss": loss, **terms,
               "grad_norm": jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))}
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=batch_stats, opt_state=opt_state), metrics

  return update


class StudentOnPairs(NamedTuple):
  """What every paired loss starts from (`student_on_pairs`)."""
  x_wli: jax.Array  # (B, H, W, 3) normalised WLI images.
  x_nbi: jax.Array  # (B, H, W, 3) normalised NBI images, row i the partner of WLI image i.
  logits: jax.Array  # (B, C) the student's, on the WLI images, in training mode.
  features: jax.Array  # (B, h, w, F) the student's layer4 maps of the WLI images.
  loss_cls: jax.Array  # () mean cross-entropy of the logits against batch["label"].
  accuracy: jax.Array  # () training accuracy of the logits.
  batch_stats: dict  # The student's BatchNorm statistics after the pass.


def student_on_pairs(model, variables: dict, batch: dict, normalization: str) -> StudentOnPairs:
  """The student's training-mode pass on the WLI images of a paired batch {"wli", "nbi": (B, H, W, 3) uint8,
  "label": (B,)} with its cross-entropy; `variables` = the student's {"params", "batch_stats"}."""
  x_wli = normalize_images(batch["wli"], normalization)
  x_nbi = normalize_images(batch["nbi"], normalization)
  (logits, features), new_vars = model.apply(variables, x_wli, train=True, mutable=["batch_stats"])
  labels = batch["label"]
  return StudentOnPairs(x_wli, x_nbi, logits, features,
                        optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(),
                        jnp.mean(jnp.argmax(logits, -1) == labels), new_vars["batch_stats"])


def training_pairs(data) -> list[pairs_lib.Pair]:
  """The pairs of `data`'s training split (an `experiment.SplitData`)."""
  return pairs_lib.training_pairs(data.records, data.splits, data.classes)


def unpaired_stream_records(data) -> list:
  """The records of the class-group stream that runs beside the paired one (the release's split, spec 8): the
  training WLI images in no pair and every training NBI image."""
  return pairs_lib.unpaired_stream_records(data.records, data.splits, training_pairs(data))


# Folded into jax.random.key(config.seed) for the "+ unpaired" pairing of `groups_as_pairs`.
UNPAIRED_PAIRING_TAG = 11


def groups_as_pairs(paired_update: Callable, config) -> Callable:
  """The class-group update of a paired method's "+ unpaired" variant (spec 9): update(state, batch, *frozen) that
  turns the class-group batch {"wli", "nbi": (C, K, H, W, 3), "label": (C,)} into a batch of C * K pairs, each WLI
  image with a random NBI image of its class (a permutation within each class drawn from the step, as the
  image-level ablation pairs them: `pagkd.pair_images`), and calls `paired_update(state, pairs, *frozen)` on
  {"wli", "nbi": (K * C, H, W, 3), "label": (K * C,)} (`classifier.flatten_groups` order)."""
  key = jax.random.fold_in(jax.random.key(config.seed), UNPAIRED_PAIRING_TAG)

  def update(state, batch, *frozen):
    k = batch["wli"].shape[1]
    nbi = pagkd.pair_images(batch["nbi"], jax.random.fold_in(key, state.step))
    pairs = {"wli": classifier.flatten_groups(batch["wli"]), "nbi": classifier.flatten_groups(nbi),
             "label": classifier.group_labels(batch["label"], k)}
    return paired_update(state, pairs, *frozen)

  return update


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


@dataclasses.dataclass(frozen=True)
class PairedMethodProgram:
  """The streams of a paired comparison method's program (spec 9; subclasses add the class attribute
  `paired_update(model, tx, config, steps_per_epoch) -> update(state, pairs, *frozen)`, and override init_state and
  eval_variables when the state holds more than the WLI classifier).

  On pairs (`unpaired=False`): the paired stream alone (no modalities, so no class-group stream). "+ unpaired"
  (`unpaired=True`, config.paired_method.unpaired): the class-group stream over every training image instead, each
  WLI image with a random same-class NBI image (`groups_as_pairs`), and no paired stream.
  """

  frozen: tuple
  unpaired: bool = False

  @property
  def modalities(self) -> tuple:
    return ("wli", "nbi") if self.unpaired else ()

  @property
  def extra_streams(self) -> tuple:
    return () if self.unpaired else (PairedStream(self.paired_update),)

  def make_update(self, model, tx, config, steps_per_epoch: int) -> Callable:
    """The class-group update of the "+ unpaired" variant."""
    return groups_as_pairs(self.paired_update(model, tx, config, steps_per_epoch), config)

  def init_state(self, model, tx, rng, config, backbone=None) -> TrainState:
    """The student exactly as the baseline starts (`classifier.init_classifier`)."""
    return create_train_state(classifier.init_classifier(model, rng, config, backbone), tx)

  def eval_variables(self, state: TrainState) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}
