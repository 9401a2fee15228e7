"""Losses of the paired methods (spec 8 and 9): each WLI image of a batch of B pairs meets the NBI image of the same
lesion (or, in the "+ unpaired" variants, a random NBI image of the same class: `pagkd.pair_images`).

  dense_pair_loss / bidirectional_dense_pair_loss: the release's per-image dense loss of the paired stream (spec 8),
      with the relation value of ambiguous positions as an argument: 0.5 for PaGKD's paired stream, 0 for ADD.
  srca_pair_loss: the paper's variant of the paired stream's dense loss (spec 8): SRCA (spec 5.5) per pair, MSE.
  logit_alignment_loss: ADD's 1 - cos(logits_WLI, stop_gradient(logits_NBI)) (spec 9).
  hinton_kd_loss: T^2 KL(softmax(teacher / T) || softmax(student / T)), T = 4 (spec 9).
  fitnets_loss: mean squared error between a 1x1-conv projection of the student's layer4 map and the teacher's
      layer4 map of the paired NBI image (spec 9).

All are pure functions of arrays, computed in float32 whatever the input dtype; each returns a scalar, the mean over
the B pairs. The teacher's logits and layer4 maps are under stop_gradient in the losses that take them (KD, FitNets,
the logit alignment); the dense loss detaches nothing (its NBI side is the trainable projection of the frozen
teacher's map, as in the group loss, `srca`). The methods that train with these losses are not here.
"""

import jax
import jax.numpy as jnp

from pagkd_jax.distill import relations
from pagkd_jax.distill import srca

PAGKD_AMBIGUOUS_WEIGHT = 0.5  # PaGKD's paired stream (the release's confuse_value).
ADD_AMBIGUOUS_WEIGHT = 0.0  # ADD: an ambiguous position relates to nothing.
HINTON_TEMPERATURE = 4.0

_RELEASE_FILL = -1e9  # Logits of zero-weight relations (the release's masked_fill value).
_COS_EPS = 1e-12  # As torch.nn.CosineEmbeddingLoss: dot / sqrt((|x|^2 + eps)(|y|^2 + eps)).


def _cosine(x: jax.Array, y: jax.Array) -> jax.Array:
  """Cosine of the last axis: (..., n), (..., n) -> (...)."""
  dot = jnp.sum(x * y, axis=-1)
  return dot / jnp.sqrt((jnp.sum(jnp.square(x), axis=-1) + _COS_EPS) * (jnp.sum(jnp.square(y), axis=-1) + _COS_EPS))


def relation_weights(q_labels: jax.Array, k_labels: jax.Array, ambiguous_weight: float) -> jax.Array:
  """Multiplicative relation weights of the release's dense losses (spec 5.4, 8, 9).

  Args:
    q_labels: `(..., Tq)` int labels in {-1 ambiguous, 0 background, 1 lesion} of the query positions.
    k_labels: `(..., Tk)` int labels of the key positions.
    ambiguous_weight: the weight when either label is ambiguous (0.5 PaGKD, 0 ADD).

  Returns:
    `(..., Tq, Tk)` float32: 1 for equal known labels, 0 for different known labels, `ambiguous_weight` otherwise.
  """
  q = q_labels[..., :, None]
  k = k_labels[..., None, :]
  either_ambiguous = (q == relations.AMBIGUOUS) | (k == relations.AMBIGUOUS)
  return jnp.where(either_ambiguous, ambiguous_weight, (q == k).astype(jnp.float32)).astype(jnp.float32)


