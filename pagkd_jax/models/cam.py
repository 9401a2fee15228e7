"""Class activation maps from a GAP + linear head (spec 5.1)."""

import jax
import jax.numpy as jnp


def class_activation_map(features: jax.Array, fc_kernel: jax.Array, labels: jax.Array,
                         eps: float = 1e-5) -> jax.Array:
  """CAM of the given class per image, min-max normalised to [0, 1].

  cam = ReLU(sum_k W[k, y] f[..., k]), then (cam - min) / (max - min + eps) per image. For a GAP + linear
  head this equals Grad-CAM, so no autodiff is needed. A constant map gives zeros, never NaN.

  Args:
    features: (B, h, w, F) layer4 maps.
    fc_kernel: (F, C) kernel of the linear head (Flax layout: inputs x outputs).
    labels: (B,) int class index per image.
  Returns:
    (B, h, w) float32 in [0, 1].
  """
  weights = jnp.take(fc_kernel.astype(jnp.float32), labels, axis=1).T  # (B, F)
  cam = jax.nn.relu(jnp.einsum("bhwf,bf->bhw", features.astype(jnp.float32), weights))
  lo = cam.min(axis=(1, 2), keepdims=True)
  hi = cam.max(axis=(1, 2), keepdims=True)
  return (cam - lo) / (hi - lo + eps)
