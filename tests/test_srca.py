"""SRCA and L_den (spec 5.5, 5.6) against NumPy references that build the full relation mask."""

import math

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest

from pagkd_jax.distill import srca

G, K, H, W, D = 3, 2, 3, 3, 8
L = K * H * W  # 18: no other axis of the test tensors has this size.
DIRS = ("nbi_to_wli", "wli_to_nbi")


def make_inputs(seed: int, groups: int = G, k: int = K):
  rng = np.random.default_rng(seed)
  f_wli = rng.normal(size=(groups, k, H, W, D)).astype(np.float32)
  f_nbi = rng.normal(size=(groups, k, H, W, D)).astype(np.float32)
  l_wli = rng.integers(-1, 2, size=(groups, k, H, W)).astype(np.int8)
  l_nbi = rng.integers(-1, 2, size=(groups, k, H, W)).astype(np.int8)
  return f_wli, f_nbi, l_wli, l_nbi


def init_and_apply(module, inputs):
  params = module.init(jax.random.key(0), *inputs)
  loss, diag = module.apply(params, *inputs)
  return params, loss, diag


# ---- NumPy references (float64, explicit loops) --------------------------------------------------


def ref_full_relation(q_labels, k_labels, masked):
  """The paper's R: (Lq, Lk) with 0 / -inf, built entry by entry (all zeros when unmasked)."""
  r = np.zeros((len(q_labels), len(k_labels)))
  if masked:
    for t in range(len(q_labels)):
      for v in range(len(k_labels)):
        if q_labels[t] == -1 or q_labels[t] != k_labels[v]:
          r[t, v] = -np.inf
  return r


def ref_paper_rows(xq, xk, lq, lk, wq, wk, masked):
  """Per query: reconstruction (or None for an empty row) of one group, one direction."""
  p = wq.shape[1]
  logits = (xq @ wq) @ (xk @ wk).T / math.sqrt(p) + ref_full_relation(lq, lk, masked)
  rows = []
  for t in range(len(xq)):
    if np.all(np.isneginf(logits[t])):  # Empty row: ambiguous query or no key of its label.
      rows.append(None)
      continue
    a = np.exp(logits[t] - logits[t].max())
    rows.append((a / a.sum()) @ xk)
  return rows


def ref_paper(inputs, wq, wk, masked=True, bidirectional=True):
  f_wli, f_nbi, l_wli, l_nbi = (np.asarray(x, np.float64) for x in inputs)
  groups, k, h, w, d = f_wli.shape
  directions = [(f_wli, l_wli, f_nbi, l_nbi), (f_nbi, l_nbi, f_wli, l_wli)]
  losses, valid = {}, {}
  for name, (fq, lq, fk, lk) in zip(DIRS[:1 + bidirectional], directions):
    err, count = 0.0, 0
    for g in range(groups):
      xq, xk = fq[g].reshape(-1, d), fk[g].reshape(-1, d)
      rows = ref_paper_rows(xq, xk, lq[g].reshape(-1), lk[g].reshape(-1), wq, wk, masked)
      for t, recon in enumerate(rows):
        if recon is not None:
          err += np.mean((recon - xq[t]) ** 2)
          count += 1
    losses[name] = err / max(count, 1)
    valid[name] = count / (groups * k * h * w)
  return sum(losses.values()) / len(losses), losses, valid


