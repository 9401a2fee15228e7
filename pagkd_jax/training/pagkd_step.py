"""Stage 2: the WLI student trained with cross-entropy plus GKD-Pro and GKD-Den from a frozen NBI teacher.

The teacher runs in inference mode (BatchNorm running statistics) under stop_gradient; its variables are an
input of the update, never trained, never donated and not checkpointed with the student. The student, its head
and the distillation heads share one optimiser. Distillation starts after `distill.warmup_epochs` of
cross-entropy only (a `lax.cond`, so the warm-up does not pay for it). Until then the heads get no gradient, and,
as torch's Adam does with such parameters, the optimiser leaves them and their Adam state untouched (the
optimiser's `gated_params`, see `optimizer.make_optimizer`).
"""

import copy
import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from absl import logging

from pagkd_jax import checkpointing
from pagkd_jax import experiment
from pagkd_jax import mesh as mesh_lib
from pagkd_jax.data.normalization import normalize_images
from pagkd_jax.distill import pagkd
from pagkd_jax.training import classifier_step
from pagkd_jax.training.classifier_step import flatten_groups, group_labels
from pagkd_jax.training.train_state import TrainState


def unflatten_groups(x: jax.Array, num_classes: int) -> jax.Array:
  """Inverse of `flatten_groups`: (K * C, ...) -> (C, K, ...)."""
  return jnp.swapaxes(x.reshape((-1, num_classes) + x.shape[1:]), 0, 1)


# Folded into the run's key for the distillation heads' initialisation; the student uses the key itself.
HEADS_KEY_TAG = 1


def make_heads(config, num_classes: int) -> pagkd.DistillationHeads:
  from pagkd_jax.models.resnet import DTYPES
  return pagkd.DistillationHeads(config.distill, num_classes, dtype=DTYPES[config.model.dtype])


@dataclasses.dataclass(frozen=True)
class PaGKDProgram:
  """What `trainer.run_stage` trains in stage "pagkd". `frozen` = (teacher variables,). `gated_params`: the
  parameter groups the optimiser updates only while distillation is on (`optimizer.make_optimizer`)."""

  frozen: tuple
  modalities: tuple = ("wli", "nbi")
  gated_params: tuple = ("heads",)

  def init_state(self, model, tx, rng, config, backbone=None) -> TrainState:
    """The student exactly as the baseline starts (`classifier_step.init_classifier` from `rng`, with `backbone`:
    pretrained variables, all but the head, that replace it); the distillation heads from a key folded from `rng`."""
    size, num_classes, k = config.data.image_size, len(config.data.classes), config.data.group_size
    student = classifier_step.init_classifier(model, rng, config, backbone)
    heads_rng = jax.random.fold_in(rng, HEADS_KEY_TAG)
    _, features = jax.eval_shape(lambda: model.apply(student, jnp.zeros((1, size, size, 3)), train=False))
    _, h, w, f = features.shape
    groups = num_classes * k if config.distill.level == "image" else num_classes
    per_group = 1 if config.distill.level == "image" else k
    feats = jnp.zeros((groups, per_group, h, w, f), jnp.float32)
    regions = jnp.zeros((groups, per_group, h, w), jnp.int8)
    heads = make_heads(config, num_classes).init(heads_rng, feats, feats, jnp.arange(groups) % num_classes,
                                                 regions, regions)
    params = {"student": student["params"], "heads": heads["params"]}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats={"student": student["batch_stats"]}, opt_state=tx.init(params))

  def make_update(self, model, tx, config, steps_per_epoch: int) -> Callable:
    return make_pagkd_update(model, make_heads(config, len(config.data.classes)), tx, config, steps_per_epoch)

  def eval_variables(self, state: TrainState) -> dict:
    return {"params": state.params["student"], "batch_stats": state.batch_stats["student"]}


