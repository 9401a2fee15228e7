"""2-D convolution whose gradient with respect to the kernel is computed as matrix products.

XLA's CPU backend computes the weight gradient of a convolution (the correlation of the input with the output
gradient) 3-12x slower than a matrix product of the same size for 1x1 kernels, which dominate ResNet-50's backward
pass (k x k kernels: XLA's own measured faster). `conv_dot_wgrad` has the signature of `lax.conv_general_dilated`
(so `flax.linen.Conv(..., conv_general_dilated=...)` uses it with unchanged parameters) and the same forward pass
and input gradient; only the kernel gradient is rewritten: for a kh x kw kernel it is, per tap (i, j),

  dK[i, j] = sum_{b, y, x} X_pad[b, s y + i, s x + j, :]^T dY[b, y, x, :]   (C_in x C_out),

one `dot` per tap over a strided view of the zero-padded input (a 1x1 kernel: one `dot`).
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

# "xla": lax.conv_general_dilated; "dot_wgrad": `conv_dot_wgrad` for every kernel; "dot_wgrad_1x1": for 1x1 kernels
# only (on CPU XLA's own k x k kernel gradients measured faster than k^2 products); "auto": by backend.
CONV_IMPLS = ("auto", "xla", "dot_wgrad", "dot_wgrad_1x1")
_NHWC = ("NHWC", "HWIO", "NHWC")


def _is_nhwc(dimension_numbers, ndim: int) -> bool:
  if dimension_numbers is None or ndim != 4:
    return False
  spec = lax.conv_dimension_numbers((1,) * 4, (1,) * 4, _NHWC)
  return lax.conv_dimension_numbers((1,) * 4, (1,) * 4, dimension_numbers) == spec


def _explicit_padding(padding, in_hw, kernel_hw, strides) -> tuple[tuple[int, int], ...]:
  if isinstance(padding, str):
    return tuple(tuple(p) for p in lax.padtype_to_pads(in_hw, kernel_hw, strides, padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def _conv(x, kernel, strides, padding, precision):
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_nhwc(x, kernel, strides, padding, precision):
  return _conv(x, kernel, strides, padding, precision)


def _conv_nhwc_fwd(x, kernel, strides, padding, precision):
  return _conv(x, kernel, strides, padding, precision), (x, kernel)


def kernel_gradient(x, grad_out, kernel_shape, strides, padding, precision=None):
  """dL/dK (kh, kw, C_in, C_out) of the NHWC convolution from its input x (B, H, W, C_in) and the output gradient
  grad_out (B, H', W', C_out): one matrix product per kernel tap, accumulated in float32."""
  kh, kw, c_in, c_out = kernel_shape
  (pt, pb), (pl, pr) = padding
  if min(pt, pb, pl, pr) < 0:
    raise ValueError(f"Negative convolution padding {padding} is not supported by conv_impl='dot_wgrad'.")
  b, ho, wo, _ = grad_out.shape
  sy, sx = strides
  if (pt, pb, pl, pr) != (0, 0, 0, 0):
    x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  g = grad_out.reshape(b * ho * wo, c_out)
  taps = []
  for i in range(kh):
    for j in range(kw):
      view = lax.slice(x, (0, i, j, 0), (b, i + sy * (ho - 1) + 1, j + sx * (wo - 1) + 1, c_in), (1, sy, sx, 1))
      taps.append(lax.dot_general(view.reshape(b * ho * wo, c_in), g, (((0,), (0,)), ((), ())),
                                  precision=precision, preferred_element_type=jnp.float32))
  return jnp.stack(taps).reshape(kernel_shape)


def _conv_nhwc_bwd(strides, padding, precision, residuals, grad_out):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: _conv(x, kernel, strides, padding, precision), x)
  (grad_x,) = input_vjp(grad_out)
  grad_kernel = kernel_gradient(x, grad_out, kernel.shape, strides, padding, precision)
  return grad_x, grad_kernel.astype(kernel.dtype)


_conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


def conv_dot_wgrad(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
                   precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` for NHWC inputs (B, H, W, C_in) and HWIO kernels (kh, kw, C_in, C_out), without
  dilation or feature groups, whose kernel gradient is `kernel_gradient` (matrix products); same values and input
  gradient as the lax convolution. Returns (B, H', W', C_out)."""
  dilated = any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ()))
  if (not _is_nhwc(dimension_numbers, lhs.ndim) or dilated or feature_group_count != 1 or batch_group_count != 1
      or preferred_element_type is not None):
    raise ValueError("conv_impl='dot_wgrad' supports NHWC/HWIO convolutions without dilation, feature or batch "
                     f"groups only; got dimension_numbers={dimension_numbers}, lhs_dilation={lhs_dilation}, "
                     f"rhs_dilation={rhs_dilation}, feature_group_count={feature_group_count}, "
                     f"batch_group_count={batch_group_count}.")
  strides = tuple(int(s) for s in window_strides)
  pads = _explicit_padding(padding, lhs.shape[1:3], rhs.shape[:2], strides)
  return _conv_nhwc(lhs, rhs, strides, pads, precision)


def resolve_conv_impl(conv_impl: str, backend: str | None = None) -> str:
  """"auto" -> "dot_wgrad_1x1" on CPU (where XLA's 1x1 kernel gradients are slow), "xla" on other backends."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"Unknown conv_impl {conv_impl!r}; expected one of {CONV_IMPLS}.")
  if conv_impl != "auto":
    return conv_impl
  return "dot_wgrad_1x1" if (backend or jax.default_backend()) == "cpu" else "xla"