def dense_pair_loss(f_query: jax.Array, f_key: jax.Array, labels_query: jax.Array, labels_key: jax.Array,
                    ambiguous_weight: float = PAGKD_AMBIGUOUS_WEIGHT) -> jax.Array:
  """The per-image dense loss of one direction (spec 8): each query map reconstructed from its pair's key map.

  For pair i, with q = f_query[i] and k = f_key[i] flattened to (T, d), T = h*w, and W the relation weights of
  the two images' labels: logits = (q k^T) * W with the entries where W = 0 set to -1e9, A = softmax over the keys,
  reconstruction = A k, loss_i = 1 - cos(flattened reconstruction, flattened q). No projection, no scaling.

  Args:
    f_query: `(B, h, w, d)` query-side maps, also the targets.
    f_key: `(B, h, w, d)` key- and value-side maps of the paired images.
    labels_query: `(B, h, w)` int labels of the query images (`relations.dual_threshold_labels`).
    labels_key: `(B, h, w)` int labels of the key images.
    ambiguous_weight: relation value of ambiguous positions (0.5 PaGKD, 0 ADD).

  Returns:
    scalar float32: the mean of loss_i over the B pairs.
  """
  if f_query.ndim != 4 or f_query.shape != f_key.shape:
    raise ValueError(f"f_query and f_key must both be (B, h, w, d), got {f_query.shape} and {f_key.shape}")
  for name, labels in (("labels_query", labels_query), ("labels_key", labels_key)):
    if labels.shape != f_query.shape[:3]:
      raise ValueError(f"{name} must be (B, h, w) = {f_query.shape[:3]}, got {labels.shape}")
  b, h, w, d = f_query.shape
  q = f_query.reshape(b, h * w, d).astype(jnp.float32)
  k = f_key.reshape(b, h * w, d).astype(jnp.float32)
  weights = relation_weights(labels_query.reshape(b, h * w), labels_key.reshape(b, h * w), ambiguous_weight)
  logits = jnp.einsum("btd,bvd->btv", q, k)
  logits = jnp.where(weights == 0, _RELEASE_FILL, logits * weights)
  logits = logits - jnp.max(jax.lax.stop_gradient(logits), axis=-1, keepdims=True)
  attention = jnp.exp(logits) / jnp.sum(jnp.exp(logits), axis=-1, keepdims=True)
  recon = jnp.einsum("btv,bvd->btd", attention, k)
  return jnp.mean(1.0 - _cosine(recon.reshape(b, -1), q.reshape(b, -1)))


def bidirectional_dense_pair_loss(f_wli: jax.Array, f_nbi: jax.Array, labels_wli: jax.Array, labels_nbi: jax.Array,
                                  ambiguous_weight: float = PAGKD_AMBIGUOUS_WEIGHT) -> jax.Array:
  """The paired stream's dense loss (spec 8): the sum of the two directions of `dense_pair_loss`, queries NBI with
  keys and values WLI, and queries WLI with keys and values NBI (the release adds its two directions).

  Args:
    f_wli: `(B, h, w, d)` student group features of the WLI images.
    f_nbi: `(B, h, w, d)` teacher-side group features of the paired NBI images.
    labels_wli, labels_nbi: `(B, h, w)` int labels of the two images of each pair.
    ambiguous_weight: relation value of ambiguous positions (0.5 PaGKD, 0 ADD).

  Returns:
    scalar float32.
  """
  return (dense_pair_loss(f_nbi, f_wli, labels_nbi, labels_wli, ambiguous_weight)
          + dense_pair_loss(f_wli, f_nbi, labels_wli, labels_nbi, ambiguous_weight))


def srca_pair_loss(srca_params: dict, f_wli: jax.Array, f_nbi: jax.Array, labels_wli: jax.Array,
                   labels_nbi: jax.Array, proj_dim: int | None = None, masked: bool = True, bidirectional: bool = True,
                   dtype=jnp.float32) -> jax.Array:
  """The paper's variant of the paired stream's dense loss (spec 8): the paper SRCA of GKD-Den (spec 5.5,
  `srca.SRCA`) with each pair a group of one WLI and one NBI image: queries of one image attend over the keys of its
  partner with the same label, the squared error pooled over the valid queries of the batch, mean of the directions.

  Args:
    srca_params: the SRCA's parameters (its `query` and `key` projections; PaGKD shares the group loss's).
    f_wli: `(B, h, w, d)` student tokens of the WLI images. f_nbi: `(B, h, w, d)` teacher-side tokens of their pairs.
    labels_wli, labels_nbi: `(B, h, w)` int labels in {-1, 0, 1} of the two images of each pair.
    proj_dim, masked, bidirectional, dtype: as `srca.SRCA`.

  Returns:
    scalar float32.
  """
  _check_same_shape("f_wli", f_wli, "f_nbi", f_nbi, 4)
  module = srca.SRCA(proj_dim=proj_dim, variant="paper", masked=masked, bidirectional=bidirectional, dtype=dtype)
  loss, _ = module.apply({"params": srca_params}, f_wli[:, None], f_nbi[:, None], labels_wli[:, None],
                         labels_nbi[:, None])
  return loss


