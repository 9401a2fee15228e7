"""Hinton knowledge distillation on pairs (stage "kd", spec 9): one of the paired comparison methods the paper reports.

The NBI teacher first (as stage "pagkd": trained in WORKDIR/teacher unless `config.teacher.workdir` names one), then
a WLI classifier trained on the pairs of the training split alone: each step takes `data.paired_batch_size` pairs
(`streams.PairedStream`: both images of a pair under one augmentation draw; the class-group stream does not run) and
minimises

  L = CE(student(WLI), label) + T^2 KL(softmax(teacher(NBI) / T) || softmax(student(WLI) / T)),  T = 4,

the teacher in inference mode (BatchNorm running statistics) under stop_gradient (`paired_losses.hinton_kd_loss`).
There is no warm-up: the KD term is on from the first step. The shipped model is the student alone (a plain
classifier). What a method supplies: the `pagkd_jax.methods` docstring.

With `paired_method.unpaired` ("+ unpaired", the paper's fair setting) the same loss is trained on the class-group
stream over every training image instead, each WLI image with a random NBI image of its class
(`streams.groups_as_pairs`), and the data need no pairs.
"""

import dataclasses
from typing import Callable

import jax

from pagkd_jax.distill import paired_losses
from pagkd_jax.methods import pagkd as pagkd_method
from pagkd_jax.methods import streams


def make_kd_loss(model, config) -> Callable:
  """loss_fn(params, batch_stats, batch, teacher) -> (loss, (terms, new_batch_stats)) of a paired batch.

  params, batch_stats: the student's; batch = {"wli", "nbi": (B, H, W, 3) uint8, "label": (B,) int32}, row i of both
  images the same pair; teacher: the frozen NBI teacher's {"params", "batch_stats"}.
  L = CE(student logits of WLI) + paired_losses.hinton_kd_loss(student logits, teacher logits of NBI).
  """
  normalization = config.data.normalization

  def loss_fn(params, batch_stats, batch, teacher):
    s = streams.student_on_pairs(model, {"params": params, "batch_stats": batch_stats}, batch, normalization)
    t_logits, _ = model.apply(teacher, s.x_nbi, train=False)
    loss_kd = paired_losses.hinton_kd_loss(s.logits, jax.lax.stop_gradient(t_logits))
    terms = {"loss_cls": s.loss_cls, "loss_kd": loss_kd, "accuracy": s.accuracy}
    return s.loss_cls + loss_kd, (terms, s.batch_stats)

  return loss_fn


def make_kd_update(model, tx, config, steps_per_epoch: int) -> Callable:
  """update(state, batch, teacher) -> (state, metrics): one optimiser step of `make_kd_loss`."""
  del steps_per_epoch  # No schedule of its own beyond the optimiser's.
  loss_fn = make_kd_loss(model, config)

  return streams.gradient_update(lambda params, batch_stats, step, batch, teacher: loss_fn(
      params, batch_stats, batch, teacher), tx)


@dataclasses.dataclass(frozen=True)
class HintonKDProgram(streams.PairedMethodProgram):
  """What `trainer.run_stage` trains in stage "kd": the WLI classifier, on the paired stream alone or "+ unpaired"
  (`streams.PairedMethodProgram`). `frozen` = (teacher variables,)."""

  paired_update = staticmethod(make_kd_update)


def train(config, workdir: str, run_stage: Callable) -> dict:
  """The NBI teacher (trained in WORKDIR/teacher unless config.teacher.workdir names one; fewer training pairs than
  data.paired_batch_size fail before it), then the KD student in `workdir`."""
  unpaired = bool(config.paired_method.unpaired)
  teacher = pagkd_method.nbi_teacher(config, workdir, run_stage, needs_pairs=not unpaired)
  return run_stage(config, workdir, HintonKDProgram(frozen=(teacher,), unpaired=unpaired))
