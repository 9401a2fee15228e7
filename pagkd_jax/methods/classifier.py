"""The single-modality methods (stages "teacher" and "baseline"): the NBI teacher and the WLI-only baseline.

Cross-entropy on a class-group batch {modality: (C, K, H, W, 3) uint8, "label": (C,)}; the modality is the stage's
(`methods.stage_modality`). The update is pure; the trainer jits it once with explicit shardings and donates the
state. What a method supplies: the `pagkd_jax.methods` docstring.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from pagkd_jax import methods
from pagkd_jax.data.normalization import normalize_images
from pagkd_jax.models import pretrained
from pagkd_jax.training.train_state import TrainState, create_train_state


def flatten_groups(x: jax.Array) -> jax.Array:
  """(C, K, ...) -> (K * C, ...), K-major, so a device's K-shard stays one contiguous block of the batch."""
  return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])


def group_labels(labels: jax.Array, group_size: int) -> jax.Array:
  """(C,) class of each group -> (K * C,) label of each image of `flatten_groups`."""
  return jnp.tile(labels, group_size)


def make_classifier_update(model, tx, *, modality: str, normalization: str) -> Callable:
  """Returns update(state, batch) -> (state, metrics) for cross-entropy training on `modality`."""

  def update(state: TrainState, batch):
    images = batch[modality]
    labels = group_labels(batch["label"], images.shape[1])
    x = normalize_images(flatten_groups(images), normalization)

    def loss_fn(params):
      (logits, _), new_vars = model.apply({"params": params, "batch_stats": state.batch_stats}, x, train=True,
                                          mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, (logits, new_vars["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "loss_cls": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "grad_norm": jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))),
    }
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics

  return update


def init_classifier(model, rng, config, backbone=None) -> dict:
  """The classifier's {"params", "batch_stats"} before training: random from `rng`, every variable that `backbone`
  (pretrained variables, all but the head) holds replaced by it. Every stage starts its classifier (teacher,
  baseline, stage-2 student) here, so the same seed gives the WLI baseline and the student the same start."""
  size = config.data.image_size
  variables = model.init(rng, jnp.zeros((1, size, size, 3), jnp.float32), train=False)
  if backbone is not None:
    variables = pretrained.overlay(variables, backbone)
  return variables


@dataclasses.dataclass(frozen=True)
class ClassifierProgram:
  """What `trainer.run_stage` trains for the teacher and baseline stages: the ResNet alone, on `modality`."""

  modality: str
  frozen: tuple = ()

  @property
  def modalities(self) -> tuple[str, ...]:
    return (self.modality,)

  def init_state(self, model, tx, rng, config, backbone=None) -> TrainState:
    """`init_classifier`; `backbone`: pretrained variables (all but the head) that replace the random ones."""
    return create_train_state(init_classifier(model, rng, config, backbone), tx)

  def make_update(self, model, tx, config, steps_per_epoch: int) -> Callable:
    del steps_per_epoch  # No schedule of its own beyond the optimiser's.
    return make_classifier_update(model, tx, modality=self.modality, normalization=config.data.normalization)

  def eval_variables(self, state: TrainState) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


def train(config, workdir: str, run_stage: Callable) -> dict:
  """Trains the classifier of `config.stage` ("teacher": NBI, "baseline": WLI) in `workdir`."""
  return run_stage(config, workdir, ClassifierProgram(methods.stage_modality(config.stage)))