def logit_alignment_loss(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """ADD's logit alignment (spec 9): mean over the pairs of 1 - cos(student_logits_i, stop_gradient(teacher_i)).

  Args:
    student_logits: `(B, C)` the student's logits of the WLI images.
    teacher_logits: `(B, C)` the frozen teacher's logits of the paired NBI images.

  Returns:
    scalar float32.
  """
  _check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits, ndim=2)
  t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  return jnp.mean(1.0 - _cosine(student_logits.astype(jnp.float32), t))


def hinton_kd_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                   temperature: float = HINTON_TEMPERATURE) -> jax.Array:
  """Hinton knowledge distillation (spec 9): T^2 KL(p_t || p_s), p_t = softmax(teacher / T), p_s = softmax(student /
  T), summed over the classes and averaged over the pairs (torch's KLDivLoss with reduction "batchmean"), teacher
  under stop_gradient.

  Args:
    student_logits: `(B, C)` the student's logits of the WLI images.
    teacher_logits: `(B, C)` the frozen teacher's logits of the paired NBI images.
    temperature: T (> 0).

  Returns:
    scalar float32.
  """
  _check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits, ndim=2)
  if not temperature > 0:
    raise ValueError(f"hinton_kd_loss: temperature must be > 0, got {temperature!r}")
  t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
  log_p_t = jax.nn.log_softmax(t, axis=-1)
  log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  return temperature ** 2 * jnp.mean(kl)


def fitnets_loss(student_features: jax.Array, kernel: jax.Array, teacher_features: jax.Array,
                 bias: jax.Array | None = None) -> jax.Array:
  """FitNets hint loss (spec 9): mean squared error between the 1x1-conv projection of the student's layer4 map,
  f_s kernel (+ bias) at every position, and stop_gradient of the teacher's layer4 map of the paired NBI image,
  averaged over every element.

  Args:
    student_features: `(B, h, w, C_s)` the student's layer4 maps of the WLI images.
    kernel: `(C_s, C_t)` the trainable 1x1 convolution (the regressor).
    teacher_features: `(B, h, w, C_t)` the frozen teacher's layer4 maps of the paired NBI images.
    bias: optional `(C_t,)`.

  Returns:
    scalar float32.
  """
  b, h, w, c_s = student_features.shape
  if kernel.shape[0] != c_s or teacher_features.shape != (b, h, w, kernel.shape[1]):
    raise ValueError(f"fitnets_loss: student (B, h, w, C_s) = {student_features.shape}, kernel (C_s, C_t) = "
                     f"{kernel.shape} and teacher (B, h, w, C_t) = {teacher_features.shape} do not fit")
  projected = jnp.einsum("bhwc,ct->bhwt", student_features.astype(jnp.float32), kernel.astype(jnp.float32))
  if bias is not None:
    projected = projected + bias.astype(jnp.float32)
  target = jax.lax.stop_gradient(teacher_features).astype(jnp.float32)
  return jnp.mean(jnp.square(projected - target))


def _check_same_shape(name_a: str, a: jax.Array, name_b: str, b: jax.Array, ndim: int) -> None:
  if a.ndim != ndim or a.shape != b.shape:
    raise ValueError(f"{name_a} and {name_b} must both be {ndim}-d arrays of one shape, got {a.shape} and {b.shape}")
