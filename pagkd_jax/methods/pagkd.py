"""The PaGKD method (stage "pagkd"): the NBI teacher (`classifier`), then the WLI student trained with
cross-entropy plus GKD-Pro and GKD-Den from the frozen teacher. What a method supplies: the `pagkd_jax.methods`
docstring.

The teacher runs in inference mode (BatchNorm running statistics) under stop_gradient; its variables are an
input of the update, never trained, never donated and not checkpointed with the student. The student, its head
and the distillation heads share one optimiser. Distillation starts after `distill.warmup_epochs` of
cross-entropy only (a `lax.cond`, so the warm-up does not pay for it). Until then the heads get no gradient, and,
as torch's Adam does with such parameters, the optimiser leaves them and their Adam state untouched (the
optimiser's `gated_params`, see `optimizer.make_optimizer`).

With `distill.paired` ("PaGKD (all)", spec 8) the student also trains on the pairs of the training split: a paired
stream (`streams.PairedStream`, one step before each class-group step) whose loss is CE on the paired WLI images
plus, after the same warm-up, lambda_den times a dense loss in both directions between the distillation heads' 1x1
embeddings (student_embed of the WLI map, teacher_embed of the frozen teacher's map of the paired NBI image) with
each image's own CAM + PAR region labels. `distill.paired_loss` chooses it (None: the variant's): "paper", the SRCA
of the group loss with each pair a group of one, the MSE (`paired_losses.srca_pair_loss`, the same projections);
"release", relation values {1, 0, 0.5}, -1e9 fill, 1 - cos (`paired_losses.bidirectional_dense_pair_loss`). No
GKD-Pro on paired batches. The class-group stream then draws the unpaired WLI images and all NBI images
(`streams.unpaired_stream_records`).
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
from pagkd_jax.distill import paired_losses
from pagkd_jax.methods import classifier
from pagkd_jax.methods import streams
from pagkd_jax.methods.classifier import flatten_groups, group_labels
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
  paired: bool = False  # Also the paired stream (config.distill.paired).

  @property
  def extra_streams(self) -> tuple:
    return (streams.PairedStream(make_paired_update_factory),) if self.paired else ()

  def train_records(self, data) -> list:
    """With the paired stream, the class-group stream's records are the release's split (spec 8)."""
    return streams.unpaired_stream_records(data) if self.paired else data.select("train", None)

  def init_state(self, model, tx, rng, config, backbone=None) -> TrainState:
    """The student exactly as the baseline starts (`classifier.init_classifier` from `rng`, with `backbone`:
    pretrained variables, all but the head, that replace it); the distillation heads from a key folded from `rng`."""
    size, num_classes, k = config.data.image_size, len(config.data.classes), config.data.group_size
    student = classifier.init_classifier(model, rng, config, backbone)
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

  def selection_warmup_steps(self, config, steps_per_epoch: int) -> int:
    """The cross-entropy warm-up: with `train.select_after_warmup`, the best checkpoint is chosen among the steps
    after it (those with distillation on). The control with both losses off has the same warm-up, so it is compared
    with the distilling arms on equal terms."""
    return experiment.distillation_warmup_steps(config, steps_per_epoch)

  def eval_variables(self, state: TrainState) -> dict:
    return {"params": state.params["student"], "batch_stats": state.batch_stats["student"]}


def layer4_gradient_norms(head_terms: Callable, s_features: jax.Array, weights: dict) -> dict:
  """Diagnostics: the global L2 norm of the gradient that each weighted loss term sends into the student's
  layer4 map f, ||weight * d term / d f|| over the whole (B, h, w, F) gradient, as "diag/grad_<name>_layer4".

  `head_terms(f)` -> dict of scalar terms; `weights`: {term name: (short name, weight)}. The gradient is
  stopped at f (nothing below layer4 is differentiated) and nothing of it reaches the training gradient.
  """
  names = list(weights)
  f = jax.lax.stop_gradient(s_features)
  values, pullback = jax.vjp(lambda x: [head_terms(x)[n] for n in names], f)
  out = {}
  for i, name in enumerate(names):
    short, weight = weights[name]
    (grad,) = pullback([jnp.ones_like(v) if j == i else jnp.zeros_like(v) for j, v in enumerate(values)])
    out[f"diag/grad_{short}_layer4"] = weight * jnp.sqrt(jnp.sum(jnp.square(grad.astype(jnp.float32))))
  return out


def make_pagkd_loss(model, heads, config, steps_per_epoch: int) -> Callable:
  """loss_fn(params, batch_stats, step, batch, teacher) -> (loss, (terms, new_batch_stats)).

  params = {"student", "heads"}; batch = {"wli", "nbi": (C, K, H, W, 3) uint8, "label": (C,)}; teacher =
  the frozen teacher's variables. L = CE + lambda_pro L_pro + lambda_den L_den (spec 6), distillation from
  step `warmup_epochs * steps_per_epoch` on. Negative controls (config.distill): `region_labels="random"`
  draws the region labels from the step's key instead of CAM + PAR; `teacher_class_shift` pairs each WLI
  group with the NBI group of another class (`teacher_class_shift_per_step`: another class drawn at each step). With `train.log_grad_norms` the terms also hold the norms of the
  gradients that CE, L_pro and L_den send into the student's layer4 map ("diag/grad_*_layer4").
  """
  d = config.distill
  pagkd.check_config(d)
  lambda_pro = pagkd.resolved(d, "lambda_pro") if d.use_pro else 0.0
  lambda_den = d.lambda_den if d.use_den else 0.0
  warmup_steps = experiment.distillation_warmup_steps(config, steps_per_epoch)
  normalization = config.data.normalization
  pairing_key = jax.random.key(config.seed + 1)
  region_key = jax.random.key(config.seed + 2)
  shift_key = jax.random.key(config.seed + 3)
  log_grad_norms = config.train.log_grad_norms

  def loss_fn(params, batch_stats, step, batch, teacher):
    num_classes, k = batch["wli"].shape[:2]
    labels = group_labels(batch["label"], k)  # (K * C,)
    x_wli = normalize_images(flatten_groups(batch["wli"]), normalization)
    x_nbi = normalize_images(flatten_groups(batch["nbi"]), normalization)
    _, t_features = model.apply(teacher, x_nbi, train=False)
    t_features = jax.lax.stop_gradient(t_features)
    t_kernel = jax.lax.stop_gradient(teacher["params"]["fc"]["kernel"])

    def distillation(params, s_features):
      if d.region_labels == "random":  # Negative control: no CAM, no PAR.
        rng_wli, rng_nbi = jax.random.split(jax.random.fold_in(region_key, step))
        fractions = tuple(d.random_region_fractions)
        regions_wli = pagkd.random_region_labels(rng_wli, s_features.shape[:3], fractions)
        regions_nbi = pagkd.random_region_labels(rng_nbi, t_features.shape[:3], fractions)
      else:
        regions_wli = pagkd.region_labels(x_wli, s_features, params["student"]["fc"]["kernel"], labels, d)
        regions_nbi = pagkd.region_labels(x_nbi, t_features, t_kernel, labels, d)
      teacher_side = [unflatten_groups(a, num_classes) for a in (t_features, regions_wli, regions_nbi)]
      g_labels = batch["label"]
      shift = d.teacher_class_shift
      if d.teacher_class_shift_per_step:  # Negative control: a new wrong class at every step.
        shift = pagkd.draw_class_shift(jax.random.fold_in(shift_key, step), num_classes)
      if d.teacher_class_shift or d.teacher_class_shift_per_step:
        # Negative control: class c's WLI group meets the NBI group of class c + shift.
        teacher_side[0] = pagkd.shift_teacher_groups(teacher_side[0], shift)
        teacher_side[2] = pagkd.shift_teacher_groups(teacher_side[2], shift)
      if d.level == "image":  # Each WLI image with one random same-class NBI image: C * K groups of one.
        rng = jax.random.fold_in(pairing_key, step)
        teacher_side[0] = pagkd.pair_images(teacher_side[0], rng)
        teacher_side[2] = pagkd.pair_images(teacher_side[2], rng)
        g_labels = jnp.repeat(batch["label"], k)
      as_groups = ((lambda a: a.reshape((num_classes * k, 1) + a.shape[2:])) if d.level == "image"
                   else (lambda a: a))
      f_teacher, r_wli, r_nbi = (as_groups(a) for a in teacher_side)

      def head_terms(heads_params, s_features):
        f_student = as_groups(unflatten_groups(s_features, num_classes))
        return heads.apply({"params": heads_params}, f_student, f_teacher, g_labels, r_wli, r_nbi)

      terms = head_terms(params["heads"], s_features)
      if log_grad_norms:
        frozen_heads = jax.lax.stop_gradient(params["heads"])
        weights = {"loss_pro": ("pro", lambda_pro), "loss_den": ("den", lambda_den)}
        terms.update(layer4_gradient_norms(lambda f: head_terms(frozen_heads, f), s_features,
                                           {k: v for k, v in weights.items() if v[1]}))  # Only terms that are on.
      return terms

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
    if log_grad_norms:
      fc = jax.lax.stop_gradient(params["student"]["fc"])
      cls_of_features = lambda f: {"loss_cls": optax.softmax_cross_entropy_with_integer_labels(
          jnp.mean(f.astype(jnp.float32), axis=(1, 2)) @ fc["kernel"] + fc["bias"], labels).mean()}
      terms.update(layer4_gradient_norms(cls_of_features, s_features, {"loss_cls": ("cls", 1.0)}))
    loss = loss_cls + lambda_pro * terms["loss_pro"] + lambda_den * terms["loss_den"]
    terms = {"loss_cls": loss_cls, **terms, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
             "distill_on": (step >= warmup_steps).astype(jnp.float32)}
    return loss, (terms, {"student": new_vars["batch_stats"]})

  return loss_fn


def embed_tokens(features: jax.Array, kernel: jax.Array, dtype) -> jax.Array:
  """A distillation head's bias-free 1x1 embedding (as its nn.Dense): (..., F) maps, (F, d) kernel -> (..., d)."""
  return jnp.dot(features.astype(dtype), kernel.astype(dtype))


