"""Tests of CRCKD's numerical core (pagkd_jax/distill/crckd.py, memory_bank.py; spec CRCKD.md) against NumPy
references written as loops in float64."""

import math
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagkd_jax.distill import crckd
from pagkd_jax.distill import memory_bank as mb
from subprocess_env import run_on_host_devices

# A small training split: 40 images of 3 classes (3, 25 and 12 images), rows in a shuffled order.
CLASS_SIZES = (3, 25, 12)
N = sum(CLASS_SIZES)
D = 8
P, K = 5, 30
T = 0.07


def row_labels(seed: int = 0) -> np.ndarray:
  labels = np.concatenate([np.full(m, c) for c, m in enumerate(CLASS_SIZES)])
  return np.random.default_rng(seed).permutation(labels).astype(np.int32)


def unit_rows(rng, shape) -> np.ndarray:
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def banks_for_test(seed: int, labels: np.ndarray | None = None) -> mb.MemoryBanks:
  labels = row_labels(seed) if labels is None else labels
  return mb.init_memory_banks(jax.random.key(seed), labels, dim=D)


_draw = jax.jit(mb.draw_contrast_rows, static_argnames=("num_positives", "num_negatives"))
_ccd = jax.jit(crckd.ccd_loss, static_argnames=("num_positives",))
_bank_losses = jax.jit(crckd.bank_losses, static_argnames=("num_classes", "num_positives"))


# ---- NumPy references (float64, explicit loops) ---------------------------------------------------


def np_normalize(v):
  v = np.asarray(v, np.float64)
  return v / math.sqrt(sum(x * x for x in v))


def np_kl_batchmean(target_logits, input_logits):
  """sum over classes of KL(softmax(target) || softmax(input)), divided by the batch size."""
  total = 0.0
  for t_row, s_row in zip(np.asarray(target_logits, np.float64), np.asarray(input_logits, np.float64)):
    zt = sum(math.exp(v) for v in t_row)
    zs = sum(math.exp(v) for v in s_row)
    for a, b in zip(t_row, s_row):
      pt, ps = math.exp(a) / zt, math.exp(b) / zs
      total += pt * math.log(pt / ps)
  return total / len(target_logits)


def np_nce_direction(anchors, bank, rows, p, num_rows, z=None, temperature=T, eps=1e-7):
  """One CCD direction, per anchor as the spec writes it. Returns (loss, Z)."""
  anchors, bank = np.asarray(anchors, np.float64), np.asarray(bank, np.float64)
  b, m = rows.shape
  out = np.zeros((b, m))
  for i in range(b):
    for j in range(m):
      out[i, j] = math.exp(sum(bank[rows[i, j]] * anchors[i]) / temperature)
  if z is None:
    z = out.mean() * num_rows  # Fixed at the first batch.
  x = out / z
  c = (m - p) / num_rows
  losses = []
  for i in range(b):
    pos = sum(math.log(x[i, j] / (x[i, j] + c + eps)) for j in range(p))
    neg = sum(math.log(c / (x[i, j] + c + eps)) for j in range(p, m))
    losses.append(-(pos + p * neg) / p)
  return sum(losses) / b, z


def np_nce_release_layout(x, p, num_rows, eps=1e-7):
  """The release's ContrastLoss on normalised scores x (B, P + K): narrow, repeat, sum, divide."""
  b, m = x.shape
  c = (m - p) / num_rows
  log_d1 = np.log(x[:, :p] / (x[:, :p] + c + eps))
  log_d0 = np.log(np.full((b, m - p), c) / (x[:, p:] + c + eps))
  return -((log_d1.sum(0) + np.repeat(log_d0.reshape(-1, 1), p, axis=1).sum(0)) / b).sum(0) / p


def np_bank_update(bank, rows, features, momentum=0.5):
  bank = np.asarray(bank, np.float64).copy()
  old = bank.copy()
  for r, f in zip(rows, np.asarray(features, np.float64)):
    bank[r] = np_normalize(momentum * old[r] + (1 - momentum) * f)  # A repeated row keeps its last update.
  return bank


def np_centroids(bank, labels, num_classes):
  bank = np.asarray(bank, np.float64)
  out = np.zeros((num_classes, bank.shape[1]))
  for c in range(num_classes):
    members = [np.maximum(bank[r], 0.0) for r in range(len(labels)) if labels[r] == c]
    if members:
      out[c] = np_normalize(sum(members) / len(members))
  return out


