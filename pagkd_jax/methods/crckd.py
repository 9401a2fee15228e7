"""The CRCKD method (stage "crckd", spec CRCKD.md): a WLI classifier distilled from its own mean teacher, with no NBI.

The classifier has the spec's "feature4" Linear before its head (`methods.Method.embedding`: config.crckd.embed_dim),
so the shipped student is an ordinary classifier that eval.py builds from the config alone. Every image comes twice
(`batch_options`): the student sees one augmented view, the teacher another, rotated by k * 90 degrees and flipped
on device (`crckd.rotate_flip`), and each image's row in the training split names its rows in the memory banks.

One update (`make_crckd_update`), in the release's order:
  1. the teacher, an EMA of the student (parameters and BatchNorm statistics), runs in inference mode (its averaged
     running statistics, as the spec averages them) on its view, without gradient (the public release averages the
     parameters only and runs its EMA model in training mode, on the statistics of the teacher view's batch); it
     starts as a copy of the student;
  2. the student and the two contrast embeddings (`crckd.ContrastHeads`, one optimiser with the student) give
     CE, the consistency with the teacher's logits, CCD against the banks before this step (P positives and K
     negatives drawn per anchor, `memory_bank.draw_contrast_rows`) and CRP against the class centroids of the banks
     after this step's rows were updated (`crckd.bank_losses`);
  3. total loss CE + w_cons consistency + w_ccd CCD + w_crp CRP with the weights of `crckd.loss_weights` at the
     update's epoch (step // steps per epoch, counted from 0, as the release's integer epoch): CE + 0.1 CCD before
     config.crckd.mean_teacher_start_epoch, then also the ramped consistency and CRP;
  4. the optimiser step, then the teacher <- EMA with alpha = min(1 - 1 / (step + 1), ema_decay), step counted from
     0 (the first update copies the student).
The teacher and the banks are part of the training state (`CRCKDState`): checkpointed and restored on resume. The
banks are replicated; the global batch's rows are updated once per step, so they agree across devices and processes.
Only the student is validated and saved as the best checkpoint.
"""

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from absl import logging

from pagkd_jax.data import class_groups
from pagkd_jax.data.normalization import normalize_images
from pagkd_jax.distill import crckd
from pagkd_jax.distill import memory_bank
from pagkd_jax.methods import classifier
from pagkd_jax.methods.classifier import flatten_groups, group_labels
from pagkd_jax.training.train_state import TrainState

MODALITY = "wli"
# Folded into the run's key (config.seed): the student uses the key itself, as the baseline does.
HEADS_KEY_TAG, BANKS_KEY_TAG, ROTATION_KEY_TAG, DRAW_KEY_TAG = 1, 2, 3, 4


@flax.struct.dataclass
class CRCKDState(TrainState):
  """TrainState (params = {"student", "heads"}, batch_stats = {"student"}) plus what CRCKD keeps between steps:

  teacher: {"params", "batch_stats"} of the mean teacher, the student's structure;
  banks: `memory_bank.MemoryBanks`, one row per training image (N_train, contrast_dim) per side.
  """

  teacher: Any
  banks: memory_bank.MemoryBanks


def core_options(config) -> dict:
  """config.crckd as keyword values (one per field of `crckd.DEFAULTS`)."""
  return {f.name: config.crckd[f.name] for f in dataclasses.fields(crckd.DEFAULTS)}


def make_heads(config) -> crckd.ContrastHeads:
  c = config.crckd
  return crckd.ContrastHeads(features=c.contrast_dim, eps=c.normalize_eps)


def schedule_weights(config, epoch) -> dict[str, jax.Array]:
  """`crckd.loss_weights` at `epoch` with config.crckd's values: {"consistency", "ccd", "crp"}."""
  c = config.crckd
  return crckd.loss_weights(epoch, consistency_weight=c.consistency_weight,
                            consistency_rampup_epochs=c.consistency_rampup_epochs,
                            mean_teacher_start_epoch=c.mean_teacher_start_epoch, ccd_weight=c.ccd_weight,
                            ccd_weight_late=c.ccd_weight_late, crp_weight=c.crp_weight)


