"""Dual-threshold CAM labels and the semantic relations between positions (spec 5.3, 5.4).

Labels are int8: `LESION` (1), `BACKGROUND` (0), `AMBIGUOUS` (-1). Two positions are related iff
both labels are known and equal. The paper expresses this as an additive {0, -inf} mask, the
release as multiplicative logit weights {1, 0, 0.5}. The training path of the paper variant never
builds the (L, L) mask (see `srca.py`); `relation_mask` exists for tests and debugging.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

LESION = 1
BACKGROUND = 0
AMBIGUOUS = -1


def dual_threshold_labels(fg: jax.Array, thresholds: Sequence[float] = (0.7, 0.3)) -> jax.Array:
  """Lesion / background / ambiguous labels from two refined foreground maps (spec 5.3).

  `fg[:, i]` is the foreground map obtained with background score `thresholds[i]` (the output of
  `pixel_adaptive_refinement` with the same `thresholds`, in either order). With `hi` the index
  of the larger and `lo` of the smaller threshold:
    * LESION (1)      where fg[:, hi] (foreground even against the high background score);
    * BACKGROUND (0)  where not fg[:, hi] and not fg[:, lo] (background even against the low one);
    * AMBIGUOUS (-1)  otherwise (foreground only under the low threshold).
  The rare conflict "foreground under hi but background under lo" (possible after refinement) is
  LESION, as in ToCo/the release (`refine_cams_with_bkg`).

  Args:
    fg: `(B, 2, h, w)` bool (or int, nonzero = foreground).
    thresholds: the two thresholds, in the order of axis 1 of `fg`.

  Returns:
    `(B, h, w)` int8.
  """
  if len(thresholds) != 2:
    raise ValueError(f"dual thresholds need exactly two values, got {tuple(thresholds)}")
  if thresholds[0] == thresholds[1]:
    raise ValueError(f"the two thresholds must differ, got {tuple(thresholds)}")
  if fg.ndim != 4 or fg.shape[1] != 2:
    raise ValueError(f"fg must be (B, 2, h, w), got shape {fg.shape}")
  hi = 0 if thresholds[0] > thresholds[1] else 1
  fg_hi = fg[:, hi].astype(bool)
  fg_lo = fg[:, 1 - hi].astype(bool)
  labels = jnp.where(fg_hi, LESION, jnp.where(fg_lo, AMBIGUOUS, BACKGROUND))
  return labels.astype(jnp.int8)


def _check_labels(q_labels: jax.Array, k_labels: jax.Array) -> None:
  """Labels must be `(..., Lq)` and `(..., Lk)` with broadcastable leading axes."""
  try:
    if q_labels.ndim < 1 or k_labels.ndim < 1:
      raise ValueError
    jnp.broadcast_shapes(q_labels.shape[:-1], k_labels.shape[:-1])
  except ValueError:
    raise ValueError(f"labels must be (..., Lq) and (..., Lk) with broadcastable leading axes, "
                     f"got {q_labels.shape} and {k_labels.shape}") from None


def relation_mask(q_labels: jax.Array, k_labels: jax.Array) -> jax.Array:
  """Paper relation matrix R: 0 where both labels are known and equal, -inf elsewhere.

  For tests and debugging only: the SRCA training path never builds it.

  Args:
    q_labels: `(..., Lq)` int labels of the query positions.
    k_labels: `(..., Lk)` int labels of the key positions (leading axes broadcast).

  Returns:
    `(..., Lq, Lk)` float32.
  """
  _check_labels(q_labels, k_labels)
  q = q_labels[..., :, None]
  k = k_labels[..., None, :]
  allowed = (q == k) & (q != AMBIGUOUS)
  return jnp.where(allowed, 0.0, -jnp.inf).astype(jnp.float32)


def release_relation_weights(q_labels: jax.Array, k_labels: jax.Array) -> jax.Array:
  """Release relation weights: 1 same known label, 0 different known labels, 0.5 either ambiguous.

  Args:
    q_labels: `(..., Lq)` int labels (one image's h*w positions in the release variant).
    k_labels: `(..., Lk)` int labels (leading axes broadcast).

  Returns:
    `(..., Lq, Lk)` float32.
  """
  _check_labels(q_labels, k_labels)
  q = q_labels[..., :, None]
  k = k_labels[..., None, :]
  either_ambiguous = (q == AMBIGUOUS) | (k == AMBIGUOUS)
  return jnp.where(either_ambiguous, 0.5, (q == k).astype(jnp.float32)).astype(jnp.float32)
