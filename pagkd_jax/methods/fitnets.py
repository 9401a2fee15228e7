"""FitNets on pairs (stage "fitnets", spec 9): one of the paired comparison methods the paper reports.

The NBI teacher first (as stage "pagkd": trained in WORKDIR/teacher unless `config.teacher.workdir` names one), then
a WLI classifier trained on the pairs of the training split alone (`streams.PairedStream`, the class-group stream
does not run) with

  L = CE(student(WLI), label) + fitnets.weight * MSE(f_s W + b, stop_gradient(f_t)),

f_s the student's layer4 map of the WLI image (B, h, w, F), f_t the frozen teacher's (inference mode) of the paired
NBI image, W (F, F) and b (F,) the trainable regressor, a 1x1 convolution (`paired_losses.fitnets_loss`; both nets
share the architecture, so F is the same). The spec gives no weight; fitnets.weight = 1 adds the hint to CE as the
KD term is. The hint is on from the first step (no separate hint-training stage). The regressor is trained with the
student by the same optimiser and is not shipped: the best checkpoint holds the student alone.

With `paired_method.unpaired` ("+ unpaired") the same loss is trained on the class-group stream over every training
image instead, each WLI image with a random NBI image of its class (`streams.groups_as_pairs`).
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from pagkd_jax.distill import paired_losses
from pagkd_jax.methods import classifier
from pagkd_jax.methods import pagkd as pagkd_method
from pagkd_jax.methods import streams
from pagkd_jax.training.train_state import TrainState

# Folded into the run's key for the regressor's initialisation; the student uses the key itself (as the baseline).
REGRESSOR_KEY_TAG = 1


def init_regressor(rng, features: int) -> dict:
  """The 1x1 convolution F -> F: {"kernel": (F, F) LeCun-normal, as flax's Conv, "bias": (F,) zeros}."""
  kernel = jax.nn.initializers.lecun_normal()(rng, (features, features), jnp.float32)
  return {"kernel": kernel, "bias": jnp.zeros((features,), jnp.float32)}


def make_fitnets_loss(model, config) -> Callable:
  """loss_fn(params, batch_stats, batch, teacher) -> (loss, (terms, new_batch_stats)) of a paired batch.

  params = {"student", "regressor"}; batch_stats = {"student"}; batch = {"wli", "nbi": (B, H, W, 3) uint8,
  "label": (B,) int32}, row i of both images the same pair; teacher: the frozen NBI teacher's variables.
  L = CE + fitnets.weight * paired_losses.fitnets_loss(student layer4 map, W, teacher layer4 map, b).
  """
  normalization = config.data.normalization
  weight = float(config.fitnets.weight)

  def loss_fn(params, batch_stats, batch, teacher):
    s = streams.student_on_pairs(model, {"params": params["student"], "batch_stats": batch_stats["student"]}, batch,
                                 normalization)
    _, t_features = model.apply(teacher, s.x_nbi, train=False)
    loss_hint = paired_losses.fitnets_loss(s.features, params["regressor"]["kernel"],
                                           jax.lax.stop_gradient(t_features), params["regressor"]["bias"])
    terms = {"loss_cls": s.loss_cls, "loss_hint": loss_hint, "accuracy": s.accuracy}
    return s.loss_cls + weight * loss_hint, (terms, {"student": s.batch_stats})

  return loss_fn


def make_fitnets_update(model, tx, config, steps_per_epoch: int) -> Callable:
  """update(state, batch, teacher) -> (state, metrics): one optimiser step of `make_fitnets_loss`."""
  del steps_per_epoch  # No schedule of its own beyond the optimiser's.
  loss_fn = make_fitnets_loss(model, config)

  return streams.gradient_update(lambda params, batch_stats, step, batch, teacher: loss_fn(
      params, batch_stats, batch, teacher), tx)


@dataclasses.dataclass(frozen=True)
class FitNetsProgram(streams.PairedMethodProgram):
  """What `trainer.run_stage` trains in stage "fitnets": the WLI classifier and the regressor, on the paired stream
  alone or "+ unpaired" (`streams.PairedMethodProgram`). `frozen` = (teacher variables,)."""

  paired_update = staticmethod(make_fitnets_update)

  def init_state(self, model, tx, rng, config, backbone=None) -> TrainState:
    """The student exactly as the baseline starts (`classifier.init_classifier` from `rng`); the regressor from a key
    folded from `rng`, sized by the layer4 map's channels."""
    size = config.data.image_size
    student = classifier.init_classifier(model, rng, config, backbone)
    _, features = jax.eval_shape(lambda: model.apply(student, jnp.zeros((1, size, size, 3)), train=False))
    params = {"student": student["params"],
              "regressor": init_regressor(jax.random.fold_in(rng, REGRESSOR_KEY_TAG), features.shape[-1])}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats={"student": student["batch_stats"]}, opt_state=tx.init(params))

  def eval_variables(self, state: TrainState) -> dict:
    return {"params": state.params["student"], "batch_stats": state.batch_stats["student"]}


def train(config, workdir: str, run_stage: Callable) -> dict:
  """The NBI teacher (trained in WORKDIR/teacher unless config.teacher.workdir names one; fewer training pairs than
  data.paired_batch_size fail before it), then the FitNets student in `workdir`."""
  unpaired = bool(config.paired_method.unpaired)
  teacher = pagkd_method.nbi_teacher(config, workdir, run_stage, needs_pairs=not unpaired)
  return run_stage(config, workdir, FitNetsProgram(frozen=(teacher,), unpaired=unpaired))