def np_crp(f_s, f_t, cent_s, cent_t, temperature=T):
  r_s = np.asarray(f_s, np.float64) @ cent_s.T / temperature
  r_t = np.asarray(f_t, np.float64) @ cent_t.T / temperature
  return np_kl_batchmean(r_t, r_s)


# ---- mean teacher ---------------------------------------------------------------------------------


class TinyNet(nn.Module):
  """Dense -> BatchNorm -> Dense: parameters and BatchNorm statistics, as the ResNet has."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(6)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(3)(nn.relu(x))


def tiny_variables(seed: int) -> dict:
  net = TinyNet()
  x = jax.random.normal(jax.random.key(seed + 100), (8, 4))
  variables = net.init(jax.random.key(seed), x, train=False)
  _, updates = net.apply(variables, x * (seed + 2.0), train=True, mutable=["batch_stats"])
  return {"params": variables["params"], "batch_stats": updates["batch_stats"]}


@pytest.mark.parametrize("step,decay", [(0, 0.99), (1, 0.99), (4, 0.99), (98, 0.99), (5000, 0.99), (7, 0.5)])
def test_ema_update_matches_numpy_on_params_and_batch_stats(step, decay):
  teacher, student = tiny_variables(0), tiny_variables(1)
  out = jax.jit(crckd.ema_update, static_argnames=("decay",))(teacher, student, jnp.int32(step), decay=decay)
  alpha = min(1.0 - 1.0 / (step + 1), decay)
  leaves_t, leaves_s = jax.tree.leaves(teacher), jax.tree.leaves(student)
  leaves_out = jax.tree.leaves(out)
  assert len(leaves_out) == len(leaves_t) == 8  # 2 kernels, 2 biases, BN scale and bias, BN mean and var.
  assert {"mean", "var"} <= set(out["batch_stats"]["BatchNorm_0"])
  for t, s, o in zip(leaves_t, leaves_s, leaves_out):
    t, s = np.asarray(t, np.float64).ravel(), np.asarray(s, np.float64).ravel()
    want = [alpha * a + (1 - alpha) * b for a, b in zip(t, s)]
    np.testing.assert_allclose(np.asarray(o).ravel(), want, rtol=1e-6, atol=1e-7)
  mean_t = np.asarray(teacher["batch_stats"]["BatchNorm_0"]["mean"])
  assert not np.allclose(mean_t, np.asarray(student["batch_stats"]["BatchNorm_0"]["mean"]))  # Statistics differ.
  if step == 0:  # The first update copies the student.
    for s, o in zip(leaves_s, leaves_out):
      np.testing.assert_allclose(np.asarray(o), np.asarray(s), rtol=1e-6)


def test_ema_decay_schedule_and_dtypes():
  decays = [float(crckd.ema_decay_at(s)) for s in (0, 1, 9, 99, 1000)]
  assert decays == pytest.approx([0.0, 0.5, 0.9, 0.99, 0.99], abs=1e-7)
  teacher = {"w": jnp.ones((3,), jnp.bfloat16)}
  out = crckd.ema_update(teacher, {"w": jnp.zeros((3,), jnp.float32)}, 9)
  assert out["w"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out["w"], np.float32), 0.9, rtol=1e-2)
  with pytest.raises(ValueError, match="structure"):
    crckd.ema_update({"a": jnp.ones(2)}, {"b": jnp.ones(2)}, 0)
  with pytest.raises(ValueError, match="shape"):
    crckd.ema_update({"a": jnp.ones(2)}, {"a": jnp.ones(3)}, 0)


def test_rotate_flip_gives_each_image_one_of_its_eight_dihedral_views():
  images = np.asarray(jax.random.normal(jax.random.key(0), (64, 5, 5, 3)))
  out = np.asarray(jax.jit(crckd.rotate_flip)(jax.random.key(1), jnp.asarray(images)))
  seen = set()
  for img, got in zip(images, out):
    views = [np.rot90(v, k, axes=(0, 1)) for v in (img, img[::-1]) for k in range(4)]
    matches = [i for i, v in enumerate(views) if np.array_equal(v, got)]
    assert len(matches) == 1
    seen.add(matches[0])
  assert seen == set(range(8))
  with pytest.raises(ValueError, match="square"):
    crckd.rotate_flip(jax.random.key(0), jnp.zeros((2, 4, 5, 3)))


# ---- consistency and schedule -----------------------------------------------------------------------


def test_sigmoid_rampup_and_loss_weights():
  for epoch in (0, 1, 10, 20, 29, 30, 31, 80):
    want = math.exp(-5.0 * (1.0 - min(epoch, 30) / 30) ** 2)
    assert float(crckd.sigmoid_rampup(epoch)) == pytest.approx(want, rel=1e-6)
  assert float(crckd.sigmoid_rampup(3, 0)) == 1.0
  assert float(crckd.sigmoid_rampup(-1)) == pytest.approx(math.exp(-5.0), rel=1e-6)
  early, late = crckd.loss_weights(19), crckd.loss_weights(20)
  assert (float(early["consistency"]), float(early["crp"])) == (0.0, 0.0)
  assert float(early["ccd"]) == pytest.approx(0.1)
  assert float(late["consistency"]) == pytest.approx(math.exp(-5.0 / 9.0), rel=1e-6)  # Ramp counted from epoch 0.
  assert float(late["ccd"]) == pytest.approx(0.1) and float(late["crp"]) == 1.0
  release = crckd.loss_weights(25, ccd_weight_late=crckd.RELEASE_CCD_WEIGHT_LATE)
  assert float(release["ccd"]) == pytest.approx(0.01)
  jitted = jax.jit(crckd.loss_weights)(jnp.int32(40))
  assert float(jitted["consistency"]) == pytest.approx(1.0)


def test_consistency_loss_matches_numpy_and_leaves_the_teacher_alone():
  k1, k2 = jax.random.split(jax.random.key(3))
  s, t = 2.0 * jax.random.normal(k1, (6, 4)), 2.0 * jax.random.normal(k2, (6, 4))
  loss, (g_s, g_t) = jax.jit(jax.value_and_grad(crckd.consistency_loss, argnums=(0, 1)))(s, t)
  assert float(loss) == pytest.approx(np_kl_batchmean(t, s), rel=1e-5)
  assert np.abs(np.asarray(g_s)).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(g_t), 0.0)
  assert float(crckd.consistency_loss(s, s)) == pytest.approx(0.0, abs=1e-6)
  with pytest.raises(ValueError, match=r"\(B, C\)"):
    crckd.consistency_loss(s, t[:, :3])


# ---- memory banks ---------------------------------------------------------------------------------


def test_init_memory_banks_shapes_scale_and_errors():
  labels = row_labels(0)
  banks = mb.init_memory_banks(jax.random.key(0), labels, dim=128)
  s = 1.0 / math.sqrt(128 / 3)
  for bank in (banks.student, banks.teacher):
    assert bank.shape == (N, 128) and bank.dtype == jnp.float32
    assert np.abs(np.asarray(bank)).max() <= s and np.abs(np.asarray(bank)).max() > 0.95 * s
  assert not np.allclose(np.asarray(banks.student), np.asarray(banks.teacher))
  np.testing.assert_array_equal(np.asarray(banks.labels), labels)
  np.testing.assert_array_equal(np.asarray(banks.normalizers), [0.0, 0.0])
  norms = np.linalg.norm(np.asarray(banks.student), axis=1)
  assert norms.mean() == pytest.approx(1.0, abs=0.05)  # s = 1 / sqrt(d / 3): rows of norm about 1.
  with pytest.raises(ValueError, match="single class"):
    mb.init_memory_banks(jax.random.key(0), np.zeros(5, np.int32), dim=D)
  with pytest.raises(ValueError, match="holds class 2, but there are 2 classes"):
    mb.init_memory_banks(jax.random.key(0), labels, dim=D, num_classes=2)
  with pytest.raises(ValueError, match="1-D integer"):
    mb.init_memory_banks(jax.random.key(0), np.zeros((2, 3), np.int32), dim=D)
  # A pytree: it goes through jit and tree utilities like the rest of the training state.
  assert len(jax.tree.leaves(banks)) == 4


def test_bank_update_matches_numpy_and_takes_the_last_of_repeated_rows():
  rng = np.random.default_rng(1)
  banks = banks_for_test(1)
  rows = np.asarray([3, 17, 3, 0, 39, 17], np.int32)  # Rows 3 and 17 occur twice.
  f_s, f_t = unit_rows(rng, (6, D)), unit_rows(rng, (6, D))
  new = jax.jit(mb.update_memory_banks)(banks, jnp.asarray(rows), jnp.asarray(f_s), jnp.asarray(f_t), 0.5)
  np.testing.assert_allclose(np.asarray(new.student), np_bank_update(banks.student, rows, f_s), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(new.teacher), np_bank_update(banks.teacher, rows, f_t), rtol=1e-5,
                             atol=1e-6)
  untouched = np.setdiff1d(np.arange(N), rows)
  np.testing.assert_array_equal(np.asarray(new.student)[untouched], np.asarray(banks.student)[untouched])
  np.testing.assert_allclose(np.linalg.norm(np.asarray(new.teacher)[rows], axis=1), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="update_memory_banks"):
    mb.update_memory_banks(banks, jnp.asarray(rows), jnp.asarray(f_s[:5]), jnp.asarray(f_t), 0.5)


def test_draw_contrast_rows_structure_and_flags():
  labels = row_labels(2)
  anchors = np.arange(N, dtype=np.int32)  # Every row once: every class as anchor.
  rows, pos_rep, neg_rep = _draw(jax.random.key(0), jnp.asarray(labels), jnp.asarray(anchors), num_positives=P,
                                 num_negatives=K)
  rows = np.asarray(rows)
  assert rows.shape == (N, P + K) and rows.dtype == np.int32
  for a in anchors:
    c, size = labels[a], CLASS_SIZES[labels[a]]
    positives, negatives = rows[a, 1:P], rows[a, P:]
    assert rows[a, 0] == a
    assert all(labels[r] == c for r in positives) and all(labels[r] != c for r in negatives)
    assert bool(pos_rep[a]) == (size < P) and bool(neg_rep[a]) == (N - size < K)
    for drawn, pool in ((positives, [r for r in range(N) if labels[r] == c and r != a]),
                        (negatives, [r for r in range(N) if labels[r] != c])):
      counts = {r: int(np.sum(drawn == r)) for r in pool}
      assert sum(counts.values()) == len(drawn)
      if len(pool) >= len(drawn):  # Without repetition.
        assert len(set(drawn.tolist())) == len(drawn)
      else:  # Every row of the pool, floor or ceil times.
        lo, hi = len(drawn) // len(pool), -(-len(drawn) // len(pool))
        assert all(lo <= v <= hi for v in counts.values())
  # The classes: 0 (3 rows) repeats positives; 1 (15 negatives) and 2 (28) repeat negatives; 0 (37) does not.
  assert mb.sampling_shortfalls(labels, P, K) == {"positives": {0: 3}, "negatives": {1: 15, 2: 28}}
  assert mb.sampling_shortfalls(labels, 20, 4096) == {"positives": {0: 3, 2: 12},
                                                       "negatives": {0: 37, 1: 15, 2: 28}}


def test_draw_contrast_rows_is_uniform_keyed_and_handles_a_class_of_one():
  labels = row_labels(3)
  anchor = int(np.flatnonzero(labels == 0)[0])  # Class 0: 37 negatives, draw 10 without repetition.
  draws = 3000
  rows, _, _ = _draw(jax.random.key(7), jnp.asarray(labels), jnp.full((draws,), anchor, jnp.int32),
                     num_positives=2, num_negatives=10)
  rows = np.asarray(rows)
  pool = np.flatnonzero(labels != 0)
  freq = np.array([np.sum(rows[:, 2:] == r) for r in pool])
  p = 10 / len(pool)
  expected, sd = draws * p, math.sqrt(draws * p * (1 - p))
  assert np.abs(freq - expected).max() < 5 * sd
  assert len({tuple(r) for r in rows[:, 2:]}) > draws * 0.99  # Different draws for different anchors.
  again, _, _ = _draw(jax.random.key(7), jnp.asarray(labels), jnp.full((draws,), anchor, jnp.int32),
                      num_positives=2, num_negatives=10)
  np.testing.assert_array_equal(np.asarray(again), rows)
  # A class of one row: its positives are its own row.
  lonely = np.asarray([0, 1, 1, 2, 2, 2], np.int32)
  rows, pos_rep, _ = _draw(jax.random.key(0), jnp.asarray(lonely), jnp.asarray([0, 3], jnp.int32),
                           num_positives=4, num_negatives=4096)
  rows = np.asarray(rows)
  assert rows.shape == (2, 4 + 4096)
  np.testing.assert_array_equal(rows[0, :4], 0)
  assert set(rows[1, 1:4].tolist()) == {4, 5} and bool(pos_rep[0]) and bool(pos_rep[1])
  assert set(rows[0, 4:].tolist()) == {1, 2, 3, 4, 5}
  with pytest.raises(ValueError, match=">= 1"):
    mb.draw_contrast_rows(jax.random.key(0), jnp.asarray(lonely), jnp.asarray([0]), num_positives=0,
                          num_negatives=4)


# ---- CCD ------------------------------------------------------------------------------------------


def ccd_inputs(seed: int, b: int = 6):
  rng = np.random.default_rng(seed)
  labels = row_labels(seed)
  banks = banks_for_test(seed, labels)
  anchors = rng.choice(N, size=b, replace=False).astype(np.int32)
  rows, _, _ = _draw(jax.random.key(seed), jnp.asarray(labels), jnp.asarray(anchors), num_positives=P,
                     num_negatives=K)
  return banks, anchors, np.asarray(rows), unit_rows(rng, (b, D)), unit_rows(rng, (b, D))


def test_ccd_matches_numpy_both_directions_and_the_release_layout():
  banks, _, rows, f_s, f_t = ccd_inputs(4)
  loss, aux = _ccd(jnp.asarray(f_s), jnp.asarray(f_t), banks, jnp.asarray(rows), num_positives=P)
  want_s, z_s = np_nce_direction(f_s, banks.teacher, rows, P, N)  # Student anchors, teacher bank.
  want_t, z_t = np_nce_direction(f_t, banks.student, rows, P, N)
  assert float(aux["ccd/student_anchors"]) == pytest.approx(want_s, rel=1e-5)
  assert float(aux["ccd/teacher_anchors"]) == pytest.approx(want_t, rel=1e-5)
  assert float(loss) == pytest.approx(want_s + want_t, rel=1e-5)
  np.testing.assert_allclose(np.asarray(aux["normalizers"]), [z_s, z_t], rtol=1e-5)
  # The spec's per-anchor formula is the release's ContrastLoss.
  x = np.exp(np.einsum("bmd,bd->bm", np.asarray(banks.teacher, np.float64)[rows], f_s) / T) / z_s
  assert np_nce_release_layout(x, P, N) == pytest.approx(want_s, rel=1e-10)


def test_ccd_keeps_a_fixed_normalizer_and_sends_no_gradient_into_the_banks():
  banks, _, rows, f_s, f_t = ccd_inputs(5)
  fixed = banks.replace(normalizers=jnp.asarray([3.0, 50.0], jnp.float32))
  loss, aux = _ccd(jnp.asarray(f_s), jnp.asarray(f_t), fixed, jnp.asarray(rows), num_positives=P)
  want = np_nce_direction(f_s, banks.teacher, rows, P, N, z=3.0)[0] + np_nce_direction(
      f_t, banks.student, rows, P, N, z=50.0)[0]
  assert float(loss) == pytest.approx(want, rel=1e-5)
  np.testing.assert_allclose(np.asarray(aux["normalizers"]), [3.0, 50.0], rtol=1e-6)

  def total(f_s, f_t, bank_s, bank_t):
    return crckd.ccd_loss(f_s, f_t, banks.replace(student=bank_s, teacher=bank_t), jnp.asarray(rows),
                          num_positives=P)[0]

  g_s, g_t, g_bank_s, g_bank_t = jax.jit(jax.grad(total, argnums=(0, 1, 2, 3)))(
      jnp.asarray(f_s), jnp.asarray(f_t), banks.student, banks.teacher)
  assert np.abs(np.asarray(g_s)).max() > 1e-3 and np.abs(np.asarray(g_t)).max() > 1e-3
  for g in (g_bank_s, g_bank_t):
    np.testing.assert_array_equal(np.asarray(g), 0.0)
  with pytest.raises(ValueError, match="no negatives"):
    crckd.nce_loss(jnp.zeros((2, 5)), 0.0, num_positives=5, num_rows=N)


def test_ccd_with_the_specs_sizes_is_finite():
  labels = row_labels(6)
  banks = mb.init_memory_banks(jax.random.key(0), labels, dim=128)
  anchors = jnp.arange(8, dtype=jnp.int32)
  rows, _, _ = _draw(jax.random.key(1), jnp.asarray(labels), anchors, num_positives=20, num_negatives=4096)
  f = jnp.asarray(unit_rows(np.random.default_rng(0), (8, 128)))
  loss, aux = _ccd(f, f[::-1], banks, rows, num_positives=20)
  assert rows.shape == (8, 4116) and np.isfinite(float(loss)) and np.all(np.asarray(aux["normalizers"]) > 0)


# ---- CRP ------------------------------------------------------------------------------------------


def test_class_centroids_match_numpy_and_an_empty_class_is_zero():
  banks = banks_for_test(7)
  labels = np.asarray(banks.labels)
  got = np.asarray(crckd.class_centroids(banks.student, banks.labels, 4))  # Class 3 has no rows.
  want = np_centroids(banks.student, labels, 4)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[3], 0.0)
  np.testing.assert_allclose(np.linalg.norm(got[:3], axis=1), 1.0, rtol=1e-6)


def test_crp_matches_numpy_and_trains_the_student_side_only():
  banks, _, _, f_s, f_t = ccd_inputs(8)
  labels = np.asarray(banks.labels)
  cent_s = crckd.class_centroids(banks.student, banks.labels, 3)
  cent_t = crckd.class_centroids(banks.teacher, banks.labels, 3)
  fn = jax.jit(jax.value_and_grad(crckd.crp_loss, argnums=(0, 1, 2, 3)))
  loss, (g_s, g_t, g_cs, g_ct) = fn(jnp.asarray(f_s), jnp.asarray(f_t), cent_s, cent_t)
  want = np_crp(f_s, f_t, np_centroids(banks.student, labels, 3), np_centroids(banks.teacher, labels, 3))
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert np.abs(np.asarray(g_s)).max() > 1e-3
  for g in (g_t, g_cs, g_ct):
    np.testing.assert_array_equal(np.asarray(g), 0.0)


# ---- the bank step and the heads ----------------------------------------------------------------------


def test_bank_losses_follow_the_releases_order():
  """CCD on the banks before the update (and Z fixed there), CRP on the centroids of the updated banks."""
  banks, anchors, rows, f_s, f_t = ccd_inputs(9)
  labels = np.asarray(banks.labels)
  ccd, crp, new, aux = _bank_losses(banks, jnp.asarray(anchors), jnp.asarray(rows), jnp.asarray(f_s),
                                    jnp.asarray(f_t), num_classes=3, num_positives=P)
  want_s, z_s = np_nce_direction(f_s, banks.teacher, rows, P, N)
  want_t, z_t = np_nce_direction(f_t, banks.student, rows, P, N)
  assert float(ccd) == pytest.approx(want_s + want_t, rel=1e-5)
  new_s, new_t = np_bank_update(banks.student, anchors, f_s), np_bank_update(banks.teacher, anchors, f_t)
  np.testing.assert_allclose(np.asarray(new.student), new_s, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new.teacher), new_t, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new.normalizers), [z_s, z_t], rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(new.labels), labels)
  want_crp = np_crp(f_s, f_t, np_centroids(new_s, labels, 3), np_centroids(new_t, labels, 3))
  assert float(crp) == pytest.approx(want_crp, rel=1e-5)
  stale = np_crp(f_s, f_t, np_centroids(banks.student, labels, 3), np_centroids(banks.teacher, labels, 3))
  assert abs(stale - want_crp) > 1e-4 * abs(want_crp)  # The order is visible on these inputs.
  # The next step keeps Z.
  ccd2, _, newer, _ = _bank_losses(new, jnp.asarray(anchors), jnp.asarray(rows), jnp.asarray(f_s),
                                   jnp.asarray(f_t), num_classes=3, num_positives=P)
  np.testing.assert_array_equal(np.asarray(newer.normalizers), np.asarray(new.normalizers))
  want2 = (np_nce_direction(f_s, new_t, rows, P, N, z=float(new.normalizers[0]))[0]
           + np_nce_direction(f_t, new_s, rows, P, N, z=float(new.normalizers[1]))[0])
  assert float(ccd2) == pytest.approx(want2, rel=1e-5)


def test_contrast_heads_match_numpy_and_have_torch_linear_init():
  rng = np.random.default_rng(10)
  x_s, x_t = rng.normal(size=(4, 16)).astype(np.float32), rng.normal(size=(4, 16)).astype(np.float32)
  heads = crckd.ContrastHeads(features=8)
  params = heads.init(jax.random.key(0), x_s, x_t)
  f_s, f_t = heads.apply(params, x_s, x_t)
  assert f_s.shape == f_t.shape == (4, 8) and f_s.dtype == jnp.float32
  for side, x, f in (("student", x_s, f_s), ("teacher", x_t, f_t)):
    lin = params["params"][side]["linear"]
    kernel, bias = np.asarray(lin["kernel"], np.float64), np.asarray(lin["bias"], np.float64)
    bound = 1.0 / math.sqrt(16)
    assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound and np.any(bias != 0)
    for i in range(4):
      y = [sum(float(x[i, a]) * kernel[a, o] for a in range(16)) + bias[o] for o in range(8)]
      np.testing.assert_allclose(np.asarray(f[i]), np_normalize(y), rtol=1e-5, atol=1e-6)
  assert not np.allclose(np.asarray(params["params"]["student"]["linear"]["kernel"]),
                         np.asarray(params["params"]["teacher"]["linear"]["kernel"]))
  g_x_t = jax.grad(lambda xt: jnp.sum(heads.apply(params, x_s, xt)[1][:, 0]))(jnp.asarray(x_t))
  np.testing.assert_array_equal(np.asarray(g_x_t), 0.0)  # The teacher's feature4 gets no gradient.


# ---- one device and eight ---------------------------------------------------------------------------

EIGHT_DEVICES = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    assert jax.device_count() == 8, jax.devices()
    from pagkd_jax import mesh as mesh_lib
    from pagkd_jax.distill import crckd, memory_bank as mb

    N, D, C, P, K, B, STEPS = 40, 8, 3, 5, 30, 16, 3
    labels = np.random.default_rng(0).permutation(np.arange(N) % C).astype(np.int32)
    rng = np.random.default_rng(1)
    batches = [(rng.permutation(N)[:B].astype(np.int32), rng.normal(size=(B, D)).astype(np.float32),
                rng.normal(size=(B, D)).astype(np.float32)) for _ in range(STEPS)]

    def step(banks, key, anchors, x_s, x_t):
      rows, _, _ = mb.draw_contrast_rows(key, banks.labels, anchors, P, K)
      def losses(x_s, x_t):
        ccd, crp, new, _ = crckd.bank_losses(banks, anchors, rows, mb.l2_normalize(x_s), mb.l2_normalize(x_t),
                                             num_classes=C, num_positives=P)
        return ccd + crp, (ccd, crp, new)
      (_, (ccd, crp, new)), grads = jax.value_and_grad(losses, argnums=(0, 1), has_aux=True)(x_s, x_t)
      return new, rows, ccd, crp, grads

    def run(devices):
      mesh = mesh_lib.make_mesh(devices)
      rep, data = mesh_lib.replicated(mesh), mesh_lib.eval_batch_sharding(mesh)
      banks = jax.device_put(mb.init_memory_banks(jax.random.key(0), labels, dim=D), rep)
      fn = jax.jit(step, in_shardings=(rep, rep, data, data, data), out_shardings=rep)
      out = []
      for t, (anchors, x_s, x_t) in enumerate(batches):
        args = [mesh_lib.global_array(a, data, a.shape) for a in (anchors, x_s, x_t)]
        assert {s.data.shape[0] for s in args[1].addressable_shards} == {B // len(devices)}
        banks, rows, ccd, crp, grads = fn(banks, jax.random.key(10 + t), *args)
        out.append(jax.device_get((banks, rows, ccd, crp, grads)))
      return out

    one, eight = run(jax.devices()[:1]), run(jax.devices())
    for (b1, r1, c1, p1, g1), (b8, r8, c8, p8, g8) in zip(one, eight):
      np.testing.assert_array_equal(r8, r1)  # The same draw whatever the layout.
      # Sums of at most B * (P + K) float32 terms in other orders: a few eps32 * sqrt(terms).
      np.testing.assert_allclose([c8, p8], [c1, p1], rtol=1e-5)
      for a, b in zip(jax.tree.leaves(b1), jax.tree.leaves(b8)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
      for a, b in zip(g1, g8):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())
    assert not np.allclose(one[-1][0].student, mb.init_memory_banks(jax.random.key(0), labels, dim=D).student)
    print("OK")
""")


@pytest.mark.numerics
def test_bank_step_on_one_and_eight_devices_agrees(repo_root):
  run_on_host_devices(EIGHT_DEVICES, repo_root, timeout=600)
