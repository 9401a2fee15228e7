"""CRCKD's numerical core (spec CRCKD.md): mean teacher, consistency, CCD and CRP as pure, jit-able functions.

CRCKD distils a WLI classifier into itself: the teacher is an exponential moving average of the student
(`ema_update`, parameters and BatchNorm statistics alike), fed a second augmented view of each image (rotated by
k * 90 degrees and flipped, `rotate_flip`). Besides CE the student learns from
  * the mean-teacher consistency `consistency_loss`, weighted by the ramp `sigmoid_rampup`;
  * class-guided contrastive distillation `ccd_loss`: the CCD embeddings f = l2norm(Linear(feature4))
    (`ContrastHeads`) of each image are scored against P rows of its class and K rows of other classes of the
    other side's memory bank (`memory_bank.py`);
  * the categorical relation-preserving loss `crp_loss` against the class centroids of the banks
    (`class_centroids`).
`bank_losses` runs CCD, the bank update and CRP in the release's order; `loss_weights` gives the weights of the
schedule. Every constant is an argument; the spec's values are the fields of `DEFAULTS`, the one place they live.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pagkd_jax.distill import memory_bank
from pagkd_jax.distill import qformer

# Scores of 128-d unit vectors: keep them exact float32 (no TF32) on accelerators.
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class CRCKDDefaults:
  """The spec's values (CRCKD.md), and where the release differs.

  Attributes:
    embed_dim: size of "feature4", the Linear after the pooled backbone features that the classifier reads.
    contrast_dim: size of the CCD embeddings and of the bank rows.
    ema_decay: the teacher's EMA decay cap; the decay at step t is min(1 - 1 / (t + 1), ema_decay).
    consistency_weight: the consistency loss's weight once ramped up.
    consistency_rampup_epochs: length of the ramp exp(-5 (1 - min(epoch, L) / L)^2).
    mean_teacher_start_epoch: the epoch from which consistency and CRP join the loss.
    num_positives: P, the anchor's own row included.
    num_negatives: K.
    temperature: T of the CCD scores.
    bank_momentum: weight of the old row in the bank update.
    nce_eps: the release's eps in the NCE denominators x + K/N + eps.
    ccd_weight: w, the CCD weight before `mean_teacher_start_epoch`.
    ccd_weight_late: the CCD weight from `mean_teacher_start_epoch` on; the spec keeps w. The release multiplies
      by w twice there: 0.01 reproduces it.
    crp_weight: the CRP weight from `mean_teacher_start_epoch` on.
    crp_temperature: T of the CRP relations (the release uses the CCD temperature).
    bank_init_scale: None for s = 1 / sqrt(contrast_dim / 3), the rows' initial U(-s, s).
    normalize_eps: norm floor of every l2 normalisation (the release divides by the bare norm).
  """

  embed_dim: int = 128
  contrast_dim: int = 128
  ema_decay: float = 0.99
  consistency_weight: float = 1.0
  consistency_rampup_epochs: float = 30.0
  mean_teacher_start_epoch: int = 20
  num_positives: int = 20
  num_negatives: int = 4096
  temperature: float = 0.07
  bank_momentum: float = 0.5
  nce_eps: float = 1e-7
  ccd_weight: float = 0.1
  ccd_weight_late: float = 0.1
  crp_weight: float = 1.0
  crp_temperature: float = 0.07
  bank_init_scale: float | None = None
  normalize_eps: float = 1e-12


DEFAULTS = CRCKDDefaults()
RELEASE_CCD_WEIGHT_LATE = DEFAULTS.ccd_weight * DEFAULTS.ccd_weight  # 0.01: the release's doubled weight.


# ---- mean teacher --------------------------------------------------------------------------------


def ema_decay_at(step, decay: float = DEFAULTS.ema_decay) -> jax.Array:
  """alpha = min(1 - 1 / (step + 1), decay): the true average of the student so far until it exceeds `decay`.

  Args:
    step: () int, the number of optimiser steps before the one just taken (0 at the first update, which
      therefore copies the student).
  Returns:
    () float32.
  """
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(1.0 - 1.0 / (step + 1.0), decay)


def ema_update(teacher: Any, student: Any, step, decay: float = DEFAULTS.ema_decay) -> Any:
  """teacher <- alpha teacher + (1 - alpha) student, leaf by leaf, alpha = `ema_decay_at(step, decay)`.

  Pass the whole variables, {"params": ..., "batch_stats": ...}: the BatchNorm statistics follow the same EMA
  (spec; the release averages the parameters only). Computed in float32, returned in each teacher leaf's dtype;
  no gradient flows into the result.

  Args:
    teacher, student: pytrees of the same structure and shapes.
    step: () int, as in `ema_decay_at`.
  """
  if jax.tree.structure(teacher) != jax.tree.structure(student):
    raise ValueError("ema_update: the teacher and student trees differ in structure: "
                     f"{jax.tree.structure(teacher)} vs {jax.tree.structure(student)}.")
  alpha = ema_decay_at(step, decay)

  def average(t, s):
    if t.shape != s.shape:
      raise ValueError(f"ema_update: a teacher leaf of shape {t.shape} meets a student leaf of shape {s.shape}.")
    mixed = alpha * t.astype(jnp.float32) + (1.0 - alpha) * jax.lax.stop_gradient(s).astype(jnp.float32)
    return mixed.astype(t.dtype)

  return jax.tree.map(average, teacher, student)


def rotate_flip(key: jax.Array, images: jax.Array) -> jax.Array:
  """The teacher view's extra transform: each image flipped upside down with probability 1/2, then rotated by
  k * 90 degrees counter-clockwise, k uniform in {0, 1, 2, 3} (as the release's `transforms_for_rot`).

  Args:
    images: `(B, H, H, C)` square images.
  Returns:
    `(B, H, H, C)`.
  """
  if images.ndim != 4 or images.shape[1] != images.shape[2]:
    raise ValueError(f"rotate_flip: images must be square (B, H, H, C); got {tuple(images.shape)}.")
  k_rot, k_flip = jax.random.split(key)
  b = images.shape[0]
  turns = jax.random.randint(k_rot, (b,), 0, 4)
  flips = jax.random.bernoulli(k_flip, 0.5, (b,))

  def one(image, turn, flip):
    # rot90 by k = transpose^t . flip_rows^r . flip_columns^c with (t, r, c) = (0, 0, 0), (1, 0, 1), (0, 1, 1),
    # (1, 1, 0) for k = 0..3; the two flips commute, so the upside-down flip toggles r. Three selects, no copies of
    # the four rotations.
    flip_columns = (turn == 1) | (turn == 2)
    flip_rows = ((turn == 2) | (turn == 3)) != flip
    transpose = (turn == 1) | (turn == 3)
    image = jnp.where(flip_columns, image[:, ::-1], image)
    image = jnp.where(flip_rows, image[::-1], image)
    return jnp.where(transpose, jnp.swapaxes(image, 0, 1), image)

  return jax.vmap(one)(images, turns, flips)


# ---- consistency and the schedule ------------------------------------------------------------------


def sigmoid_rampup(epoch, rampup_epochs: float = DEFAULTS.consistency_rampup_epochs) -> jax.Array:
  """exp(-5 (1 - clip(epoch, 0, L) / L)^2), 1 for L = 0 (the release passes the integer epoch). -> () float32."""
  if rampup_epochs == 0:
    return jnp.ones((), jnp.float32)
  phase = 1.0 - jnp.clip(jnp.asarray(epoch, jnp.float32), 0.0, rampup_epochs) / rampup_epochs
  return jnp.exp(-5.0 * phase * phase)


def consistency_loss(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """Spec: sum over classes of KL(softmax(teacher) || softmax(student)), divided by the batch size.

  Args:
    student_logits, teacher_logits: `(B, C)`; no gradient reaches the teacher's.
  Returns:
    () float32.
  """
  if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
    raise ValueError(f"consistency_loss: logits must both be (B, C); got {tuple(student_logits.shape)} and "
                     f"{tuple(teacher_logits.shape)}.")
  log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  log_p_t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  return jnp.mean(kl)


def loss_weights(epoch, *, consistency_weight: float = DEFAULTS.consistency_weight,
                 consistency_rampup_epochs: float = DEFAULTS.consistency_rampup_epochs,
                 mean_teacher_start_epoch: int = DEFAULTS.mean_teacher_start_epoch,
                 ccd_weight: float = DEFAULTS.ccd_weight, ccd_weight_late: float = DEFAULTS.ccd_weight_late,
                 crp_weight: float = DEFAULTS.crp_weight) -> dict[str, jax.Array]:
  """The weights of the total loss at `epoch` (spec, "Total"; CE always has weight 1).

  Before `mean_teacher_start_epoch`: CE + ccd_weight CCD. From it on: CE + ramp(epoch) consistency_weight
  consistency + ccd_weight_late CCD + crp_weight CRP, with the ramp counted from epoch 0.

  Returns:
    {"consistency", "ccd", "crp"}: () float32 each.
  """
  late = jnp.asarray(epoch) >= mean_teacher_start_epoch
  ramp = consistency_weight * sigmoid_rampup(epoch, consistency_rampup_epochs)
  return {"consistency": jnp.where(late, ramp, 0.0).astype(jnp.float32),
          "ccd": jnp.where(late, ccd_weight_late, ccd_weight).astype(jnp.float32),
          "crp": jnp.where(late, crp_weight, 0.0).astype(jnp.float32)}


# ---- CCD -----------------------------------------------------------------------------------------


class ContrastEmbedding(nn.Module):
  """f = l2norm(Linear(x)): `(B, embed_dim)` -> `(B, features)` float32, initialised as torch's `nn.Linear`
  (kernel and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))), as the release's `Embed`."""

  features: int = DEFAULTS.contrast_dim
  eps: float = DEFAULTS.normalize_eps

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 2:
      raise ValueError(f"ContrastEmbedding expects (B, embed_dim) features; got {tuple(x.shape)}.")
    torch_default = qformer.symmetric_uniform(1.0 / math.sqrt(x.shape[-1]))
    y = nn.Dense(self.features, dtype=jnp.float32, kernel_init=torch_default, bias_init=torch_default,
                 name="linear")(x.astype(jnp.float32))
    return memory_bank.l2_normalize(y, self.eps)