def make_pagkd_loss(model, heads, config, steps_per_epoch: int) -> Callable:
  """loss_fn(params, batch_stats, step, batch, teacher) -> (loss, (terms, new_batch_stats)).

  params = {"student", "heads"}; batch = {"wli", "nbi": (C, K, H, W, 3) uint8, "label": (C,)}; teacher =
  the frozen teacher's variables. L = CE + lambda_pro L_pro + lambda_den L_den (spec 6), distillation from
  step `warmup_epochs * steps_per_epoch` on.
  """
  d = config.distill
  pagkd.check_config(d)
  lambda_pro = pagkd.resolved(d, "lambda_pro") if d.use_pro else 0.0
  lambda_den = d.lambda_den if d.use_den else 0.0
  warmup_steps = experiment.distillation_warmup_steps(config, steps_per_epoch)
  normalization = config.data.normalization
  pairing_key = jax.random.key(config.seed + 1)

  def loss_fn(params, batch_stats, step, batch, teacher):
    num_classes, k = batch["wli"].shape[:2]
    labels = group_labels(batch["label"], k)  # (K * C,)
    x_wli = normalize_images(flatten_groups(batch["wli"]), normalization)
    x_nbi = normalize_images(flatten_groups(batch["nbi"]), normalization)
    _, t_features = model.apply(teacher, x_nbi, train=False)
    t_features = jax.lax.stop_gradient(t_features)
    t_kernel = jax.lax.stop_gradient(teacher["params"]["fc"]["kernel"])

    def distillation(params, s_features):
      regions_wli = pagkd.region_labels(x_wli, s_features, params["student"]["fc"]["kernel"], labels, d)
      regions_nbi = pagkd.region_labels(x_nbi, t_features, t_kernel, labels, d)
      grouped = [unflatten_groups(a, num_classes) for a in (s_features, t_features, regions_wli, regions_nbi)]
      g_labels = batch["label"]
      if d.level == "image":  # Each WLI image with one random same-class NBI image: C * K groups of one.
        rng = jax.random.fold_in(pairing_key, step)
        grouped[1] = pagkd.pair_images(grouped[1], rng)
        grouped[3] = pagkd.pair_images(grouped[3], rng)
        grouped = [a.reshape((num_classes * k, 1) + a.shape[2:]) for a in grouped]
        g_labels = jnp.repeat(batch["label"], k)
      return heads.apply({"params": params["heads"]}, grouped[0], grouped[1], g_labels, grouped[2], grouped[3])

    (logits, s_features), new_vars = model.apply(
        {"params": params["student"], "batch_stats": batch_stats["student"]}, x_wli, train=True,
        mutable=["batch_stats"])
    loss_cls = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    if lambda_pro or lambda_den:
      shapes = jax.eval_shape(distillation, params, s_features)
      terms = jax.lax.cond(step >= warmup_steps, distillation,
                           lambda *_: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                           params, s_features)
    else:
      terms = {"loss_pro": jnp.zeros(()), "loss_den": jnp.zeros(())}
    loss = loss_cls + lambda_pro * terms["loss_pro"] + lambda_den * terms["loss_den"]
    terms = {"loss_cls": loss_cls, **terms, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
             "distill_on": (step >= warmup_steps).astype(jnp.float32)}
    return loss, (terms, {"student": new_vars["batch_stats"]})

  return loss_fn


def make_pagkd_update(model, heads, tx, config, steps_per_epoch: int) -> Callable:
  """update(state, batch, teacher) -> (state, metrics): one optimiser step of `make_pagkd_loss`.

  The update passes `gated_on` (distillation on at this step) to `tx`, so an optimiser built with
  `gated_params=("heads",)` leaves the heads untouched while they get no gradient (any other `tx` ignores it).
  """
  loss_fn = make_pagkd_loss(model, heads, config, steps_per_epoch)
  d = config.distill
  heads_trained = bool((d.use_pro and pagkd.resolved(d, "lambda_pro")) or (d.use_den and d.lambda_den))
  heads_from = int(round(d.warmup_epochs * steps_per_epoch))  # As make_pagkd_loss's warm-up.
  tx = optax.with_extra_args_support(tx)

  def update(state: TrainState, batch, teacher):
    (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, state.step, batch, teacher)
    heads_on = jnp.logical_and(heads_trained, state.step >= heads_from)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, gated_on=heads_on)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, **terms,
               "grad_norm": jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics

  return update


def teacher_config(config):
  """The student's config with stage "teacher": the teacher trained on the same data and split."""
  tcfg = copy.deepcopy(config)
  tcfg.stage = "teacher"
  return tcfg


def load_teacher(teacher_dir: str, config, model) -> Any:
  """The best NBI-teacher variables of `teacher_dir`, checked against the student's config."""
  from pagkd_jax.evaluation.evaluator import load_config
  tcfg = load_config(teacher_dir)
  for section, name in (("model", "name"), ("data", "classes"), ("data", "image_size")):
    theirs, ours = tcfg[section][name], config[section][name]
    if isinstance(ours, (list, tuple)):
      theirs, ours = list(theirs), list(ours)
    if theirs != ours:
      raise ValueError(f"The teacher in {teacher_dir} has {section}.{name} = {theirs!r} but the student's config "
                       f"has {ours!r}.")
  if tcfg.stage != "teacher":
    raise ValueError(f"{teacher_dir} holds a {tcfg.stage!r} run, not an NBI teacher.")
  size = config.data.image_size
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  mesh = mesh_lib.make_mesh()
  abstract = checkpointing.abstract_like(dict(abstract), mesh_lib.replicated(mesh))
  variables, step, kind = checkpointing.restore_model_variables(teacher_dir, abstract, "best")
  logging.info("Teacher: %s checkpoint of step %d from %s", kind, step, teacher_dir)
  return variables


def train_student(config, workdir: str, run_stage: Callable) -> dict:
  """Stage 2, with stage 1 first when needed: trains the NBI teacher in WORKDIR/teacher unless
  `config.teacher.workdir` names one (both resume), then the student in WORKDIR."""
  workdir = os.path.abspath(workdir)
  teacher_dir = config.teacher.workdir or os.path.join(workdir, "teacher")
  if not config.teacher.workdir:
    logging.info("Stage 1: NBI teacher in %s", teacher_dir)
    run_stage(teacher_config(config), teacher_dir, classifier_step.ClassifierProgram("nbi"))
  elif not os.path.isdir(teacher_dir):
    raise FileNotFoundError(f"config.teacher.workdir={teacher_dir} does not exist.")
  model = experiment.build_model(config)
  teacher = load_teacher(teacher_dir, config, model)
  logging.info("Stage 2: WLI student with %s-variant %s-level distillation in %s", config.distill.variant,
               config.distill.level, workdir)
  return run_stage(config, workdir, PaGKDProgram(frozen=(teacher,)))
