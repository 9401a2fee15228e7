"""GKD-Pro losses on prototype sets (spec section 4): paper InfoNCE, release loss, prototype head.

Prototype sets are `(G, N_q, d)` arrays, one set per group and modality (G = C class groups, or
C*K image pairs for the image-level ablation). Everything is computed in float32 whatever the input
dtype.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from pagkd_jax.distill import qformer

# The similarity matrices are tiny; keep them exact float32 (no TF32) on accelerators.
_HIGHEST = jax.lax.Precision.HIGHEST


def _safe_normalize(x: jax.Array, axis: int, eps: float) -> jax.Array:
  """x / max(||x||, eps) along `axis`, with a finite gradient at x = 0."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _check_sets(q_wli: jax.Array, q_nbi: jax.Array, labels: jax.Array, who: str) -> None:
  if q_wli.ndim != 3 or q_wli.shape != q_nbi.shape:
    raise ValueError(
        f"{who}: q_wli and q_nbi must both have shape (G, N_q, d); got {tuple(q_wli.shape)} and "
        f"{tuple(q_nbi.shape)}.")
  if labels.shape != (q_wli.shape[0],):
    raise ValueError(
        f"{who}: labels must have shape (G,) = ({q_wli.shape[0]},); got {tuple(labels.shape)}.")


def prototype_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-6) -> jax.Array:
  """S(A, B) = (1/N_q) sum_i cos(a_i, b_i) (spec 4, "Similarity of two prototype sets").

  Args:
    a: `(..., N_q, d)`.
    b: `(..., N_q, d)` (broadcastable against `a`).
    eps: lower bound on each vector norm, so a zero vector gives cos = 0, not NaN.

  Returns:
    `(...)` float32.
  """
  a = _safe_normalize(a.astype(jnp.float32), -1, eps)
  b = _safe_normalize(b.astype(jnp.float32), -1, eps)
  return jnp.mean(jnp.sum(a * b, axis=-1), axis=-1)