def ref_release(inputs, masked=True, bidirectional=True):
  f_wli, f_nbi, l_wli, l_nbi = (np.asarray(x, np.float64) for x in inputs)
  groups, k, h, w, d = f_wli.shape
  directions = [(f_wli, l_wli, f_nbi, l_nbi), (f_nbi, l_nbi, f_wli, l_wli)]
  losses = {}
  for name, (fq, lq, fk, lk) in zip(DIRS[:1 + bidirectional], directions):
    total = 0.0
    for g in range(groups):
      for m in range(k):
        for n in range(k):
          xq, xk = fq[g, m].reshape(-1, d), fk[g, n].reshape(-1, d)
          a, b = lq[g, m].reshape(-1), lk[g, n].reshape(-1)
          logits = xq @ xk.T
          if masked:
            for t in range(len(a)):
              for v in range(len(b)):
                weight = 0.5 if (a[t] == -1 or b[v] == -1) else float(a[t] == b[v])
                logits[t, v] = -1e9 if weight == 0 else logits[t, v] * weight
          att = np.exp(logits - logits.max(axis=1, keepdims=True))
          recon = (att / att.sum(axis=1, keepdims=True)) @ xk
          cos = np.sum(recon * xq) / math.sqrt((np.sum(recon**2) + 1e-12) * (np.sum(xq**2) + 1e-12))
          total += 1.0 - cos
    losses[name] = total / (k * k)  # Mean over a group's pairs, summed over the groups (classes).
  return sum(losses.values()), losses  # Summed over the directions, as the release.


def projections(params):
  p = params["params"]
  return (np.asarray(p["query"]["kernel"], np.float64), np.asarray(p["key"]["kernel"], np.float64))


# ---- paper variant -------------------------------------------------------------------------------