def make_paired_loss(model, config, steps_per_epoch: int) -> Callable:
  """loss_fn(params, batch_stats, step, batch, teacher) -> (loss, (terms, new_batch_stats)) of a paired batch.

  params = {"student", "heads"} (as `make_pagkd_loss`); batch = {"wli", "nbi": (B, H, W, 3) uint8, "label": (B,)},
  row i of both images the same pair. L = CE(student(WLI)) + lambda_den * L_dense, L_dense (from step
  `warmup_epochs * steps_per_epoch` on, 0 before) a dense loss of the (B, h, w, d) tokens student_embed(student layer4
  map of WLI) and teacher_embed(frozen teacher's layer4 map of NBI) with each image's CAM + PAR region labels (spec
  5.1-5.3): by `distill.paired_loss`, `paired_losses.srca_pair_loss` through the heads' SRCA ("paper") or
  `paired_losses.bidirectional_dense_pair_loss` with relation value 0.5 for ambiguous positions ("release").
  """
  from pagkd_jax.models.resnet import DTYPES
  d = config.distill
  lambda_den = d.lambda_den if d.use_den else 0.0
  paired_loss = pagkd.resolved(d, "paired_loss")
  warmup_steps = experiment.distillation_warmup_steps(config, steps_per_epoch)
  normalization = config.data.normalization
  dtype = DTYPES[config.model.dtype]

  def loss_fn(params, batch_stats, step, batch, teacher):
    labels = batch["label"]
    s = streams.student_on_pairs(model, {"params": params["student"], "batch_stats": batch_stats["student"]}, batch,
                                 normalization)

    def dense(params, s_features):
      _, t_features = model.apply(teacher, s.x_nbi, train=False)
      t_features = jax.lax.stop_gradient(t_features)
      t_kernel = jax.lax.stop_gradient(teacher["params"]["fc"]["kernel"])
      regions_wli = pagkd.region_labels(s.x_wli, s_features, params["student"]["fc"]["kernel"], labels, d)
      regions_nbi = pagkd.region_labels(s.x_nbi, t_features, t_kernel, labels, d)
      tokens_wli = embed_tokens(s_features, params["heads"]["student_embed"]["kernel"], dtype)
      tokens_nbi = embed_tokens(t_features, params["heads"]["teacher_embed"]["kernel"], dtype)
      if paired_loss == "paper":
        return paired_losses.srca_pair_loss(params["heads"]["srca"], tokens_wli, tokens_nbi, regions_wli, regions_nbi,
                                            proj_dim=d.proj_dim, masked=d.masked, bidirectional=d.bidirectional,
                                            dtype=dtype)
      return paired_losses.bidirectional_dense_pair_loss(tokens_wli, tokens_nbi, regions_wli, regions_nbi,
                                                         paired_losses.PAGKD_AMBIGUOUS_WEIGHT)

    if lambda_den:
      loss_dense = jax.lax.cond(step >= warmup_steps, dense, lambda *_: jnp.zeros((), jnp.float32), params,
                                s.features)
    else:
      loss_dense = jnp.zeros((), jnp.float32)
    loss = s.loss_cls + lambda_den * loss_dense
    terms = {"loss_cls": s.loss_cls, "loss_dense": loss_dense, "accuracy": s.accuracy,
             "distill_on": (step >= warmup_steps).astype(jnp.float32)}
    return loss, (terms, {"student": s.batch_stats})

  return loss_fn


