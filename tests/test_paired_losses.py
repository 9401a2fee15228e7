"""The paired methods' losses (pagkd_jax/distill/paired_losses.py) against slow NumPy references (spec 8, 9)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagkd_jax.distill import paired_losses
from pagkd_jax.distill import srca

B, H, W, D, C = 3, 3, 2, 5, 4


def _maps(seed, shape=(B, H, W, D)):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _labels(seed, shape=(B, H, W)):
  return np.random.default_rng(seed).integers(-1, 2, size=shape).astype(np.int8)


def _np_cos(x, y):
  x, y = np.ravel(x).astype(np.float64), np.ravel(y).astype(np.float64)
  return float(x @ y / np.sqrt((x @ x + 1e-12) * (y @ y + 1e-12)))


def _np_dense(f_q, f_k, l_q, l_k, ambiguous_weight):
  """One direction, pair by pair and position by position."""
  losses = []
  for i in range(f_q.shape[0]):
    q = f_q[i].reshape(-1, f_q.shape[-1]).astype(np.float64)
    k = f_k[i].reshape(-1, f_k.shape[-1]).astype(np.float64)
    lq, lk = l_q[i].reshape(-1), l_k[i].reshape(-1)
    recon = np.zeros_like(q)
    for t in range(len(q)):
      row = np.empty(len(k))
      for v in range(len(k)):
        if lq[t] == -1 or lk[v] == -1:
          weight = ambiguous_weight
        else:
          weight = 1.0 if lq[t] == lk[v] else 0.0
        row[v] = -1e9 if weight == 0 else weight * (q[t] @ k[v])
      a = np.exp(row - row.max())
      a /= a.sum()
      recon[t] = a @ k
    losses.append(1.0 - _np_cos(recon, q))
  return float(np.mean(losses))


@pytest.mark.parametrize("ambiguous_weight", [paired_losses.PAGKD_AMBIGUOUS_WEIGHT, paired_losses.ADD_AMBIGUOUS_WEIGHT])
def test_dense_pair_loss_matches_the_numpy_reference(ambiguous_weight):
  f_q, f_k, l_q, l_k = _maps(0), _maps(1), _labels(2), _labels(3)
  got = paired_losses.dense_pair_loss(jnp.asarray(f_q), jnp.asarray(f_k), jnp.asarray(l_q), jnp.asarray(l_k),
                                      ambiguous_weight)
  np.testing.assert_allclose(float(got), _np_dense(f_q, f_k, l_q, l_k, ambiguous_weight), rtol=1e-5, atol=1e-6)


def test_the_ambiguous_relation_value_changes_the_loss():
  f_q, f_k, l_q, l_k = _maps(0), _maps(1), _labels(2), _labels(3)
  assert (l_q == -1).any() and (l_k == -1).any()
  pagkd = paired_losses.dense_pair_loss(f_q, f_k, l_q, l_k, paired_losses.PAGKD_AMBIGUOUS_WEIGHT)
  add = paired_losses.dense_pair_loss(f_q, f_k, l_q, l_k, paired_losses.ADD_AMBIGUOUS_WEIGHT)
  assert abs(float(pagkd) - float(add)) > 1e-3
  known = np.where(l_q == -1, 0, l_q), np.where(l_k == -1, 1, l_k)  # No ambiguous label: the value plays no part.
  np.testing.assert_allclose(float(paired_losses.dense_pair_loss(f_q, f_k, *known, 0.5)),
                             float(paired_losses.dense_pair_loss(f_q, f_k, *known, 0.0)), rtol=1e-6)


def test_with_the_release_weights_each_pair_is_a_release_group_of_one():
  """PaGKD's paired loss is the group loss of `srca` (release variant) on groups of one image."""
  f_q, f_k, l_q, l_k = _maps(4), _maps(5), _labels(6), _labels(7)
  per_pair = [srca.release_pair_loss(jnp.asarray(f_q[i].reshape(1, H * W, D)), jnp.asarray(f_k[i].reshape(1, H * W, D)),
                                     jnp.asarray(l_q[i].reshape(1, -1), jnp.int32),
                                     jnp.asarray(l_k[i].reshape(1, -1), jnp.int32)) for i in range(B)]
  got = paired_losses.dense_pair_loss(f_q, f_k, l_q, l_k, paired_losses.PAGKD_AMBIGUOUS_WEIGHT)
  np.testing.assert_allclose(float(got), float(np.mean(per_pair)), rtol=1e-6)