@pytest.mark.parametrize("groups,k,proj_dim", [(G, K, None), (4, 1, 3)])
def test_paper_matches_full_mask_reference(groups, k, proj_dim):
  inputs = make_inputs(0, groups, k)
  params, loss, diag = init_and_apply(srca.SRCA(proj_dim=proj_dim), inputs)
  wq, wk = projections(params)
  assert wq.shape == (D, proj_dim or D // 4)
  want, want_dirs, want_valid = ref_paper(inputs, wq, wk)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  for name in DIRS:
    np.testing.assert_allclose(float(diag[f"loss/{name}"]), want_dirs[name], rtol=1e-5)
    np.testing.assert_allclose(float(diag[f"valid_fraction/{name}"]), want_valid[name], rtol=1e-6)
  assert loss.dtype == jnp.float32


def test_group_attention_rows_match_reference():
  rng = np.random.default_rng(1)
  xq, xk = rng.normal(size=(L, D)), rng.normal(size=(L - 4, D))
  wq, wk = rng.normal(size=(D, 2)), rng.normal(size=(D, 2))
  lq = rng.integers(-1, 2, size=L).astype(np.int8)
  lk = np.where(rng.random(L - 4) < 0.5, 0, -1).astype(np.int8)  # No lesion key at all.
  recon, valid = srca.masked_group_attention(
      jnp.asarray(xq @ wq / math.sqrt(2), jnp.float32), jnp.asarray(xk @ wk, jnp.float32),
      jnp.asarray(xk, jnp.float32), lq, lk)
  rows = ref_paper_rows(xq, xk, lq, lk, wq, wk, masked=True)
  np.testing.assert_array_equal(np.asarray(valid), [r is not None for r in rows])
  assert np.asarray(valid).any() and not np.asarray(valid).all()
  for t, row in enumerate(rows):
    if row is not None:
      np.testing.assert_allclose(np.asarray(recon[t]), row, rtol=1e-4, atol=1e-5)
  assert np.isfinite(np.asarray(recon)).all()


def test_paper_fully_masked_rows():
  f_wli, f_nbi, l_wli, l_nbi = make_inputs(2)
  l_nbi[0] = np.where(l_nbi[0] == 1, 0, l_nbi[0])  # Group 0: WLI lesion queries, no NBI lesion key.
  l_wli[1] = np.where(l_wli[1] == 0, -1, l_wli[1])  # Group 1: no WLI background key.
  inputs = (f_wli, f_nbi, l_wli, l_nbi)
  module = srca.SRCA()
  params, loss, diag = init_and_apply(module, inputs)
  want, want_dirs, want_valid = ref_paper(inputs, *projections(params))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  for name in DIRS:
    np.testing.assert_allclose(float(diag[f"loss/{name}"]), want_dirs[name], rtol=1e-5)
    np.testing.assert_allclose(float(diag[f"valid_fraction/{name}"]), want_valid[name], rtol=1e-6)
  grads = jax.grad(lambda p, *x: module.apply(p, *x)[0], argnums=(0, 1, 2))(params, *inputs[:2],
                                                                             *inputs[2:])
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_paper_all_ambiguous_group_gives_zero_loss_and_zero_gradient():
  f_wli, f_nbi, _, _ = make_inputs(3, groups=1)
  labels = np.full((1, K, H, W), -1, np.int8)
  module = srca.SRCA()
  params = module.init(jax.random.key(0), f_wli, f_nbi, labels, labels)
  loss_fn = jax.jit(lambda p, a, b: module.apply(p, a, b, labels, labels)[0])
  assert float(loss_fn(params, f_wli, f_nbi)) == 0.0
  grads = jax.grad(loss_fn, argnums=(0, 1, 2))(params, f_wli, f_nbi)
  for g in jax.tree.leaves(grads):
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_paper_unidirectional_and_unmasked():
  inputs = make_inputs(4)
  uni = srca.SRCA(bidirectional=False)
  params, loss, diag = init_and_apply(uni, inputs)
  wq, wk = projections(params)
  want, _, _ = ref_paper(inputs, wq, wk, bidirectional=False)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert set(diag) == {"loss/nbi_to_wli", "valid_fraction/nbi_to_wli", "known_fraction/nbi_to_wli"}

  unmasked = srca.SRCA(masked=False)
  loss_u, diag_u = unmasked.apply(params, *inputs)  # Same projections as the masked module.
  want_u, _, _ = ref_paper(inputs, wq, wk, masked=False)
  np.testing.assert_allclose(float(loss_u), want_u, rtol=1e-5)
  assert float(diag_u["valid_fraction/wli_to_nbi"]) == 1.0
  assert abs(want_u - ref_paper(inputs, wq, wk)[0]) > 1e-3  # The mask matters on these inputs.


# ---- release variant -----------------------------------------------------------------------------


@pytest.mark.parametrize("masked,bidirectional", [(True, True), (True, False), (False, True)])
def test_release_matches_pair_loop_reference(masked, bidirectional):
  inputs = make_inputs(5)
  module = srca.SRCA(variant="release", masked=masked, bidirectional=bidirectional)
  params, loss, diag = init_and_apply(module, inputs)
  assert not jax.tree.leaves(params)  # No projections.
  want, want_dirs = ref_release(inputs, masked, bidirectional)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  for name, value in want_dirs.items():
    np.testing.assert_allclose(float(diag[f"loss/{name}"]), value, rtol=1e-5)


def test_release_uses_the_labels_and_target_of_the_right_images():
  f_wli, f_nbi, l_wli, l_nbi = make_inputs(6, groups=1)
  l_wli[0, 1] = -l_wli[0, 1]  # Images 0 and 1 of the group now differ in their labels.
  module = srca.SRCA(variant="release")
  _, loss, _ = init_and_apply(module, (f_wli, f_nbi, l_wli, l_nbi))
  np.testing.assert_allclose(float(loss), ref_release((f_wli, f_nbi, l_wli, l_nbi))[0], rtol=1e-5)
  swapped = l_wli[:, ::-1].copy()  # The release's mix-up would not see this change.
  _, loss_swapped, _ = init_and_apply(module, (f_wli, f_nbi, swapped, l_nbi))
  assert abs(float(loss_swapped) - float(loss)) > 1e-4


# ---- both variants: jit, gradients, dtypes, memory -----------------------------------------------


@pytest.mark.numerics
@pytest.mark.parametrize("variant", ["paper", "release"])
def test_jit_grad_finite_and_bfloat16_close(variant):
  inputs = make_inputs(7)
  edge = list(make_inputs(7))
  edge[2][0] = -1  # One all-ambiguous WLI group, one group without NBI lesion keys.
  edge[3][1] = np.where(edge[3][1] == 1, -1, edge[3][1])
  module = srca.SRCA(variant=variant)
  params = module.init(jax.random.key(0), *inputs)
  loss_fn = jax.jit(jax.value_and_grad(lambda p, a, b, la, lb: module.apply(p, a, b, la, lb)[0],
                                       argnums=(0, 1, 2)))
  for case in (inputs, tuple(edge)):
    loss, grads = loss_fn(params, *case)
    assert np.isfinite(float(loss))
    for g in jax.tree.leaves(grads):
      assert np.isfinite(np.asarray(g)).all()
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads))

  bf16 = srca.SRCA(variant=variant, dtype=jnp.bfloat16)
  f_wli, f_nbi, l_wli, l_nbi = inputs
  loss_bf16, _ = bf16.apply(params, jnp.asarray(f_wli, jnp.bfloat16),
                            jnp.asarray(f_nbi, jnp.bfloat16), l_wli, l_nbi)
  loss_f32, _ = module.apply(params, *inputs)
  assert loss_bf16.dtype == jnp.float32
  # bfloat16 keeps 8 significant bits (relative rounding 2^-9 per value): a few 1e-3 on the loss.
  np.testing.assert_allclose(float(loss_bf16), float(loss_f32), rtol=2e-2)


