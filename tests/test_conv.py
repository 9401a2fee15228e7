"""The convolution with matrix-product kernel gradients (models/conv.py): values and gradients with respect to the
input and the kernel against `jax.grad` of `lax.conv_general_dilated` and a NumPy loop, for the kernel sizes,
strides and paddings of the ResNets; and the tiny ResNet's gradients with either implementation."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pagkd_jax.models import conv as conv_lib
from pagkd_jax.models import resnet

EPS32 = float(np.finfo(np.float32).eps)
DN = ("NHWC", "HWIO", "NHWC")


def lax_conv(x, kernel, stride, padding):
  return lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=DN)


def dot_conv(x, kernel, stride, padding):
  return conv_lib.conv_dot_wgrad(x, kernel, (stride, stride), padding, dimension_numbers=DN)


def numpy_kernel_gradient(x, grad_out, kernel_size, stride, pad):
  """dK[i, j, c, o] = sum_{b, y, x} X_pad[b, s y + i, s x + j, c] grad_out[b, y, x, o], in float64 loops."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), pad[0], pad[1], (0, 0)))
  g = np.asarray(grad_out, np.float64)
  _, ho, wo, _ = g.shape
  out = np.zeros((kernel_size, kernel_size, x.shape[-1], g.shape[-1]))
  for i in range(kernel_size):
    for j in range(kernel_size):
      for y in range(ho):
        for z in range(wo):
          out[i, j] += x[:, stride * y + i, stride * z + j, :].T @ g[:, y, z, :]
  return out


def summation_bound(terms_abs_sum, count):
  """Bound on the float32 rounding error of a sum of `count` products whose absolute values sum to
  `terms_abs_sum`: |error| <= count * eps * sum |terms| (the classical recursive-summation bound, each product
  rounded once more). Two float32 results of the same exact sum differ by at most twice that."""
  return 2 * (count + 1) * EPS32 * terms_abs_sum


CASES = [(1, 1, "explicit"), (1, 2, "explicit"), (3, 1, "explicit"), (3, 2, "explicit"), (7, 2, "explicit"),
         (1, 1, "SAME"), (3, 2, "SAME"), (3, 1, "SAME")]