def test_bidirectional_loss_is_the_sum_of_both_directions():
  f_wli, f_nbi, l_wli, l_nbi = _maps(8), _maps(9), _labels(10), _labels(11)
  got = paired_losses.bidirectional_dense_pair_loss(f_wli, f_nbi, l_wli, l_nbi, paired_losses.ADD_AMBIGUOUS_WEIGHT)
  want = _np_dense(f_nbi, f_wli, l_nbi, l_wli, 0.0) + _np_dense(f_wli, f_nbi, l_wli, l_nbi, 0.0)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)


def test_a_query_with_no_related_key_is_finite_with_finite_gradients():
  """ADD: an ambiguous query relates to nothing (a row of -1e9, a uniform softmax), never NaN."""
  f_q, f_k = _maps(12), _maps(13)
  l_q = np.full((B, H, W), -1, np.int8)
  l_k = _labels(14)
  loss, grads = jax.value_and_grad(paired_losses.dense_pair_loss, argnums=(0, 1))(
      jnp.asarray(f_q), jnp.asarray(f_k), l_q, l_k, 0.0)
  assert np.isfinite(float(loss)) and all(np.isfinite(np.asarray(g)).all() for g in grads)
  recon = np.broadcast_to(f_k.reshape(B, -1, D).mean(axis=1, keepdims=True), (B, H * W, D))  # Uniform attention.
  want = np.mean([1.0 - _np_cos(recon[i], f_q[i]) for i in range(B)])
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_identical_maps_with_one_label_reconstruct_nearly_exactly():
  """Sanity: a map whose positions are far apart attends to itself, so the loss is about 0."""
  f = np.zeros((1, 2, 2, 4), np.float32)
  f[0].reshape(4, 4)[:] = 10 * np.eye(4)
  labels = np.ones((1, 2, 2), np.int8)
  assert float(paired_losses.dense_pair_loss(f, f, labels, labels)) < 1e-6


def np_srca_pair_loss(f_wli, f_nbi, l_wli, l_nbi, w_q, w_k, bidirectional=True):
  """The paper's paired dense loss, pair by pair and query by query (spec 5.5, 8): a query of one image attends over
  the keys of its partner with its own (known) label; squared error pooled over the valid queries; mean of the
  directions (NBI -> WLI: queries WLI; WLI -> NBI: queries NBI)."""
  p = w_q.shape[1]
  directions = [(f_wli, l_wli, f_nbi, l_nbi), (f_nbi, l_nbi, f_wli, l_wli)][:2 if bidirectional else 1]
  losses = []
  for f_q, l_q, f_k, l_k in directions:
    err_sum, count = 0.0, 0
    for i in range(f_q.shape[0]):
      x_q = f_q[i].reshape(-1, f_q.shape[-1]).astype(np.float64)
      x_k = f_k[i].reshape(-1, f_k.shape[-1]).astype(np.float64)
      lq, lk = l_q[i].reshape(-1), l_k[i].reshape(-1)
      for t in range(len(x_q)):
        keys = [v for v in range(len(x_k)) if lq[t] != -1 and lk[v] == lq[t]]
        if not keys:
          continue
        logits = np.array([(x_q[t] @ w_q) @ (x_k[v] @ w_k) / np.sqrt(p) for v in keys])
        a = np.exp(logits - logits.max())
        a /= a.sum()
        recon = sum(a[j] * x_k[v] for j, v in enumerate(keys))
        err_sum += np.mean((recon - x_q[t]) ** 2)
        count += 1
    losses.append(err_sum / max(count, 1))
  return float(np.mean(losses))


@pytest.mark.parametrize("bidirectional", [True, False])
def test_srca_pair_loss_matches_the_numpy_reference_and_keeps_each_pair_apart(bidirectional):
  f_wli, f_nbi, l_wli, l_nbi = _maps(0), _maps(1), _labels(2), _labels(3)
  l_wli[0] = -1  # A WLI image with no known label: its queries enter neither direction's loss.
  module = srca.SRCA(proj_dim=2, bidirectional=bidirectional)
  params = module.init(jax.random.key(4), *(jnp.asarray(x)[:, None] for x in (f_wli, f_nbi, l_wli, l_nbi)))["params"]
  got = paired_losses.srca_pair_loss(params, jnp.asarray(f_wli), jnp.asarray(f_nbi), jnp.asarray(l_wli),
                                     jnp.asarray(l_nbi), proj_dim=2, bidirectional=bidirectional)
  want = np_srca_pair_loss(f_wli, f_nbi, l_wli, l_nbi, np.asarray(params["query"]["kernel"], np.float64),
                           np.asarray(params["key"]["kernel"], np.float64), bidirectional)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # Each pair is its own group: the B images as one group of B (attention across pairs) give another loss.
  whole_batch, _ = module.apply({"params": params}, *(jnp.asarray(x)[None] for x in (f_wli, f_nbi, l_wli, l_nbi)))
  assert abs(float(whole_batch) - want) > 1e-3


