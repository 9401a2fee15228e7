"""ADD on pairs (stage "add", spec 9): the paper's strongest paired baseline (MICCAI 2025, the same authors' paired
predecessor of PaGKD).

The NBI teacher first (as stage "pagkd": trained in WORKDIR/teacher unless `config.teacher.workdir` names one), then
a WLI classifier trained on the pairs of the training split alone (`streams.PairedStream`; the class-group stream
does not run) with

  L = CE(student(WLI), label)                                                     before step W,
  L = CE + add.dense_weight * L_dense + add.logit_weight * (1 - cos(z_s, stop_gradient(z_t)))   from step W on,

W = round(add.warmup_epochs * steps per epoch) (the spec's 15 CE-only epochs). L_dense is the per-image dense loss of
section 8 in both directions (`paired_losses.bidirectional_dense_pair_loss`) with relation value 0 for ambiguous
positions (ADD's, not PaGKD's 0.5), on the layer4 maps themselves: the student's of the WLI image (B, h, w, F) and
the frozen teacher's (inference mode) of the paired NBI image, which share F (one architecture), with each image's
CAM + PAR region labels (spec 5.1-5.3, config.distill's thresholds). z_s, z_t: the student's logits of the WLI image
and the teacher's of the NBI image (`paired_losses.logit_alignment_loss`).

Choices the spec leaves open, made here: no projection before the dense loss (the spec names none for ADD), and both
weights 1. The spec's optimiser (Adam 1e-4, L2 1e-8) and batch of 16 pairs are config values (optim.*,
data.paired_batch_size), not forced here. With `paired_method.unpaired` ("+ unpaired") the same loss is trained on
the class-group stream over every training image instead, each WLI image with a random NBI image of its class
(`streams.groups_as_pairs`); steps per epoch, and so the warm-up, are then the class-group stream's.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from pagkd_jax.distill import pagkd
from pagkd_jax.distill import paired_losses
from pagkd_jax.methods import pagkd as pagkd_method
from pagkd_jax.methods import streams


def warmup_steps(config, steps_per_epoch: int) -> int:
  """Updates of cross-entropy only before the distillation terms (add.warmup_epochs)."""
  return int(round(config.add.warmup_epochs * steps_per_epoch))


def make_add_loss(model, config, steps_per_epoch: int) -> Callable:
  """loss_fn(params, batch_stats, step, batch, teacher) -> (loss, (terms, new_batch_stats)) of a paired batch.

  params, batch_stats: the student's; batch = {"wli", "nbi": (B, H, W, 3) uint8, "label": (B,) int32}, row i of both
  images the same pair; teacher: the frozen NBI teacher's variables. See the module docstring for L.
  """
  normalization = config.data.normalization
  dense_weight, logit_weight = float(config.add.dense_weight), float(config.add.logit_weight)
  start = warmup_steps(config, steps_per_epoch)
  d = config.distill

  def loss_fn(params, batch_stats, step, batch, teacher):
    labels = batch["label"]
    s = streams.student_on_pairs(model, {"params": params, "batch_stats": batch_stats}, batch, normalization)

    def distillation(params, s_features, logits):
      t_logits, t_features = jax.lax.stop_gradient(model.apply(teacher, s.x_nbi, train=False))
      regions_wli = pagkd.region_labels(s.x_wli, s_features, params["fc"]["kernel"], labels, d)
      regions_nbi = pagkd.region_labels(s.x_nbi, t_features, teacher["params"]["fc"]["kernel"], labels, d)
      dense = paired_losses.bidirectional_dense_pair_loss(s_features, t_features, regions_wli, regions_nbi,
                                                          paired_losses.ADD_AMBIGUOUS_WEIGHT)
      return dense, paired_losses.logit_alignment_loss(logits, t_logits)

    zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    if dense_weight or logit_weight:
      loss_dense, loss_logit = jax.lax.cond(step >= start, distillation, lambda *_: zeros, params, s.features,
                                            s.logits)
    else:
      loss_dense, loss_logit = zeros
    loss = s.loss_cls + dense_weight * loss_dense + logit_weight * loss_logit
    terms = {"loss_cls": s.loss_cls, "loss_dense": loss_dense, "loss_logit": loss_logit, "accuracy": s.accuracy,
             "distill_on": (step >= start).astype(jnp.float32)}
    return loss, (terms, s.batch_stats)

  return loss_fn


def make_add_update(model, tx, config, steps_per_epoch: int) -> Callable:
  """update(state, batch, teacher) -> (state, metrics): one optimiser step of `make_add_loss`."""
  loss_fn = make_add_loss(model, config, steps_per_epoch)

  return streams.gradient_update(loss_fn, tx)


@dataclasses.dataclass(frozen=True)
class ADDProgram(streams.PairedMethodProgram):
  """What `trainer.run_stage` trains in stage "add": the WLI classifier, on the paired stream alone or "+ unpaired"
  (`streams.PairedMethodProgram`). `frozen` = (teacher variables,)."""

  paired_update = staticmethod(make_add_update)

  def selection_warmup_steps(self, config, steps_per_epoch: int) -> int:
    """The CE-only warm-up: with `train.select_after_warmup`, the best checkpoint is chosen among the steps after
    it."""
    return warmup_steps(config, steps_per_epoch)


def train(config, workdir: str, run_stage: Callable) -> dict:
  """The NBI teacher (trained in WORKDIR/teacher unless config.teacher.workdir names one; fewer training pairs than
  data.paired_batch_size fail before it), then the ADD student in `workdir`."""
  unpaired = bool(config.paired_method.unpaired)
  teacher = pagkd_method.nbi_teacher(config, workdir, run_stage, needs_pairs=not unpaired)
  return run_stage(config, workdir, ADDProgram(frozen=(teacher,), unpaired=unpaired))