@pytest.mark.parametrize("kernel_size,stride,padding_kind", CASES)
def test_values_and_gradients_match_the_lax_convolution(kernel_size, stride, padding_kind):
  keys = jax.random.split(jax.random.key(kernel_size * 10 + stride), 3)
  x = jax.random.normal(keys[0], (2, 11, 12, 5))
  kernel = jax.random.normal(keys[1], (kernel_size, kernel_size, 5, 6))
  padding = [(kernel_size // 2, kernel_size // 2)] * 2 if padding_kind == "explicit" else "SAME"
  y_ref = lax_conv(x, kernel, stride, padding)
  y = jax.jit(dot_conv, static_argnums=(2, 3))(x, kernel, stride, padding if isinstance(padding, str) else
                                                 tuple(padding))
  np.testing.assert_array_equal(y, y_ref)  # The forward pass is the lax convolution itself.
  weights = jax.random.normal(keys[2], y_ref.shape)  # Loss = sum(weights * conv): grad_out = weights.

  def loss(fn, x, kernel):
    return jnp.sum(weights * fn(x, kernel, stride, padding))

  gx_ref, gk_ref = jax.grad(loss, argnums=(1, 2))(lax_conv, x, kernel)
  gx, gk = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)(dot_conv, x, kernel)
  np.testing.assert_array_equal(gx, gx_ref)  # The input gradient is the lax convolution's own.

  # The kernel gradient sums B * H' * W' products per entry; rounding is bounded by the sum of their magnitudes,
  # which is the kernel gradient of |x| with |grad_out|.
  pad = tuple(tuple(p) for p in lax.padtype_to_pads(x.shape[1:3], (kernel_size,) * 2, (stride,) * 2, padding)) \
      if isinstance(padding, str) else tuple(padding)
  count = y_ref.shape[0] * y_ref.shape[1] * y_ref.shape[2]
  exact = numpy_kernel_gradient(x, weights, kernel_size, stride, pad)
  bound = summation_bound(numpy_kernel_gradient(np.abs(x), np.abs(weights), kernel_size, stride, pad), count)
  assert gk.shape == kernel.shape and gk.dtype == kernel.dtype
  assert np.all(np.abs(np.asarray(gk, np.float64) - exact) <= bound / 2)
  assert np.all(np.abs(np.asarray(gk_ref, np.float64) - exact) <= bound / 2)  # The reference itself is that close.
  assert np.all(np.abs(np.asarray(gk, np.float64) - np.asarray(gk_ref, np.float64)) <= bound)
  assert np.max(np.abs(exact)) > 1.0  # Not a vacuous comparison of zeros.


def test_unsupported_convolutions_are_refused():
  x, kernel = jnp.zeros((1, 8, 8, 4)), jnp.zeros((3, 3, 2, 4))
  with pytest.raises(ValueError, match="feature_group_count=2"):
    conv_lib.conv_dot_wgrad(x, kernel, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=2)
  with pytest.raises(ValueError, match="rhs_dilation"):
    conv_lib.conv_dot_wgrad(x, jnp.zeros((3, 3, 4, 4)), (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=DN)
  with pytest.raises(ValueError, match="dimension_numbers"):
    conv_lib.conv_dot_wgrad(x, jnp.zeros((3, 3, 4, 4)), (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))


def test_conv_impl_resolution_and_bad_values():
  assert conv_lib.resolve_conv_impl("auto", "cpu") == "dot_wgrad_1x1"
  assert conv_lib.resolve_conv_impl("auto", "gpu") == "xla"
  assert conv_lib.resolve_conv_impl("auto", "tpu") == "xla"
  assert conv_lib.resolve_conv_impl("dot_wgrad", "gpu") == "dot_wgrad"
  with pytest.raises(ValueError, match="'im2col'"):
    conv_lib.resolve_conv_impl("im2col")
  with pytest.raises(ValueError, match="'im2col'"):
    resnet.create_resnet("tiny", 3, conv_impl="im2col")


def _loss_and_grads(conv_impl, x, labels, variables):
  model = resnet.create_resnet("tiny", 3, conv_impl=conv_impl)

  def loss(params):
    (logits, features), _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return jnp.mean(-jnp.take_along_axis(nn.log_softmax(logits), labels[:, None], 1)) + 1e-3 * jnp.mean(features)

  return jax.jit(jax.value_and_grad(loss))(variables["params"])


def test_tiny_resnet_gradients_agree_across_conv_impls():
  x = jax.random.normal(jax.random.key(1), (6, 32, 32, 3))
  labels = jnp.array([0, 1, 2, 0, 1, 2])
  variables = resnet.create_resnet("tiny", 3, conv_impl="xla").init(jax.random.key(0), x)
  # Nonzero BatchNorm scales (the last BN of each block starts at 0, which would zero its branch's gradients).
  flat = flax.traverse_util.flatten_dict(variables["params"])
  keys = jax.random.split(jax.random.key(2), len(flat))
  flat = {k: jax.random.uniform(key, v.shape, minval=0.5, maxval=1.5) if k[-1] == "scale" else v
          for key, (k, v) in zip(keys, flat.items())}
  variables = {**variables, "params": flax.traverse_util.unflatten_dict(flat)}
  for impl in ("dot_wgrad", "dot_wgrad_1x1"):  # Same parameter tree: checkpoints and imported weights are shared.
    assert jax.tree.structure(resnet.create_resnet("tiny", 3, conv_impl=impl).init(jax.random.key(0), x)) == \
        jax.tree.structure(variables)
  loss_ref, grads_ref = _loss_and_grads("xla", x, labels, variables)
  for impl in ("dot_wgrad", "dot_wgrad_1x1"):
    loss, grads = _loss_and_grads(impl, x, labels, variables)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)

    # Float32 rounding of sums of a few thousand terms (~1e-6 relative), passed through BatchNorm's backward pass
    # (which divides by batch standard deviations) over nine layers: 1e-4 of each parameter's gradient scale.
    def close(a, b):
      scale = float(np.max(np.abs(b)))
      assert scale > 0
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale)

    jax.tree.map(close, grads, grads_ref)
