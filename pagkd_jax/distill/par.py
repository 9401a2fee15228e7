"""Pixel-adaptive refinement (PAR) of class activation maps (spec section 5.2).

PAR propagates a coarse two-channel (background, foreground) score map along the colour edges of
the image: every pixel repeatedly replaces its scores by an affinity-weighted average of its 32
dilated neighbours, where neighbours with a similar colour get a large weight. The refined map is
brought back to the CAM resolution and thresholded by an argmax.

Resampling (stated once, used everywhere in this module):
  * downsampling (image to half size, refined map back to the CAM size) is **area** averaging: an
    output cell is the mean of the input pixels it covers, with fractional pixels weighted by the
    covered fraction (an exact 2x2 box for the usual factor-2 image reduction, which is also what
    the release's bilinear ``align_corners=False`` reduction computes for even sizes);
  * upsampling (CAM scores to the half-size image) is **bilinear with half-pixel centres**
    (``jax.image.resize(..., "linear")``, equal to PyTorch ``align_corners=False``; the release uses
    ``align_corners=True`` here, a sub-pixel difference).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Offsets of the 8 neighbours at dilation 1, row-major without the centre: (dy, dx).
_UNIT_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
_STD_EPS = 1e-8


def neighbour_offsets(dilations: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """The 8 * len(dilations) neighbour offsets (dy, dx), dilation-major, row-major inside."""
  return tuple((d * dy, d * dx) for d in dilations for dy, dx in _UNIT_OFFSETS)


def _shifted(x: jax.Array, dy: int, dx: int) -> jax.Array:
  """`(B, H, W, C)` values of the neighbour at offset (dy, dx), replicate (edge) padding.

  `out[b, y, x] = x[b, clip(y + dy, 0, H - 1), clip(x + dx, 0, W - 1)]`.
  """
  _, height, width, _ = x.shape
  pad = max(abs(dy), abs(dx))
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
  return padded[:, pad + dy:pad + dy + height, pad + dx:pad + dx + width]


def area_weights(in_size: int, out_size: int) -> np.ndarray:
  """`(out_size, in_size)` matrix of area (box) downsampling along one axis.

  Output cell i covers the input interval [i * s, (i + 1) * s), s = in_size / out_size; its value is
  the overlap-weighted mean of the input pixels [j, j + 1) it touches. Rows sum to 1.
  """
  if out_size > in_size or out_size < 1:
    raise ValueError(
        f"area downsampling needs 1 <= out_size <= in_size, got {in_size} -> {out_size}")
  scale = in_size / out_size
  edges = np.arange(out_size + 1, dtype=np.float64) * scale
  pixels = np.arange(in_size + 1, dtype=np.float64)
  lo = np.maximum(edges[:-1, None], pixels[None, :-1])
  hi = np.minimum(edges[1:, None], pixels[None, 1:])
  return (np.clip(hi - lo, 0.0, None) / scale).astype(np.float32)


def _resize_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Resizes one axis: bilinear (half-pixel centres) up, area down, identity when equal."""
  in_size = x.shape[axis]
  if size == in_size:
    return x
  if size > in_size:
    shape = list(x.shape)
    shape[axis] = size
    return jax.image.resize(x, tuple(shape), method="linear")
  weights = jnp.asarray(area_weights(in_size, size))
  moved = jnp.moveaxis(x, axis, -1)
  return jnp.moveaxis(jnp.einsum("...i,oi->...o", moved, weights), -1, axis)


def resize_spatial(x: jax.Array, height: int, width: int) -> jax.Array:
  """Resizes `(B, H, W, C)` to `(B, height, width, C)` (bilinear up / area down, per axis)."""
  return _resize_axis(_resize_axis(x, 1, height), 2, width)


def pixel_affinities(images: jax.Array,
                     dilations: Sequence[int] = (1, 2, 4, 8),
                     temperature: float = 0.3,
                     pos_weight: float = 0.0) -> jax.Array:
  """Normalised PAR affinities of every pixel to its `K = 8 * len(dilations)` neighbours.

  For pixel p, neighbour n_k(p) and colour channel c, with the neighbour values
  v_k = I_c(n_k(p)), k = 1..K (replicate padding at the border):
    std_c(p) = sqrt(sum_k (v_k - mean_k v)^2 / (K - 1))   (the sample std of the K neighbour
               *values* of channel c, Bessel-corrected as `torch.std` in the release);
    a_k(p)   = mean_c -(|v_k - I_c(p)| / (std_c(p) + 1e-8) / temperature)^2;
    A_k(p)   = softmax_k a_k(p).
  With `pos_weight = w > 0` the position term of ToCo/AFA is added: the neighbour distance
  r_k = dilation * (sqrt(2) if diagonal else 1), b_k = -(r_k / (std_k r + 1e-8) / temperature)^2
  and A = (softmax(a) + w softmax(b)) / (1 + w). (ToCo does not divide by 1 + w; the division
  scales every pixel's map equally, so the final argmax is the same.)

  Args:
    images: `(B, H, W, C)` any colour range (the std normalisation makes it scale-free).

  Returns:
    `(B, H, W, K)` float32, non-negative, summing to 1 over K.
  """
  images = images.astype(jnp.float32)
  offsets = neighbour_offsets(dilations)
  num = len(offsets)
  # Sums over K shifted views rather than a (B, H, W, K, C) stack: memory stays O(B H W (K + C)).
  neigh = [_shifted(images, dy, dx) for dy, dx in offsets]
  mean = sum(neigh) / num
  std = jnp.sqrt(sum(jnp.square(v - mean) for v in neigh) / (num - 1))  # (B, H, W, C)
  scale = 1.0 / ((std + _STD_EPS) * temperature)
  logits = jnp.stack(
      [-jnp.mean(jnp.square((v - images) * scale), axis=-1) for v in neigh], axis=-1)
  aff = jax.nn.softmax(logits, axis=-1)
  if pos_weight:
    dist = np.array([np.hypot(dy, dx) for dy, dx in offsets], dtype=np.float64)
    pos_logits = -np.square(dist / (np.std(dist, ddof=1) + _STD_EPS) / temperature)
    pos = np.exp(pos_logits - pos_logits.max())
    pos = jnp.asarray((pos / pos.sum()).astype(np.float32))
    aff = (aff + pos_weight * pos) / (1.0 + pos_weight)
  return aff


