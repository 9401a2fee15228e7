"""Semantic-relation-guided cross-attention (SRCA) and the bidirectional loss L_den (spec 5.5, 5.6).

Directions. "nbi_to_wli" reconstructs the WLI tokens from the NBI tokens (queries WLI, keys and
values NBI, target WLI); "wli_to_nbi" is the reverse (queries NBI, keys and values WLI, target
NBI). `bidirectional=False` (ablation) keeps only "nbi_to_wli". Nothing is detached here: the
caller stops the gradient of the teacher backbone only.

Paper variant (default). Over the L = K*h*w tokens of a group:
  A = softmax(R + (X_q W_q)(X_k W_k)^T / sqrt(p)), reconstruction = A X_k, p = `proj_dim` (d // 4).
W_q, W_k: bias-free d -> p projections (the paper's formula has no bias), **shared by both
directions with the roles swapped**: the queries of either direction go through W_q, the keys
through W_k (so the reverse logits are not the transpose of the forward ones; the reverse mask is
R^T). The relation R (0 iff both labels known and equal, -inf otherwise) is never built: for each
label l in {0, 1}, all queries attend over the keys with label l (an additive *per-key* bias of 0 or
-1e30, linear in L) and the result is kept for the queries with label l. A query that is ambiguous,
or whose label has no key in the group, is invalid: it is excluded from the loss (its row of the
finite-bias softmax is uniform, so neither the value nor the gradient can be NaN). Loss per
direction = sum over groups and valid queries of mean_c (recon - target)^2, divided by
max(number of valid queries, 1) (pooled over the groups); L_den = mean over the directions.
`masked=False` (ablation "SRCA replaced by unmasked cross-attention"): same projections, plain
softmax over all keys, every query valid.

Release variant. No projections, no scaling; attention for every (query image m, key image n)
pair of a group: logits (h*w, h*w) = X_q[m] X_k[n]^T times the release relation weights of the
labels of image m (queries) and image n (keys), zero-weight entries set to -1e9, softmax over image
n's keys, reconstruction of image m from image n's values, loss 1 - cos(flattened reconstruction,
flattened image m). Mean over the K^2 pairs of a group, **summed** over the G groups and over the
directions, as the release sums its per-class terms and its two directions. (The release also built
the mask from the wrong images and compared against image n; both are fixed here, spec 7.)
`masked=False` drops the relation weights.

Logits, softmaxes and losses are float32 whatever the input dtype; `dtype` is the compute dtype of
the paper projections.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pagkd_jax.distill import relations

_KEY_MASK_BIAS = -1e30  # Finite: a query with no allowed key gets a uniform row, not NaN.
_RELEASE_FILL = -1e9  # The release's masked_fill value.
_COS_EPS = 1e-12  # As torch.nn.CosineEmbeddingLoss: dot / sqrt((|x|^2 + eps)(|y|^2 + eps)).
VARIANTS = ("paper", "release")


def _softmax(logits: jax.Array) -> jax.Array:
  """Float32 softmax over the last axis.

  The max is taken of stop_gradient(logits), so differentiation never traces the arg-max
  indicator (logits == max), which would be an (Lq, Lk) bool array.
  """
  shifted = logits - jnp.max(jax.lax.stop_gradient(logits), axis=-1, keepdims=True)
  unnormalized = jnp.exp(shifted)
  return unnormalized / jnp.sum(unnormalized, axis=-1, keepdims=True)


def masked_group_attention(queries: jax.Array, keys: jax.Array, values: jax.Array,
                           q_labels: jax.Array, k_labels: jax.Array,
                           masked: bool = True) -> tuple[jax.Array, jax.Array]:
  """Relation-masked cross-attention of one group, mask memory linear in L (spec 5.5, 5.6).

  Args:
    queries: `(Lq, p)` float32 projected queries, already scaled by 1/sqrt(p).
    keys: `(Lk, p)` float32 projected keys.
    values: `(Lk, d)` float32.
    q_labels: `(Lq,)` int labels in {-1, 0, 1}.
    k_labels: `(Lk,)` int labels.
    masked: False = plain softmax over all keys, every query valid.

  Returns:
    reconstruction `(Lq, d)` float32 (meaningless, but finite, on invalid rows) and validity
    `(Lq,)` bool: the query label is known and has at least one key with the same label.
  """
  logits = queries @ keys.T  # (Lq, Lk) float; the only (Lq, Lk) arrays are float.
  if not masked:
    return _softmax(logits) @ values, jnp.ones(queries.shape[:1], bool)
  recon = jnp.zeros((queries.shape[0], values.shape[-1]), jnp.float32)
  valid = jnp.zeros(queries.shape[:1], bool)
  for label in (relations.BACKGROUND, relations.LESION):
    key_has_label = k_labels == label  # (Lk,)
    key_bias = jnp.where(key_has_label, 0.0, _KEY_MASK_BIAS).astype(jnp.float32)
    out = _softmax(logits + key_bias[None, :]) @ values
    selected = (q_labels == label) & jnp.any(key_has_label)
    recon = jnp.where(selected[:, None], out, recon)
    valid = valid | selected
  return recon, valid


def _paper_direction(queries: jax.Array, keys: jax.Array, values: jax.Array, targets: jax.Array,
                     q_labels: jax.Array, k_labels: jax.Array,
                     masked: bool) -> tuple[jax.Array, jax.Array]:
  """Squared-error sum and valid count of one group, one direction (targets `(Lq, d)`)."""
  recon, valid = masked_group_attention(queries, keys, values, q_labels, k_labels, masked)
  err = jnp.mean(jnp.square(recon - targets), axis=-1)
  return jnp.sum(jnp.where(valid, err, 0.0)), jnp.sum(valid.astype(jnp.float32))


def release_pair_loss(f_q: jax.Array, f_k: jax.Array, q_labels: jax.Array, k_labels: jax.Array,
                      masked: bool = True) -> jax.Array:
  """Release dense loss of one group, one direction: mean over (m, n) of 1 - cos.

  Args:
    f_q: `(K, T, d)` float32 query-side tokens (also the targets), T = h*w.
    f_k: `(K, T, d)` float32 key/value-side tokens.
    q_labels: `(K, T)` int labels of the query images.
    k_labels: `(K, T)` int labels of the key images.

  Returns:
    scalar float32.
  """
  logits = jnp.einsum("mtd,nvd->mntv", f_q, f_k)  # (K, K, T, T)
  if masked:
    weights = relations.release_relation_weights(q_labels[:, None, :], k_labels[None, :, :])
    logits = jnp.where(weights == 0, _RELEASE_FILL, logits * weights)
  recon = jnp.einsum("mntv,nvd->mntd", _softmax(logits), f_k)
  dot = jnp.einsum("mntd,mtd->mn", recon, f_q)
  recon_sq = jnp.sum(jnp.square(recon), axis=(2, 3))
  target_sq = jnp.sum(jnp.square(f_q), axis=(1, 2))
  cos = dot / jnp.sqrt((recon_sq + _COS_EPS) * (target_sq[:, None] + _COS_EPS))
  return jnp.mean(1.0 - cos)


class SRCA(nn.Module):
  """GKD-Den loss over groups of WLI and NBI tokens (spec 5.5, 5.6; module docstring).

  Attributes:
    proj_dim: width p of the paper's query/key projections; None -> d // 4.
    variant: "paper" or "release".
    masked: False = ablation without the semantic relation (plain cross-attention).
    bidirectional: False = ablation with the NBI -> WLI direction only.
    dtype: compute dtype of the projections (params stay float32).
  """
  proj_dim: int | None = None
  variant: str = "paper"
  masked: bool = True
  bidirectional: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, f_wli: jax.Array, f_nbi: jax.Array, labels_wli: jax.Array,
               labels_nbi: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L_den and diagnostics.

    Args:
      f_wli: `(G, K, h, w, d)` student group tokens.
      f_nbi: `(G, K, h, w, d)` teacher-side group tokens.
      labels_wli: `(G, K, h, w)` int8 dual-threshold labels of the WLI images.
      labels_nbi: `(G, K, h, w)` int8 labels of the NBI images.

    Returns:
      scalar float32 loss (paper: mean over the directions; release: their sum) and a dict with, per
      direction `dir`, `loss/dir`, `valid_fraction/dir` (queries that enter the loss; 1 for the release
      and unmasked variants) and `known_fraction/dir` (queries with a known label).
    """
    if self.variant not in VARIANTS:
      raise ValueError(f"SRCA variant must be one of {VARIANTS}, got {self.variant!r}")
    if f_wli.ndim != 5 or f_wli.shape != f_nbi.shape:
      raise ValueError(f"f_wli and f_nbi must both be (G, K, h, w, d), got {f_wli.shape} and "
                       f"{f_nbi.shape}")
    for name, labels in (("labels_wli", labels_wli), ("labels_nbi", labels_nbi)):
      if labels.shape != f_wli.shape[:4]:
        raise ValueError(f"{name} must be (G, K, h, w) = {f_wli.shape[:4]}, got {labels.shape}")
      if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer labels in {{-1, 0, 1}}, got dtype {labels.dtype}")
    num_groups, k, h, w, d = f_wli.shape

    directions = [("nbi_to_wli", f_wli, labels_wli, f_nbi, labels_nbi)]
    if self.bidirectional:
      directions.append(("wli_to_nbi", f_nbi, labels_nbi, f_wli, labels_wli))

    if self.variant == "paper":
      proj_dim = self.proj_dim if self.proj_dim is not None else d // 4
      if proj_dim < 1:
        raise ValueError(f"SRCA projection width must be >= 1, got {proj_dim} (d = {d})")
      w_q = nn.Dense(proj_dim, use_bias=False, dtype=self.dtype, name="query")
      w_k = nn.Dense(proj_dim, use_bias=False, dtype=self.dtype, name="key")

    losses, diagnostics = [], {}
    for name, f_q, l_q, f_k, l_k in directions:
      l_q = l_q.astype(jnp.int32)
      l_k = l_k.astype(jnp.int32)
      known = jnp.mean((l_q != relations.AMBIGUOUS).astype(jnp.float32))
      if self.variant == "paper":
        x_q = f_q.reshape(num_groups, k * h * w, d)
        x_k = f_k.reshape(num_groups, k * h * w, d)
        queries = w_q(x_q).astype(jnp.float32) * (proj_dim ** -0.5)
        keys = w_k(x_k).astype(jnp.float32)
        err_sum, count = jax.vmap(_paper_direction, in_axes=(0, 0, 0, 0, 0, 0, None))(
            queries, keys, x_k.astype(jnp.float32), x_q.astype(jnp.float32),
            l_q.reshape(num_groups, -1), l_k.reshape(num_groups, -1), self.masked)
        loss = jnp.sum(err_sum) / jnp.maximum(jnp.sum(count), 1.0)
        valid = jnp.sum(count) / (num_groups * k * h * w)
      else:
        per_group = jax.vmap(release_pair_loss, in_axes=(0, 0, 0, 0, None))(
            f_q.reshape(num_groups, k, h * w, d).astype(jnp.float32),
            f_k.reshape(num_groups, k, h * w, d).astype(jnp.float32),
            l_q.reshape(num_groups, k, h * w), l_k.reshape(num_groups, k, h * w), self.masked)
        loss = jnp.sum(per_group)
        valid = jnp.ones((), jnp.float32)
      losses.append(loss)
      diagnostics[f"loss/{name}"] = loss
      diagnostics[f"valid_fraction/{name}"] = valid
      diagnostics[f"known_fraction/{name}"] = known
    total = sum(losses)
    return (total if self.variant == "release" else total / len(losses)), diagnostics
