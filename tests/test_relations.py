"""Dual-threshold labels and relation matrices (spec 5.3, 5.4) against explicit loops."""

import numpy as np
import pytest

from pagkd_jax.distill import relations


def ref_labels(fg: np.ndarray, thresholds) -> np.ndarray:
  """Loop reference: lesion if fg under the larger tau, background if bg under both, else -1."""
  hi = int(np.argmax(thresholds))
  lo = 1 - hi
  batch, _, h, w = fg.shape
  out = np.zeros((batch, h, w), np.int8)
  for b in range(batch):
    for y in range(h):
      for x in range(w):
        if fg[b, hi, y, x]:
          out[b, y, x] = 1
        elif not fg[b, lo, y, x]:
          out[b, y, x] = 0
        else:
          out[b, y, x] = -1
  return out


def test_dual_threshold_truth_table():
  # Axis 1 = (tau 0.7, tau 0.3); the four combinations of (fg_high, fg_low).
  fg = np.array([[[[True, True, False, False]], [[True, False, True, False]]]])
  got = np.asarray(relations.dual_threshold_labels(fg, (0.7, 0.3)))
  np.testing.assert_array_equal(got, [[[1, 1, -1, 0]]])
  assert got.dtype == np.int8


@pytest.mark.parametrize("thresholds", [(0.7, 0.3), (0.3, 0.7), (0.9, 0.1)])
def test_dual_threshold_labels_match_reference(thresholds):
  fg = np.random.default_rng(0).random((3, 2, 4, 5)) > 0.5
  got = relations.dual_threshold_labels(fg, thresholds)
  np.testing.assert_array_equal(np.asarray(got), ref_labels(fg, thresholds))


def test_dual_threshold_order_is_explicit():
  fg = np.random.default_rng(1).random((2, 2, 3, 3)) > 0.5
  swapped = fg[:, ::-1]
  np.testing.assert_array_equal(np.asarray(relations.dual_threshold_labels(fg, (0.7, 0.3))),
                                np.asarray(relations.dual_threshold_labels(swapped, (0.3, 0.7))))
  np.testing.assert_array_equal(  # Integer maps: nonzero = foreground.
      np.asarray(relations.dual_threshold_labels(fg.astype(np.int32), (0.7, 0.3))),
      np.asarray(relations.dual_threshold_labels(fg, (0.7, 0.3))))


def test_dual_threshold_rejects_bad_input():
  fg = np.zeros((2, 2, 3, 3), bool)
  with pytest.raises(ValueError, match="differ"):
    relations.dual_threshold_labels(fg, (0.5, 0.5))
  with pytest.raises(ValueError, match="exactly two"):
    relations.dual_threshold_labels(fg, (0.7, 0.5, 0.3))
  with pytest.raises(ValueError, match=r"\(2, 3, 3, 3\)"):
    relations.dual_threshold_labels(np.zeros((2, 3, 3, 3), bool))


def test_relation_mask_matches_loops():
  rng = np.random.default_rng(2)
  q = rng.integers(-1, 2, size=7).astype(np.int8)
  k = rng.integers(-1, 2, size=5).astype(np.int8)
  got = np.asarray(relations.relation_mask(q, k))
  want = np.full((7, 5), -np.inf, np.float32)
  for t in range(7):
    for v in range(5):
      if q[t] != -1 and k[v] != -1 and q[t] == k[v]:
        want[t, v] = 0.0
  np.testing.assert_array_equal(got, want)
  assert got.dtype == np.float32


def test_release_relation_weights_match_loops():
  rng = np.random.default_rng(3)
  q = rng.integers(-1, 2, size=(3, 6)).astype(np.int8)
  k = rng.integers(-1, 2, size=(3, 4)).astype(np.int8)
  got = np.asarray(relations.release_relation_weights(q, k))
  want = np.zeros((3, 6, 4), np.float32)
  for b in range(3):
    for t in range(6):
      for v in range(4):
        if q[b, t] == -1 or k[b, v] == -1:
          want[b, t, v] = 0.5
        elif q[b, t] == k[b, v]:
          want[b, t, v] = 1.0
  np.testing.assert_array_equal(got, want)
  # Leading axes broadcast: all (m, n) pairs of 3 query and 3 key images at once.
  pairs = np.asarray(relations.release_relation_weights(q[:, None, :], q[None, :, :]))
  assert pairs.shape == (3, 3, 6, 6)
  np.testing.assert_array_equal(pairs[2, 0],
                                np.asarray(relations.release_relation_weights(q[2], q[0])))


def test_relations_reject_mismatched_leading_axes():
  with pytest.raises(ValueError, match="broadcastable"):
    relations.relation_mask(np.zeros((2, 3), np.int8), np.zeros((4, 3), np.int8))
  with pytest.raises(ValueError, match="broadcastable"):
    relations.release_relation_weights(np.zeros((), np.int8), np.zeros((3,), np.int8))
