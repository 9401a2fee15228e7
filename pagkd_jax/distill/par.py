"""Pixel-adaptive refinement (PAR) of class activation maps (spec section 5.2).

PAR propagates a coarse two-channel (background, foreground) score map along the colour edges of
the image: every pixel repeatedly replaces its scores by an affinity-weighted average of its 32
dilated neighbours, where neighbours with a similar colour get a large weight. The refined map is
brought back to the CAM resolution and thresholded by an argmax.

Resampling (`resampling`, config `distill.par_resampling`), the three steps: image -> half size, CAM scores ->
half size, refined scores -> CAM size:
  * "release" (default): what ToCo's PAR and the public release compute with ``F.interpolate``: bilinear
    (``align_corners=False``, no antialiasing) for the image and for the refined map, bilinear with
    ``align_corners=True`` for the CAM scores. Going back from the half-size map to the CAM grid this *samples*
    each cell near its centre (factor 4: the mean of the two middle pixels per axis).
  * "area": the first version of this module: area averaging down (an output cell is the mean of every input pixel
    it covers, fractional pixels weighted by the covered fraction), bilinear with half-pixel centres up. Averaging
    the whole cell mixes a small lesion's scores with its surroundings: on 64 px inputs with 8 x 8 CAMs it keeps
    about half as many lesion cells as "release" (docs/RESULTS.md, "Where the region labels lose the lesion").
For the factor-2 image reduction both give the same 2 x 2 mean on even sizes.
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


def bilinear_weights(in_size: int, out_size: int, align_corners: bool) -> np.ndarray:
  """`(out_size, in_size)` matrix of PyTorch's bilinear ``F.interpolate`` along one axis (no antialiasing).

  Output j reads the source coordinate c = j (in - 1) / (out - 1) with `align_corners` (0 for out = 1), else
  c = max((j + 0.5) in / out - 0.5, 0); its value is (1 - t) x[i] + t x[min(i + 1, in - 1)], i = floor(c),
  t = c - i. Rows sum to 1.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"bilinear resampling needs sizes >= 1, got {in_size} -> {out_size}")
  j = np.arange(out_size, dtype=np.float64)
  if align_corners:
    src = j * (in_size - 1) / (out_size - 1) if out_size > 1 else np.zeros_like(j)
  else:
    src = np.maximum((j + 0.5) * in_size / out_size - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  t = src - lo
  weights = np.zeros((out_size, in_size), np.float64)
  np.add.at(weights, (np.arange(out_size), lo), 1.0 - t)
  np.add.at(weights, (np.arange(out_size), hi), t)
  return weights.astype(np.float32)


RESAMPLING = ("release", "area")
# Per resampling: the method of each step (image down, CAM scores up, refined scores down).
_STEP_METHODS = {"release": ("bilinear", "bilinear_corners", "bilinear"), "area": ("area", "area", "area")}


def _axis_weights(in_size: int, size: int, method: str) -> np.ndarray:
  if method == "bilinear":
    return bilinear_weights(in_size, size, align_corners=False)
  if method == "bilinear_corners":
    return bilinear_weights(in_size, size, align_corners=True)
  if method == "area":  # Area down, bilinear with half-pixel centres up.
    return area_weights(in_size, size) if size < in_size else bilinear_weights(in_size, size, align_corners=False)
  raise ValueError(f"unknown resize method {method!r}")


def _resize_axis(x: jax.Array, axis: int, size: int, method: str) -> jax.Array:
  """Resizes one axis by `_axis_weights`; identity when the size is unchanged."""
  in_size = x.shape[axis]
  if size == in_size:
    return x
  weights = jnp.asarray(_axis_weights(in_size, size, method))
  moved = jnp.moveaxis(x, axis, -1)
  return jnp.moveaxis(jnp.einsum("...i,oi->...o", moved, weights), -1, axis)


def resize_spatial(x: jax.Array, height: int, width: int, method: str = "area") -> jax.Array:
  """Resizes `(B, H, W, C)` to `(B, height, width, C)`, per axis. method: "area" (area down, bilinear with
  half-pixel centres up), "bilinear" (PyTorch ``align_corners=False`` both ways) or "bilinear_corners"
  (``align_corners=True``)."""
  return _resize_axis(_resize_axis(x, 1, height, method), 2, width, method)


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
                              pos_weight: float = 0.0,
                              resampling: str = "release") -> jax.Array:
  """Refined foreground maps of a batch of CAMs, one per threshold (spec 5.2).

  Per image: the image is downsampled to `(H // downscale, W // downscale)`; for every
  threshold tau the scores softmax([tau, cam]) (channel 0 background, channel 1 foreground) are
  upsampled to that size, refined by `propagate` with the image's `pixel_affinities`,
  downsampled back to `(h, w)` (each step as `resampling` says, module docstring); foreground
  where channel 1 > channel 0 (ties are background, like the first-index argmax of the release).
  Batched, jit-able, float32 internally; the output is boolean, so nothing is differentiated
  through it.

  Args:
    images: `(B, H, W, 3)` network input images (any per-channel normalisation: the affinities
      divide by a per-channel std).
    cams: `(B, h, w)` CAMs in [0, 1].
    thresholds: background scores tau, one output map per entry.
    num_iters, dilations, temperature, downscale, pos_weight, resampling: static Python settings
      (spec defaults; `pos_weight` 0 = the release, 0.01 = ToCo/AFA's position term).

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
  if resampling not in _STEP_METHODS:
    raise ValueError(f"unknown PAR resampling {resampling!r}; expected one of {RESAMPLING}")
  image_down, scores_up, scores_down = _STEP_METHODS[resampling]
  _, height, width, _ = images.shape
  _, h, w = cams.shape
  small_h, small_w = height // downscale, width // downscale

  small = resize_spatial(images.astype(jnp.float32), small_h, small_w, image_down)
  aff = pixel_affinities(small, dilations, temperature, pos_weight)

  cams = cams.astype(jnp.float32)
  taus = jnp.asarray(thresholds, jnp.float32)  # (T,)
  bg = jnp.broadcast_to(taus[None, None, None, :], cams.shape + taus.shape)
  fg = jnp.broadcast_to(cams[..., None], bg.shape)
  scores = jax.nn.softmax(jnp.stack([bg, fg], axis=-1), axis=-1)  # (B, h, w, T, 2)
  scores = scores.reshape(cams.shape + (2 * len(thresholds),))
  scores = resize_spatial(scores, small_h, small_w, scores_up)

  refined = propagate(scores, aff, dilations, num_iters)
  refined = resize_spatial(refined, h, w, scores_down).reshape(cams.shape + (len(thresholds), 2))
  fg_map = refined[..., 1] > refined[..., 0]  # (B, h, w, T)
  return jnp.moveaxis(fg_map, -1, 1)