def square_intermediates(closed_jaxpr, size: int) -> list:
  """(primitive, shape, dtype) of every intermediate shaped (..., size, size), nested jaxprs too."""
  found, stack = [], [closed_jaxpr.jaxpr]
  while stack:
    jaxpr = stack.pop()
    stack.extend(jex.subjaxprs(jaxpr))
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        shape = tuple(getattr(var.aval, "shape", ()))
        if len(shape) >= 2 and shape[-2:] == (size, size):
          found.append((str(eqn.primitive), shape, var.aval.dtype))
  return found


def int_or_bool(found: list) -> list:
  return [f for f in found if jnp.issubdtype(f[2], jnp.integer) or jnp.issubdtype(f[2], jnp.bool_)]


def test_paper_training_path_builds_no_square_mask():
  inputs = make_inputs(8)
  module = srca.SRCA()
  params = module.init(jax.random.key(0), *inputs)
  loss = lambda p, a, b: module.apply(p, a, b, *inputs[2:])[0]
  for fn in (loss, jax.grad(loss, argnums=(0, 1, 2))):
    found = square_intermediates(jax.make_jaxpr(fn)(params, *inputs[:2]), L)
    assert found  # The float (L, L) logits are seen, so the walk reaches the attention.
    assert int_or_bool(found) == []

  def naive(a, b):  # A full-mask implementation must be caught by the same check.
    la, lb = (jnp.asarray(x).reshape(G, L) for x in inputs[2:])
    allowed = (la[:, :, None] == lb[:, None, :]) & (la[:, :, None] != -1)
    logits = jnp.einsum("gtd,gvd->gtv", a.reshape(G, L, D), b.reshape(G, L, D))
    return jnp.sum(jnp.where(allowed, logits, -1e30))

  assert int_or_bool(square_intermediates(jax.make_jaxpr(naive)(*inputs[:2]), L))


def test_srca_rejects_bad_input():
  f_wli, f_nbi, l_wli, l_nbi = make_inputs(9)
  with pytest.raises(ValueError, match="variant"):
    srca.SRCA(variant="fancy").init(jax.random.key(0), f_wli, f_nbi, l_wli, l_nbi)
  with pytest.raises(ValueError, match="f_wli and f_nbi"):
    srca.SRCA().init(jax.random.key(0), f_wli, f_nbi[:, :1], l_wli, l_nbi)
  with pytest.raises(ValueError, match="labels_nbi"):
    srca.SRCA().init(jax.random.key(0), f_wli, f_nbi, l_wli, l_nbi[:, :1])
  with pytest.raises(ValueError, match="labels_wli.*dtype"):
    srca.SRCA().init(jax.random.key(0), f_wli, f_nbi, l_wli.astype(np.float32), l_nbi)