# The distillation heads each paired loss reads; the others (the prototype extractor and classifier of GKD-Pro, and
# the SRCA's projections under the release's paired loss) get no gradient in a paired step.
PAIRED_LOSS_HEADS = {"paper": ("student_embed", "teacher_embed", "srca"), "release": ("student_embed", "teacher_embed")}


def make_paired_update_factory(model, tx, config, steps_per_epoch: int) -> Callable:
  """update(state, batch, teacher) -> (state, metrics): one optimiser step of `make_paired_loss`. The heads the
  paired loss reads are updated, `gated_on`, from the warm-up's end on when the dense loss is on; the other heads
  keep their values and Adam moments (`keep_heads`), as torch's Adam leaves a parameter without a gradient."""
  d = config.distill
  heads_trained = bool(d.use_den and d.lambda_den)
  return _gated_update(make_paired_loss(model, config, steps_per_epoch), tx, heads_trained,
                       experiment.distillation_warmup_steps(config, steps_per_epoch),
                       heads_read=PAIRED_LOSS_HEADS[pagkd.resolved(d, "paired_loss")])


def keep_heads(new, old, names: frozenset):
  """`new` (parameters or optimiser state) with every leaf under a head in `names` (a key of the "heads"
  parameters, anywhere on the leaf's path) taken from `old`. Leaves shared by all heads (Adam's step count) stay new."""
  def pick(path, new_leaf, old_leaf):
    keys = [getattr(k, "key", None) for k in path]
    under = any(a == "heads" and b in names for a, b in zip(keys, keys[1:]))
    return old_leaf if under else new_leaf

  return jax.tree_util.tree_map_with_path(pick, new, old)


