"""Tests of the GKD-Pro losses (pagkd_jax/distill/prototype_loss.py, spec section 4)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagkd_jax.distill import prototype_loss as pl

NUM_QUERIES, D = 3, 5

# Jitted entry points: one compilation per shape instead of one per primitive (short cold runs).
_group_loss = jax.jit(pl.group_contrastive_loss, static_argnames=("symmetric",))
_release_loss = jax.jit(pl.release_prototype_loss)
_similarity = jax.jit(pl.prototype_similarity)


def _sets(seed: int, g: int) -> tuple[jax.Array, jax.Array]:
  k1, k2 = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(k1, (g, NUM_QUERIES, D)), jax.random.normal(k2, (g, NUM_QUERIES, D)))


# ---- NumPy references (float64, explicit loops) ------------------------------------------------


def np_cos(u, v):
  nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(x * x for x in v))
  if nu == 0 or nv == 0:
    return 0.0
  return sum(x * y for x, y in zip(u, v)) / (nu * nv)


def np_similarity(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return sum(np_cos(a[i], b[i]) for i in range(a.shape[0])) / a.shape[0]


def np_group_loss(q_wli, q_nbi, labels, tau, symmetric):
  q_wli, q_nbi = np.asarray(q_wli, np.float64), np.asarray(q_nbi, np.float64)
  g = len(labels)
  sets = [q_wli[i] for i in range(g)] + [q_nbi[i] for i in range(g)]
  set_labels = list(labels) + list(labels)
  directions = [(0, g)] + ([(g, 0)] if symmetric else [])
  losses = []
  for anchor_offset, positive_offset in directions:
    for i in range(g):
      anchor = sets[anchor_offset + i]
      pos = np_similarity(anchor, sets[positive_offset + i]) / tau
      denominator = math.exp(pos)
      for j in range(2 * g):
        if set_labels[j] != labels[i]:
          denominator += math.exp(np_similarity(anchor, sets[j]) / tau)
      losses.append(-math.log(math.exp(pos) / denominator))
  return sum(losses) / len(losses)


def np_release_loss(q_wli, q_nbi, labels):
  q_wli, q_nbi = np.asarray(q_wli, np.float64), np.asarray(q_nbi, np.float64)
  g, n_q, d = q_wli.shape

  def normalise(s):  # unit L2 norm over the queries, for every channel
    out = np.zeros_like(s)
    for c in range(d):
      norm = math.sqrt(sum(s[i, c] ** 2 for i in range(n_q)))
      for i in range(n_q):
        out[i, c] = s[i, c] / norm
    return out

  sets = [normalise(q_wli[i]) for i in range(g)] + [normalise(q_nbi[i]) for i in range(g)]
  set_labels = list(labels) + list(labels)

  def sim(a, b):
    return sum(a[i, c] * b[i, c] for i in range(n_q) for c in range(d)) / 20.0

  losses = []
  for i in range(g):
    s_pos = sim(sets[i], sets[g + i])
    denominator = 1.0 + math.exp(s_pos)
    for j in range(2 * g):
      if set_labels[j] != labels[i]:
        denominator += math.exp(sim(sets[i], sets[j]))
    losses.append(-math.log(math.exp(s_pos) / denominator))
  return sum(losses)  # The release sums over its WLI anchors.


def np_release_set_loss_interleaved(q_wli, q_nbi):
  """The release's own layout for C classes: sets ordered [W_0, N_0, W_1, N_1, ...]; anchor W_c is compared with
  every other set, the positive is N_c; softmax with "+1" in the denominator; -log summed over the anchors."""
  q_wli, q_nbi = np.asarray(q_wli, np.float64), np.asarray(q_nbi, np.float64)
  c, n_q, d = q_wli.shape
  sets = [x for pair in zip(q_wli, q_nbi) for x in pair]
  feats = [s / np.sqrt((s ** 2).sum(axis=0, keepdims=True)) for s in sets]  # Norm over the queries.
  total = 0.0
  for cls in range(c):
    anchor = 2 * cls
    others = [j for j in range(2 * c) if j != anchor]
    scores = [sum(feats[anchor][t, ch] * feats[j][t, ch] for t in range(n_q) for ch in range(d)) / 20.0
              for j in others]
    probs = [math.exp(x) / (1.0 + sum(math.exp(y) for y in scores)) for x in scores]
    total += math.log(probs[others.index(anchor + 1)])
  return -total


# ---- prototype_similarity ----------------------------------------------------------------------


def test_prototype_similarity_matches_numpy_loops():
  a, b = _sets(0, 4)
  out = np.asarray(_similarity(a, b))
  assert out.shape == (4,)
  for g in range(4):
    assert out[g] == pytest.approx(np_similarity(a[g], b[g]), abs=1e-6)
  # Broadcasting (...,): all pairs.
  pairs = np.asarray(_similarity(a[:, None], b[None, :]))
  assert pairs.shape == (4, 4)
  assert pairs[1, 3] == pytest.approx(np_similarity(a[1], b[3]), abs=1e-6)
  # Scale invariance and S(A, A) = 1.
  assert np.asarray(_similarity(a, 3.0 * a)) == pytest.approx(np.ones(4), abs=1e-6)


def test_prototype_similarity_zero_vector_is_finite_and_its_gradient_too():
  a, b = _sets(1, 1)
  a = a.at[0, 1].set(0.0)
  value = float(_similarity(a, b)[0])
  assert value == pytest.approx(np_similarity(a[0], b[0]), abs=1e-6)  # zero vector -> cos 0
  grad = jax.jit(jax.grad(lambda x: pl.prototype_similarity(x, b).sum()))(a)
  assert np.all(np.isfinite(np.asarray(grad)))


# ---- group_contrastive_loss --------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("labels", [[0, 1, 2], [2, 0, 1, 3], [0, 0, 1, 1, 2, 2], [1, 0, 1, 0, 1]],
                         ids=["group3", "group4_unordered", "image_level", "image_level_2cls"])
def test_group_contrastive_loss_matches_numpy(labels, symmetric):
  q_wli, q_nbi = _sets(2, len(labels))
  for tau in (0.1, 0.5):
    out = _group_loss(q_wli, q_nbi, jnp.asarray(labels), temperature=tau, symmetric=symmetric)
    assert out.shape == () and out.dtype == jnp.float32
    expected = np_group_loss(q_wli, q_nbi, labels, tau, symmetric)
    assert float(out) == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_symmetric_loss_is_the_mean_of_both_directions():
  q_wli, q_nbi = _sets(3, 3)
  labels = jnp.arange(3)
  forward = _group_loss(q_wli, q_nbi, labels, symmetric=False)
  backward = _group_loss(q_nbi, q_wli, labels, symmetric=False)
  both = _group_loss(q_wli, q_nbi, labels, symmetric=True)
  assert float(both) == pytest.approx(0.5 * float(forward + backward), rel=1e-6)
  assert abs(float(forward) - float(backward)) > 1e-4  # the two directions really differ


@pytest.mark.parametrize("labels", [[0], [1, 1, 1]])
def test_group_contrastive_loss_without_negatives_is_zero_and_finite(labels):
  q_wli, q_nbi = _sets(4, len(labels))
  labels = jnp.asarray(labels)
  loss, grads = jax.jit(jax.value_and_grad(pl.group_contrastive_loss, argnums=(0, 1)))(
      q_wli, q_nbi, labels)
  assert float(loss) == pytest.approx(0.0, abs=1e-6)  # log(1) for every anchor
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))


def test_group_contrastive_loss_temperature_on_separated_aligned_prototypes():
  # Class c owns channels [2c, 2c + 1]: prototypes of different classes are orthogonal (S = 0),
  # WLI and NBI sets of a class are identical (S = 1).
  num_classes, n_q, d = 3, 2, 6
  protos = np.zeros((num_classes, n_q, d), np.float32)
  for c in range(num_classes):
    for i in range(n_q):
      protos[c, i, 2 * c + i] = 1.0 + c
  labels = jnp.arange(num_classes)
  losses = []
  for tau in (1.0, 0.3, 0.1, 0.03, 0.01):
    loss = float(_group_loss(jnp.asarray(protos), jnp.asarray(protos), labels, temperature=tau))
    # Each anchor: positive S = 1, 2 (C - 1) = 4 negatives with S = 0. The float32 result is
    # logsumexp - positive logit, both about 1 / tau: a few float32 ulps of 1 / tau of error.
    ulps = 4 * float(np.finfo(np.float32).eps) / tau
    assert loss == pytest.approx(math.log(1 + 4 * math.exp(-1 / tau)), rel=1e-4, abs=ulps)
    losses.append(loss)
  assert losses[0] > losses[1] > losses[2] > 0.0  # taus 1, 0.3, 0.1: still measurable
  assert all(a >= b for a, b in zip(losses, losses[1:]))
  assert losses[-1] < 1e-5


@pytest.mark.parametrize("symmetric", [True, False])
def test_group_contrastive_loss_jit_grad_finite_with_zero_vectors(symmetric):
  q_wli, q_nbi = _sets(5, 3)
  q_wli = q_wli.at[1, 0].set(0.0)
  q_nbi = q_nbi.at[2].set(0.0)  # a whole zero set
  labels = jnp.asarray([0, 1, 2])
  fn = jax.jit(jax.value_and_grad(pl.group_contrastive_loss, argnums=(0, 1)),
               static_argnames=("symmetric",))
  loss, (g_wli, g_nbi) = fn(q_wli, q_nbi, labels, symmetric=symmetric)
  expected = np_group_loss(q_wli, q_nbi, [0, 1, 2], 0.1, symmetric)
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert np.all(np.isfinite(np.asarray(g_wli))) and np.all(np.isfinite(np.asarray(g_nbi)))
  assert np.abs(np.asarray(g_wli)).max() > 1e-4


def test_group_contrastive_loss_accepts_bfloat16():
  q_wli, q_nbi = _sets(6, 3)
  q_wli16, q_nbi16 = q_wli.astype(jnp.bfloat16), q_nbi.astype(jnp.bfloat16)
  loss = _group_loss(q_wli16, q_nbi16, jnp.arange(3))
  assert loss.dtype == jnp.float32
  expected = np_group_loss(np.asarray(q_wli16, np.float32), np.asarray(q_nbi16, np.float32),
                           [0, 1, 2], 0.1, True)
  assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_losses_reject_bad_shapes():
  q_wli, q_nbi = _sets(7, 3)
  with pytest.raises(ValueError, match="labels"):
    pl.group_contrastive_loss(q_wli, q_nbi, jnp.arange(2))
  with pytest.raises(ValueError, match=r"\(G, N_q, d\)"):
    pl.release_prototype_loss(q_wli, q_nbi[:2], jnp.arange(3))
  with pytest.raises(ValueError, match="temperature"):
    pl.group_contrastive_loss(q_wli, q_nbi, jnp.arange(3), temperature=0.0)
  with pytest.raises(ValueError, match=r"\(S, C\)"):
    pl.prototype_classification_loss(jnp.zeros((4, 3)), jnp.zeros((3,), jnp.int32))


# ---- release variant ---------------------------------------------------------------------------


@pytest.mark.parametrize("labels", [[0, 1, 2], [0, 1], [0, 0, 1, 1, 2, 2], [0, 0]])
def test_release_prototype_loss_matches_numpy(labels):
  q_wli, q_nbi = _sets(8, len(labels))
  out = _release_loss(q_wli, q_nbi, jnp.asarray(labels))
  assert out.dtype == jnp.float32
  assert float(out) == pytest.approx(np_release_loss(q_wli, q_nbi, labels), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_release_prototype_loss_is_the_releases_sum_in_its_layout(num_classes):
  q_wli, q_nbi = _sets(11, num_classes)
  out = _release_loss(q_wli, q_nbi, jnp.arange(num_classes))
  assert float(out) == pytest.approx(np_release_set_loss_interleaved(q_wli, q_nbi), rel=1e-5, abs=1e-6)


def test_release_prototype_loss_jit_grad_finite_with_zero_channel():
  q_wli, q_nbi = _sets(9, 3)
  q_wli = q_wli.at[0, :, 2].set(0.0)  # a channel that is zero over all queries
  loss, grads = jax.jit(jax.value_and_grad(pl.release_prototype_loss, argnums=(0, 1)))(
      q_wli, q_nbi, jnp.arange(3))
  assert np.isfinite(float(loss))
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.abs(np.asarray(grads[0])).max() > 1e-5


def test_prototype_classifier_and_its_loss_match_numpy():
  num_classes = 3
  protos = jnp.concatenate(_sets(10, 3))  # (2C, N_q, d): all 2C sets, as the release does
  labels = jnp.asarray([0, 1, 2, 0, 1, 2])
  head = pl.PrototypeClassifier(num_classes)
  params = head.init(jax.random.key(0), protos)
  kernel = np.asarray(params["params"]["fc"]["kernel"], np.float64)
  bias = np.asarray(params["params"]["fc"]["bias"], np.float64) + 0.3  # non-zero bias
  params = {"params": {"fc": {"kernel": jnp.asarray(kernel, jnp.float32),
                              "bias": jnp.asarray(bias, jnp.float32)}}}
  logits = np.asarray(head.apply(params, protos))
  assert logits.shape == (6, num_classes)
  p = np.asarray(protos, np.float64)
  ce = []
  for s in range(6):
    pooled = [sum(p[s, i, c] for i in range(NUM_QUERIES)) / NUM_QUERIES for c in range(D)]
    ref = [sum(pooled[c] * kernel[c, k] for c in range(D)) + bias[k] for k in range(num_classes)]
    np.testing.assert_allclose(logits[s], ref, rtol=1e-5, atol=1e-5)
    ce.append(-ref[int(labels[s])] + math.log(sum(math.exp(r) for r in ref)))
  loss = pl.prototype_classification_loss(jnp.asarray(logits), labels)
  assert float(loss) == pytest.approx(sum(ce) / len(ce), rel=1e-5)
  grad = jax.jit(jax.grad(lambda pr: pl.prototype_classification_loss(
      head.apply(params, pr), labels)))(protos)
  assert np.all(np.isfinite(np.asarray(grad))) and np.abs(np.asarray(grad)).max() > 1e-5


def test_prototype_classifier_has_torch_linear_init():
  d, num_classes = 128, 3
  head = pl.PrototypeClassifier(num_classes)
  fc = head.init(jax.random.key(4), jnp.zeros((6, 12, d)))["params"]["fc"]
  bound = 1.0 / math.sqrt(d)  # torch nn.Linear: kaiming_uniform(a=sqrt(5)) kernel and bias, both U(-b, b).
  kernel, bias = np.asarray(fc["kernel"], np.float64), np.asarray(fc["bias"], np.float64)
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.95 * bound
  assert kernel.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)
  assert np.abs(bias).max() <= bound and np.any(bias != 0)
