"""Class activation maps against a NumPy reference."""

import jax.numpy as jnp
import numpy as np

from pagkd_jax.models.cam import class_activation_map


def _reference_cam(features, kernel, labels, eps=1e-5):
  b, h, w, f = features.shape
  out = np.zeros((b, h, w))
  for i in range(b):
    for y in range(h):
      for x in range(w):
        out[i, y, x] = max(0.0, sum(kernel[k, labels[i]] * features[i, y, x, k] for k in range(f)))
    lo, hi = out[i].min(), out[i].max()
    out[i] = (out[i] - lo) / (hi - lo + eps)
  return out


def test_cam_matches_reference():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
  kernel = rng.normal(size=(6, 3)).astype(np.float32)
  labels = np.array([2, 0, 1])
  got = np.asarray(class_activation_map(jnp.asarray(features), jnp.asarray(kernel), jnp.asarray(labels)))
  np.testing.assert_allclose(got, _reference_cam(features, kernel, labels), rtol=1e-5, atol=1e-6)
  assert got.min() >= 0 and got.max() <= 1


def test_constant_map_gives_zeros_not_nan():
  features = np.ones((1, 3, 3, 2), np.float32)
  kernel = np.array([[1.0], [1.0]], np.float32)
  got = np.asarray(class_activation_map(jnp.asarray(features), jnp.asarray(kernel), jnp.asarray([0])))
  assert np.all(np.isfinite(got)) and np.allclose(got, 0.0)