def propagate(maps: jax.Array, affinities: jax.Array, dilations: Sequence[int],
              num_iters: int) -> jax.Array:
  """`num_iters` steps of M(p) <- sum_k A_k(p) M(n_k(p)) (replicate padding).

  Args:
    maps: `(B, H, W, C)` score maps.
    affinities: `(B, H, W, K)` from `pixel_affinities` with the same `dilations`.

  Returns:
    `(B, H, W, C)` float32.
  """
  offsets = neighbour_offsets(dilations)
  if affinities.shape[-1] != len(offsets):
    raise ValueError(f"affinities have {affinities.shape[-1]} neighbours, dilations {dilations} "
                     f"give {len(offsets)}")

  def step(_, m):
    # A sum of K shifted copies (not a (B, H, W, K, C) stack): one fused pass, no K-fold buffer.
    return sum(affinities[..., k:k + 1] * _shifted(m, dy, dx) for k, (dy, dx) in enumerate(offsets))

  return jax.lax.fori_loop(0, num_iters, step, maps.astype(jnp.float32))


def pixel_adaptive_refinement(images: jax.Array,
                              cams: jax.Array,
                              *,
                              thresholds: Sequence[float] = (0.7, 0.3),
                              num_iters: int = 10,
                              dilations: Sequence[int] = (1, 2, 4, 8),
                              temperature: float = 0.3,
                              downscale: int = 2,
                              pos_weight: float = 0.0) -> jax.Array:
  """Refined foreground maps of a batch of CAMs, one per threshold (spec 5.2).

  Per image: the image is area-downsampled to `(H // downscale, W // downscale)`; for every
  threshold tau the scores softmax([tau, cam]) (channel 0 background, channel 1 foreground) are
  bilinearly upsampled to that size, refined by `propagate` with the image's `pixel_affinities`,
  area-downsampled back to `(h, w)`; foreground where channel 1 > channel 0 (ties are background,
  like the first-index argmax of the release). Batched, jit-able, float32 internally; the output
  is boolean, so nothing is differentiated through it.

  Args:
    images: `(B, H, W, 3)` network input images (any per-channel normalisation: the affinities
      divide by a per-channel std).
    cams: `(B, h, w)` CAMs in [0, 1].
    thresholds: background scores tau, one output map per entry.
    num_iters, dilations, temperature, downscale, pos_weight: static Python settings (spec
      defaults; `pos_weight` 0 = the release, 0.01 = ToCo/AFA's position term).

  Returns:
    `(B, len(thresholds), h, w)` bool, True = foreground.
  """
  if images.ndim != 4:
    raise ValueError(f"images must be (B, H, W, C), got shape {images.shape}")
  if cams.ndim != 3 or cams.shape[0] != images.shape[0]:
    raise ValueError(f"cams must be (B, h, w) with B = {images.shape[0]}, got shape {cams.shape}")
  if downscale < 1 or images.shape[1] // downscale < 1 or images.shape[2] // downscale < 1:
    raise ValueError(f"downscale {downscale} does not fit images of shape {images.shape}")
  if not thresholds:
    raise ValueError("thresholds must not be empty")
  if num_iters < 0 or not dilations or min(dilations) < 1:
    raise ValueError(f"bad PAR settings: num_iters={num_iters}, dilations={dilations}")
  _, height, width, _ = images.shape
  _, h, w = cams.shape
  small_h, small_w = height // downscale, width // downscale

  small = resize_spatial(images.astype(jnp.float32), small_h, small_w)
  aff = pixel_affinities(small, dilations, temperature, pos_weight)

  cams = cams.astype(jnp.float32)
  taus = jnp.asarray(thresholds, jnp.float32)  # (T,)
  bg = jnp.broadcast_to(taus[None, None, None, :], cams.shape + taus.shape)
  fg = jnp.broadcast_to(cams[..., None], bg.shape)
  scores = jax.nn.softmax(jnp.stack([bg, fg], axis=-1), axis=-1)  # (B, h, w, T, 2)
  scores = scores.reshape(cams.shape + (2 * len(thresholds),))
  scores = resize_spatial(scores, small_h, small_w)

  refined = propagate(scores, aff, dilations, num_iters)
  refined = resize_spatial(refined, h, w).reshape(cams.shape + (len(thresholds), 2))
  fg_map = refined[..., 1] > refined[..., 0]  # (B, h, w, T)
  return jnp.moveaxis(fg_map, -1, 1)