def log_sampling_shortfalls(row_labels, classes, num_positives: int, num_negatives: int) -> None:
  """Says once, naming the classes, when CCD's draw has to repeat rows (a class with fewer than P training images,
  or fewer than K images of other classes)."""
  short = memory_bank.sampling_shortfalls(row_labels, num_positives, num_negatives)
  named = lambda counts: ", ".join(f"{classes[c]!r} ({m})" for c, m in counts.items())
  if short["positives"]:
    logging.warning("CRCKD: fewer training images than crckd.num_positives=%d in class %s: their positives are drawn "
                    "with repetition.", num_positives, named(short["positives"]))
  if short["negatives"]:
    logging.warning("CRCKD: fewer training images of other classes than crckd.num_negatives=%d for class %s: their "
                    "negatives are drawn with repetition.", num_negatives, named(short["negatives"]))


@dataclasses.dataclass(frozen=True)
class CRCKDProgram:
  """What `trainer.run_stage` trains in stage "crckd". `row_labels`: the class of each bank row (the training
  split's WLI images in order, `class_groups.row_records`), set by `for_training_records`."""

  row_labels: tuple[int, ...] = ()
  frozen: tuple = ()
  modalities: tuple = (MODALITY,)

  @property
  def batch_options(self) -> dict:
    """Two augmented views of every image (student, teacher) and each image's row (its bank rows)."""
    return {"views": 2, "row_indices": True}

  def for_training_records(self, records, classes, config) -> "CRCKDProgram":
    """The program with the banks' row labels: the training split's WLI images in order; logs once when CCD's draw
    has to repeat rows."""
    labels = tuple(int(r.label) for r in class_groups.row_records(records, MODALITY))
    log_sampling_shortfalls(labels, classes, config.crckd.num_positives, config.crckd.num_negatives)
    return dataclasses.replace(self, row_labels=labels)

  def init_state(self, model, tx, rng, config, backbone=None) -> CRCKDState:
    """The student exactly as the baseline starts (`classifier.init_classifier` from `rng`), with its embedding; the
    teacher a copy of it; the contrast embeddings and the banks from keys folded from `rng`."""
    if not self.row_labels:
      raise ValueError("CRCKDProgram.init_state needs the training split's labels: call for_training_records first.")
    c = config.crckd
    student = classifier.init_classifier(model, rng, config, backbone)
    features = jnp.zeros((1, c.embed_dim), jnp.float32)
    heads = make_heads(config).init(jax.random.fold_in(rng, HEADS_KEY_TAG), features, features)
    banks = memory_bank.init_memory_banks(jax.random.fold_in(rng, BANKS_KEY_TAG), self.row_labels, c.contrast_dim,
                                          c.bank_init_scale, len(config.data.classes))
    params = {"student": student["params"], "heads": heads["params"]}
    # A copy, not the same arrays: the state is donated to the update, and no buffer may be donated twice.
    teacher = jax.tree.map(jnp.copy, {"params": student["params"], "batch_stats": student["batch_stats"]})
    return CRCKDState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={"student": student["batch_stats"]},
                      opt_state=tx.init(params), teacher=teacher, banks=banks)

  def make_update(self, model, tx, config, steps_per_epoch: int) -> Callable:
    return make_crckd_update(model, make_heads(config), tx, config, steps_per_epoch)

  def eval_variables(self, state: CRCKDState) -> dict:
    return {"params": state.params["student"], "batch_stats": state.batch_stats["student"]}


def _embedding(mutated: dict) -> jax.Array:
  """The (B, embed_dim) "feature4" the ResNet sowed (`resnet.ResNet.embed_dim`)."""
  return mutated["intermediates"]["embedding"][0]