def test_logit_alignment_matches_the_reference_and_leaves_the_teacher_alone():
  s, t = _maps(15, (B, C)), _maps(16, (B, C))
  want = np.mean([1.0 - _np_cos(s[i], t[i]) for i in range(B)])
  np.testing.assert_allclose(float(paired_losses.logit_alignment_loss(s, t)), want, rtol=1e-6)
  assert float(paired_losses.logit_alignment_loss(s, 3.0 * s)) == pytest.approx(0.0, abs=1e-6)  # Scale-free.
  g_t = jax.grad(paired_losses.logit_alignment_loss, argnums=1)(jnp.asarray(s), jnp.asarray(t))
  assert not np.asarray(g_t).any()


def _np_kd(s, t, temperature):
  s, t = s.astype(np.float64) / temperature, t.astype(np.float64) / temperature
  total = 0.0
  for i in range(len(s)):
    p_t = np.exp(t[i] - t[i].max()) / np.exp(t[i] - t[i].max()).sum()
    p_s = np.exp(s[i] - s[i].max()) / np.exp(s[i] - s[i].max()).sum()
    total += sum(p_t[c] * np.log(p_t[c] / p_s[c]) for c in range(len(p_t)))
  return temperature ** 2 * total / len(s)


@pytest.mark.parametrize("temperature", [1.0, paired_losses.HINTON_TEMPERATURE])
def test_hinton_kd_matches_the_reference_and_its_known_gradient(temperature):
  s, t = 3 * _maps(17, (B, C)), 3 * _maps(18, (B, C))
  got = paired_losses.hinton_kd_loss(jnp.asarray(s), jnp.asarray(t), temperature)
  np.testing.assert_allclose(float(got), _np_kd(s, t, temperature), rtol=1e-5)
  # d/ds [T^2 KL(p_t || p_s)] / B = T (p_s - p_t) / B; nothing reaches the teacher.
  g_s, g_t = jax.grad(paired_losses.hinton_kd_loss, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t), temperature)
  p = lambda z: np.exp(z / temperature) / np.exp(z / temperature).sum(axis=-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(g_s), temperature * (p(s.astype(np.float64)) - p(t.astype(np.float64))) / B,
                             rtol=1e-4, atol=1e-6)
  assert not np.asarray(g_t).any()
  assert float(paired_losses.hinton_kd_loss(s, s, temperature)) == pytest.approx(0.0, abs=1e-6)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    paired_losses.hinton_kd_loss(s, t, 0.0)


def test_fitnets_matches_the_reference():
  c_s, c_t = 6, 5
  f_s, f_t = _maps(19, (B, H, W, c_s)), _maps(20, (B, H, W, c_t))
  kernel, bias = _maps(21, (c_s, c_t)), _maps(22, (c_t,))
  total = 0.0
  for i in range(B):
    for y in range(H):
      for x in range(W):
        for c in range(c_t):
          projected = sum(float(f_s[i, y, x, j]) * float(kernel[j, c]) for j in range(c_s)) + float(bias[c])
          total += (projected - float(f_t[i, y, x, c])) ** 2
  got = paired_losses.fitnets_loss(jnp.asarray(f_s), jnp.asarray(kernel), jnp.asarray(f_t), jnp.asarray(bias))
  np.testing.assert_allclose(float(got), total / (B * H * W * c_t), rtol=1e-5)
  no_bias = np.mean((np.einsum("bhwc,ct->bhwt", f_s.astype(np.float64), kernel) - f_t) ** 2)
  np.testing.assert_allclose(float(paired_losses.fitnets_loss(f_s, kernel, f_t)), no_bias, rtol=1e-5)
  g_t = jax.grad(paired_losses.fitnets_loss, argnums=2)(jnp.asarray(f_s), jnp.asarray(kernel), jnp.asarray(f_t))
  assert not np.asarray(g_t).any()
  with pytest.raises(ValueError, match="do not fit"):
    paired_losses.fitnets_loss(f_s, kernel.T, f_t)


def test_shapes_that_do_not_fit_are_named():
  with pytest.raises(ValueError, match=r"labels_key must be \(B, h, w\)"):
    paired_losses.dense_pair_loss(_maps(0), _maps(1), _labels(2), _labels(3, (B, W, H)))
  with pytest.raises(ValueError, match="f_wli and f_nbi"):
    paired_losses.srca_pair_loss({}, _maps(0), _maps(1, (B, W, H, D)), _labels(2), _labels(3))
  with pytest.raises(ValueError, match="student_logits and teacher_logits"):
    paired_losses.logit_alignment_loss(_maps(0, (B, C)), _maps(1, (B, C + 1)))