def _gated_update(loss_fn: Callable, tx, heads_trained: bool, heads_from: int,
                  heads_read: tuple[str, ...] | None = None) -> Callable:
  """update(state, batch, teacher) of `loss_fn(params, batch_stats, step, batch, teacher)`, passing `gated_on`
  (the heads are trained at this step) to `tx`. With `heads_read`, the heads not among them keep their parameters
  and Adam moments (they get no gradient from this loss)."""
  tx = optax.with_extra_args_support(tx)

  def update(state: TrainState, batch, teacher):
    (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, state.step, batch, teacher)
    heads_on = jnp.logical_and(heads_trained, state.step >= heads_from)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, gated_on=heads_on)
    params = optax.apply_updates(state.params, updates)
    if heads_read is not None:
      unread = frozenset(state.params["heads"]) - frozenset(heads_read)
      params = keep_heads(params, state.params, unread)
      opt_state = keep_heads(opt_state, state.opt_state, unread)
    metrics = {"loss": loss, **terms,
               "grad_norm": jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics

  return update


def make_pagkd_update(model, heads, tx, config, steps_per_epoch: int) -> Callable:
  """update(state, batch, teacher) -> (state, metrics): one optimiser step of `make_pagkd_loss`.

  The update passes `gated_on` (distillation on at this step) to `tx`, so an optimiser built with
  `gated_params=("heads",)` leaves the heads untouched while they get no gradient (any other `tx` ignores it).
  """
  loss_fn = make_pagkd_loss(model, heads, config, steps_per_epoch)
  d = config.distill
  heads_trained = bool((d.use_pro and pagkd.resolved(d, "lambda_pro")) or (d.use_den and d.lambda_den))
  heads_from = experiment.distillation_warmup_steps(config, steps_per_epoch)  # As make_pagkd_loss's warm-up.
  return _gated_update(loss_fn, tx, heads_trained, heads_from)


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


def nbi_teacher(config, workdir: str, run_stage: Callable, needs_pairs: bool = False):
  """The frozen NBI teacher of a method that distils from it (stage "pagkd", the paired comparison methods): trained
  as stage "teacher" in WORKDIR/teacher unless `config.teacher.workdir` names one (both resume), then its best
  variables. With `needs_pairs`, fewer training pairs than data.paired_batch_size raise ValueError naming the count
  before the teacher is trained (nothing is decoded for that check)."""
  workdir = os.path.abspath(workdir)
  if needs_pairs:
    from pagkd_jax.data import pairs as pairs_lib
    pairs_lib.require_pairs(streams.training_pairs(experiment.load_split_data(config)),
                            config.data.paired_batch_size)
  teacher_dir = config.teacher.workdir or os.path.join(workdir, "teacher")
  if not config.teacher.workdir:
    logging.info("Stage 1: NBI teacher in %s", teacher_dir)
    run_stage(teacher_config(config), teacher_dir, classifier.ClassifierProgram("nbi"))
  elif not os.path.isdir(teacher_dir):
    raise FileNotFoundError(f"config.teacher.workdir={teacher_dir} does not exist.")
  return load_teacher(teacher_dir, config, experiment.build_model(config))


def train(config, workdir: str, run_stage: Callable) -> dict:
  """Stage 2, with stage 1 first when needed: trains the NBI teacher in WORKDIR/teacher unless
  `config.teacher.workdir` names one (both resume), then the student in WORKDIR."""
  teacher = nbi_teacher(config, workdir, run_stage, needs_pairs=bool(config.distill.paired))
  logging.info("Stage 2: WLI student with %s-variant %s-level distillation in %s", config.distill.variant,
               config.distill.level, workdir)
  return run_stage(config, workdir, PaGKDProgram(frozen=(teacher,), paired=bool(config.distill.paired)))