def make_crckd_update(model, heads, tx, config, steps_per_epoch: int) -> Callable:
  """update(state, batch) -> (state, metrics): one CRCKD step (the module docstring).

  batch: {"wli", "wli_view2": (C, K, H, W, 3) uint8, "wli_row": (C, K) int32, "label": (C,) int32}.
  """
  if model.embed_dim != config.crckd.embed_dim:
    raise ValueError(f"CRCKD needs the classifier with its {config.crckd.embed_dim}-d embedding before the head; "
                     f"the model has embed_dim={model.embed_dim} (build it with experiment.build_model).")
  c = config.crckd
  normalization = config.data.normalization
  root = jax.random.key(config.seed)
  rotation_key, draw_key = jax.random.fold_in(root, ROTATION_KEY_TAG), jax.random.fold_in(root, DRAW_KEY_TAG)
  view2, rows_key = class_groups.view2_key(MODALITY), class_groups.row_key(MODALITY)

  def update(state: CRCKDState, batch):
    num_classes, k = batch[MODALITY].shape[:2]
    labels = group_labels(batch["label"], k)  # (K * C,)
    rows = flatten_groups(batch[rows_key])  # (K * C,)
    x_student = normalize_images(flatten_groups(batch[MODALITY]), normalization)
    teacher_view = crckd.rotate_flip(jax.random.fold_in(rotation_key, state.step), flatten_groups(batch[view2]))
    x_teacher = normalize_images(teacher_view, normalization)
    epoch = state.step // steps_per_epoch
    weights = schedule_weights(config, epoch)

    (t_logits, _), t_mutated = model.apply(state.teacher, x_teacher, train=False, mutable=["intermediates"])
    t_logits = jax.lax.stop_gradient(t_logits)
    t_embedding = jax.lax.stop_gradient(_embedding(t_mutated))
    contrast_rows, _, _ = memory_bank.draw_contrast_rows(jax.random.fold_in(draw_key, state.step),
                                                         state.banks.labels, rows, c.num_positives, c.num_negatives)

    def loss_fn(params):
      (logits, _), mutated = model.apply(
          {"params": params["student"], "batch_stats": state.batch_stats["student"]}, x_student, train=True,
          mutable=["batch_stats", "intermediates"])
      f_student, f_teacher = heads.apply({"params": params["heads"]}, _embedding(mutated), t_embedding)
      loss_ccd, loss_crp, banks, aux = crckd.bank_losses(
          state.banks, rows, contrast_rows, f_student, f_teacher, num_classes, num_positives=c.num_positives,
          temperature=c.temperature, crp_temperature=c.crp_temperature, bank_momentum=c.bank_momentum,
          nce_eps=c.nce_eps, normalize_eps=c.normalize_eps)
      loss_cls = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      loss_consistency = crckd.consistency_loss(logits, t_logits)
      loss = (loss_cls + weights["consistency"] * loss_consistency + weights["ccd"] * loss_ccd
              + weights["crp"] * loss_crp)
      terms = {"loss_cls": loss_cls, "loss_consistency": loss_consistency, "loss_ccd": loss_ccd,
               "loss_crp": loss_crp, **aux, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
      return loss, (terms, mutated["batch_stats"], banks)

    (loss, (terms, batch_stats, banks)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    teacher = crckd.ema_update(state.teacher, {"params": params["student"], "batch_stats": batch_stats},
                               state.step, c.ema_decay)
    metrics = {"loss": loss, **terms, **{f"weight_{name}": w for name, w in weights.items()},
               "ema_decay": crckd.ema_decay_at(state.step, c.ema_decay),
               "ccd/normalizer_student_anchors": banks.normalizers[0],
               "ccd/normalizer_teacher_anchors": banks.normalizers[1],
               "grad_norm": jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats={"student": batch_stats},
                              opt_state=opt_state, teacher=teacher, banks=banks)
    return new_state, metrics

  return update


def train(config, workdir: str, run_stage: Callable) -> dict:
  """Trains the CRCKD student in `workdir` (one run: the teacher is the student's own average)."""
  logging.info("CRCKD: WLI student with its mean teacher, P=%d positives, K=%d negatives, CCD weight %s then %s "
               "from epoch %s", config.crckd.num_positives, config.crckd.num_negatives, config.crckd.ccd_weight,
               config.crckd.ccd_weight_late, config.crckd.mean_teacher_start_epoch)
  return run_stage(config, workdir, CRCKDProgram())