class ContrastHeads(nn.Module):
  """The two trainable CCD embeddings: student feature4 -> f_s, teacher feature4 -> f_t (spec, CCD).

  The teacher's feature4 arrives without gradient; its embedding is trained through the teacher-anchor CCD term.
  """

  features: int = DEFAULTS.contrast_dim
  eps: float = DEFAULTS.normalize_eps

  @nn.compact
  def __call__(self, feature_student: jax.Array, feature_teacher: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(B, embed_dim)` twice -> (f_s, f_t), `(B, features)` float32 unit rows."""
    f_s = ContrastEmbedding(self.features, self.eps, name="student")(feature_student)
    f_t = ContrastEmbedding(self.features, self.eps, name="teacher")(jax.lax.stop_gradient(feature_teacher))
    return f_s, f_t


def contrast_logits(anchors: jax.Array, bank: jax.Array, rows: jax.Array,
                    temperature: float = DEFAULTS.temperature) -> jax.Array:
  """m . f / T for each anchor f `(B, d)` and its bank rows m = bank[rows] `(B, M, d)`; the bank gets no
  gradient. -> `(B, M)` float32."""
  picked = jax.lax.stop_gradient(bank)[rows]
  return jnp.einsum("bmd,bd->bm", picked, anchors.astype(jnp.float32), precision=_HIGHEST) / temperature


def log_normalizer(logits: jax.Array, z, num_rows: int) -> tuple[jax.Array, jax.Array]:
  """log Z of the CCD scores x = exp(logit) / Z: Z = `z` once fixed (> 0), else fixed now from these logits as
  mean(exp(logits)) * N (spec: at the first batch). No gradient.

  Args:
    logits: `(B, M)`. z: () float32, 0 while not fixed. num_rows: N, the bank's rows.
  Returns:
    (log Z, Z): () float32 each; store Z for the following steps.
  """
  fresh = jax.nn.logsumexp(logits) - math.log(logits.size) + math.log(num_rows)
  log_z = jax.lax.stop_gradient(jnp.where(z > 0, jnp.log(jnp.where(z > 0, z, 1.0)), fresh))
  return log_z, jnp.exp(log_z)


def nce_loss(logits: jax.Array, log_z, num_positives: int, num_rows: int,
             eps: float = DEFAULTS.nce_eps) -> jax.Array:
  """Spec NCE loss, averaged over the batch; per anchor, with x = exp(logit) / Z, c = K / N:
    -(1/P) [ sum_{P columns} log(x / (x + c + eps)) + P sum_{K columns} log(c / (x + c + eps)) ].

  Evaluated in log space (log x = logit - log Z), equal to the release's `ContrastLoss` up to rounding.

  Args:
    logits: `(B, P + K)` m . f / T, the P positive columns first. log_z: () log Z.
    num_positives: P. num_rows: N, the bank's rows.
  Returns:
    () float32.
  """
  b, m = logits.shape
  num_negatives = m - num_positives
  if num_negatives < 1:
    raise ValueError(f"nce_loss: {m} columns leave no negatives after P = {num_positives} positives.")
  noise = num_negatives / num_rows
  log_x = logits.astype(jnp.float32) - log_z
  log_denominator = jnp.logaddexp(log_x, math.log(noise + eps))
  log_d1 = log_x[:, :num_positives] - log_denominator[:, :num_positives]
  log_d0 = math.log(noise) - log_denominator[:, num_positives:]
  per_anchor = -(jnp.sum(log_d1, axis=1) + num_positives * jnp.sum(log_d0, axis=1)) / num_positives
  return jnp.mean(per_anchor)


def ccd_loss(f_student: jax.Array, f_teacher: jax.Array, banks: memory_bank.MemoryBanks, rows: jax.Array,
             num_positives: int = DEFAULTS.num_positives, temperature: float = DEFAULTS.temperature,
             eps: float = DEFAULTS.nce_eps) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Class-guided contrastive distillation, both directions summed (spec, CCD; as the release):
  student anchors against the teacher bank + teacher anchors against the student bank.

  Args:
    f_student, f_teacher: `(B, d)` unit CCD embeddings of the batch.
    banks: the banks before this step's update.
    rows: `(B, P + K)` from `memory_bank.draw_contrast_rows`.
    num_positives: P.
  Returns:
    (loss () float32, aux): aux["normalizers"] `(2,)` the Z used (store it in the banks: it is fixed from the
    first batch on), aux["ccd/student_anchors"], aux["ccd/teacher_anchors"] the two terms.
  """
  if f_student.ndim != 2 or f_student.shape != f_teacher.shape or rows.shape[:1] != f_student.shape[:1]:
    raise ValueError(f"ccd_loss: f_student and f_teacher must be (B, d) and rows (B, P + K); got "
                     f"{tuple(f_student.shape)}, {tuple(f_teacher.shape)}, {tuple(rows.shape)}.")
  n = banks.num_rows
  terms, normalizers = [], []
  for side, (anchors, bank) in enumerate(((f_student, banks.teacher), (f_teacher, banks.student))):
    logits = contrast_logits(anchors, bank, rows, temperature)
    log_z, z = log_normalizer(logits, banks.normalizers[side], n)
    terms.append(nce_loss(logits, log_z, num_positives, n, eps))
    normalizers.append(z)
  aux = {"normalizers": jnp.stack(normalizers), "ccd/student_anchors": terms[0], "ccd/teacher_anchors": terms[1]}
  return terms[0] + terms[1], aux


# ---- CRP -----------------------------------------------------------------------------------------


def class_centroids(bank: jax.Array, row_labels: jax.Array, num_classes: int,
                    eps: float = DEFAULTS.normalize_eps) -> jax.Array:
  """Class anchors (spec, CRP): l2norm of the per-class mean of relu(bank rows); no gradient.

  A class without rows gets the zero vector (relations 0 against it).

  Args:
    bank: `(N, d)`. row_labels: `(N,)` int. num_classes: C.
  Returns:
    `(C, d)` float32.
  """
  rows = jax.nn.relu(jax.lax.stop_gradient(bank).astype(jnp.float32))
  sums = jax.ops.segment_sum(rows, row_labels, num_segments=num_classes)
  counts = jax.ops.segment_sum(jnp.ones_like(row_labels, jnp.float32), row_labels, num_segments=num_classes)
  return memory_bank.l2_normalize(sums / jnp.maximum(counts, 1.0)[:, None], eps)


def crp_loss(f_student: jax.Array, f_teacher: jax.Array, student_centroids: jax.Array,
             teacher_centroids: jax.Array, temperature: float = DEFAULTS.crp_temperature) -> jax.Array:
  """Categorical relation preserving (spec, CRP): r = f . anchors^T / T on each side,
  KL(softmax(r_teacher) || softmax(r_student)) summed over the classes, mean over the batch.

  The teacher relations get no gradient (nor do the centroids); the student's reach f_student.

  Args:
    f_student, f_teacher: `(B, d)`. student_centroids, teacher_centroids: `(C, d)` from `class_centroids` of
      the student and the teacher bank.
  Returns:
    () float32.
  """
  if f_student.shape != f_teacher.shape or student_centroids.shape != teacher_centroids.shape:
    raise ValueError(f"crp_loss: features {tuple(f_student.shape)} / {tuple(f_teacher.shape)} and centroids "
                     f"{tuple(student_centroids.shape)} / {tuple(teacher_centroids.shape)} must match pairwise.")
  r_s = jnp.einsum("bd,cd->bc", f_student.astype(jnp.float32), jax.lax.stop_gradient(student_centroids),
                   precision=_HIGHEST) / temperature
  r_t = jnp.einsum("bd,cd->bc", jax.lax.stop_gradient(f_teacher).astype(jnp.float32),
                   jax.lax.stop_gradient(teacher_centroids), precision=_HIGHEST) / temperature
  return consistency_loss(r_s, r_t)


# ---- the bank step -------------------------------------------------------------------------------


def bank_losses(banks: memory_bank.MemoryBanks, batch_rows: jax.Array, contrast_rows: jax.Array,
                f_student: jax.Array, f_teacher: jax.Array, num_classes: int,
                num_positives: int = DEFAULTS.num_positives, temperature: float = DEFAULTS.temperature,
                crp_temperature: float = DEFAULTS.crp_temperature, bank_momentum: float = DEFAULTS.bank_momentum,
                nce_eps: float = DEFAULTS.nce_eps, normalize_eps: float = DEFAULTS.normalize_eps,
                ) -> tuple[jax.Array, jax.Array, memory_bank.MemoryBanks, dict[str, jax.Array]]:
  """CCD, bank update and CRP of one global batch, in the release's order.

  CCD scores the batch against the banks before the update and fixes Z at the first batch; the rows of the batch
  are then updated; CRP's class centroids come from the updated banks.

  Args:
    banks: the training state's banks.
    batch_rows: `(B,)` int rows of the batch's images. contrast_rows: `(B, P + K)` from `draw_contrast_rows`.
    f_student, f_teacher: `(B, d)` unit CCD embeddings (`ContrastHeads`).
    num_classes: C.
  Returns:
    (ccd () float32, crp () float32, new banks, diagnostics).
  """
  ccd, aux = ccd_loss(f_student, f_teacher, banks, contrast_rows, num_positives, temperature, nce_eps)
  new_banks = memory_bank.update_memory_banks(banks.replace(normalizers=aux.pop("normalizers")), batch_rows,
                                              f_student, f_teacher, bank_momentum, normalize_eps)
  centroids_s = class_centroids(new_banks.student, new_banks.labels, num_classes, normalize_eps)
  centroids_t = class_centroids(new_banks.teacher, new_banks.labels, num_classes, normalize_eps)
  crp = crp_loss(f_student, f_teacher, centroids_s, centroids_t, crp_temperature)
  return ccd, crp, new_banks, aux