def _candidates(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Positive index and candidate mask for the 2G anchors over the 2G sets [WLI; NBI].

  Returns:
    positive `(2G,)`: the other modality's set of the same group; mask `(2G, 2G)`: True for the
    positive and for every set of a different label (the negatives).
  """
  g = labels.shape[0]
  all_labels = jnp.concatenate([labels, labels])
  positive = jnp.concatenate([jnp.arange(g) + g, jnp.arange(g)])
  mask = all_labels[:, None] != all_labels[None, :]
  mask = mask | (jnp.arange(2 * g)[None, :] == positive[:, None])
  return positive, mask


def group_contrastive_loss(q_wli: jax.Array, q_nbi: jax.Array, labels: jax.Array,
                           temperature: float = 0.1, symmetric: bool = True,
                           eps: float = 1e-6) -> jax.Array:
  """Paper GKD-Pro loss (spec 4, "Paper loss"): InfoNCE over prototype sets with logits S / tau.

  Anchor Q_g^WLI, positive Q_g^NBI, negatives = the WLI and NBI sets of every group whose label
  differs from labels[g]; same-label sets other than the positive are ignored (image-level
  ablation). With `symmetric`, also anchor Q_g^NBI with positive Q_g^WLI; the loss is the mean over
  anchors and directions. An anchor without negatives contributes log(1) = 0. With G = C groups of
  distinct labels this is exactly the spec's loss.

  Args:
    q_wli: `(G, N_q, d)` WLI prototype sets.
    q_nbi: `(G, N_q, d)` NBI prototype sets.
    labels: `(G,)` int class of each group.
    temperature: tau.
    symmetric: both directions (True) or WLI anchors only.
    eps: norm floor of `prototype_similarity`.

  Returns:
    scalar float32.
  """
  labels = jnp.asarray(labels)
  _check_sets(q_wli, q_nbi, labels, "group_contrastive_loss")
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ValueError(f"group_contrastive_loss: temperature must be > 0; got {temperature}.")
  g = q_wli.shape[0]
  n_q = q_wli.shape[1]
  sets = _safe_normalize(jnp.concatenate([q_wli, q_nbi]).astype(jnp.float32), -1, eps)
  # (2G, 2G): S of every pair of sets.
  sim = jnp.einsum("aqc,bqc->ab", sets, sets, precision=_HIGHEST) / n_q
  logits = sim / temperature
  positive, mask = _candidates(labels)
  pos_logit = jnp.take_along_axis(logits, positive[:, None], axis=1)[:, 0]
  per_anchor = jax.nn.logsumexp(logits, axis=1, where=mask) - pos_logit  # (2G,)
  if not symmetric:
    per_anchor = per_anchor[:g]
  return jnp.mean(per_anchor)


def release_prototype_loss(q_wli: jax.Array, q_nbi: jax.Array, labels: jax.Array,
                           divisor: float = 20.0, eps: float = 1e-6) -> jax.Array:
  """Release GKD-Pro contrastive loss (spec 4, "Release loss").

  Every set is L2-normalised along the query axis for each channel (norm floored at `eps`); the
  similarity of two sets is sum over channels and queries of their elementwise product / `divisor`.
  Anchors are WLI only: loss_g = -log(exp(s_pos) / (1 + exp(s_pos) + sum_neg exp(s_neg))), with
  positive Q_g^NBI and negatives = all sets (both modalities) of a different label; summed over
  the anchors, as the release sums over its C WLI anchors.

  Args:
    q_wli: `(G, N_q, d)`.
    q_nbi: `(G, N_q, d)`.
    labels: `(G,)` int.
    divisor: the release's constant 20.
    eps: norm floor.

  Returns:
    scalar float32.
  """
  labels = jnp.asarray(labels)
  _check_sets(q_wli, q_nbi, labels, "release_prototype_loss")
  g = q_wli.shape[0]
  # (2G, N_q, d), unit norm over N_q for every (set, channel); sim (G, 2G).
  sets = _safe_normalize(jnp.concatenate([q_wli, q_nbi]).astype(jnp.float32), 1, eps)
  sim = jnp.einsum("aqc,bqc->ab", sets[:g], sets, precision=_HIGHEST) / divisor
  positive, mask = _candidates(labels)
  positive, mask = positive[:g], mask[:g]
  pos_logit = jnp.take_along_axis(sim, positive[:, None], axis=1)[:, 0]
  # The "+1" of the denominator is a constant logit 0 that is always present.
  logits = jnp.concatenate([jnp.zeros((g, 1), jnp.float32), sim], axis=1)
  mask = jnp.concatenate([jnp.ones((g, 1), bool), mask], axis=1)
  return jnp.sum(jax.nn.logsumexp(logits, axis=1, where=mask) - pos_logit)


class PrototypeClassifier(nn.Module):
  """Release prototype classification head (spec 4, "Release loss"): `(S, N_q, d) -> (S, C)`.

  Mean over the queries (float32), then a linear layer with bias, initialised as torch's `nn.Linear`:
  kernel and bias U(-1/sqrt(d), 1/sqrt(d)). Logits are float32.

  Attributes:
    num_classes: C.
  """

  num_classes: int

  @nn.compact
  def __call__(self, prototypes: jax.Array) -> jax.Array:
    """prototypes `(S, N_q, d)` -> logits `(S, C)`."""
    if prototypes.ndim != 3:
      raise ValueError(
          f"PrototypeClassifier expects (S, N_q, d) prototype sets; got {tuple(prototypes.shape)}.")
    pooled = jnp.mean(prototypes.astype(jnp.float32), axis=1)
    torch_default = qformer.symmetric_uniform(1.0 / math.sqrt(prototypes.shape[-1]))
    return nn.Dense(self.num_classes, dtype=jnp.float32, kernel_init=torch_default, bias_init=torch_default,
                    name="fc")(pooled)


def prototype_classification_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy of the prototype head: logits `(S, C)`, int labels `(S,)` -> scalar."""
  labels = jnp.asarray(labels)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(
        f"prototype_classification_loss: logits must be (S, C) and labels (S,); got "
        f"{tuple(logits.shape)} and {tuple(labels.shape)}.")
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_probs, labels.astype(jnp.int32)[:, None], axis=-1)[:, 0]
  return -jnp.mean(picked)
