"""Pixel-adaptive refinement (spec 5.2) against a slow NumPy reference with explicit loops."""

import math

import jax
import numpy as np
import pytest

from pagkd_jax.distill import par

DILATIONS = (1, 2, 4, 8)
_PAR_SETTINGS = ("thresholds", "num_iters", "dilations", "temperature", "downscale", "pos_weight", "resampling")
refine = jax.jit(par.pixel_adaptive_refinement, static_argnames=_PAR_SETTINGS)


# ---- slow NumPy reference (float64, explicit loops) --------------------------------------------


def ref_area_axis(x: np.ndarray, axis: int, out: int) -> np.ndarray:
  """Box downsampling of one axis: overlap-weighted mean of the covered input pixels."""
  x = np.moveaxis(x, axis, 0)
  n = x.shape[0]
  scale = n / out
  y = np.zeros((out,) + x.shape[1:])
  for i in range(out):
    lo, hi = i * scale, (i + 1) * scale
    for j in range(n):
      overlap = min(hi, j + 1) - max(lo, j)
      if overlap > 0:
        y[i] += overlap * x[j]
    y[i] /= scale
  return np.moveaxis(y, 0, axis)


def ref_bilinear_axis(x: np.ndarray, axis: int, out: int, align_corners: bool = False) -> np.ndarray:
  """Bilinear resampling of one axis as PyTorch's F.interpolate (no antialiasing): half-pixel centres, source
  coordinate clamped, or with align_corners the end pixels of input and output aligned."""
  x = np.moveaxis(x, axis, 0)
  n = x.shape[0]
  y = np.zeros((out,) + x.shape[1:])
  for i in range(out):
    if align_corners:
      src = i * (n - 1) / (out - 1) if out > 1 else 0.0
    else:
      src = min(max((i + 0.5) * n / out - 0.5, 0.0), n - 1.0)
    j0 = int(math.floor(src))
    j1 = min(j0 + 1, n - 1)
    frac = src - j0
    y[i] = (1 - frac) * x[j0] + frac * x[j1]
  return np.moveaxis(y, 0, axis)


def ref_resize(x: np.ndarray, height: int, width: int, method: str = "area") -> np.ndarray:
  """(H, W, C) -> (height, width, C), per axis: "area" bilinear up and area down; "bilinear" and
  "bilinear_corners" bilinear both ways (half-pixel centres, aligned corners)."""
  for axis, size in ((0, height), (1, width)):
    if size == x.shape[axis]:
      continue
    if method == "area" and size < x.shape[axis]:
      x = ref_area_axis(x, axis, size)
    else:
      x = ref_bilinear_axis(x, axis, size, align_corners=method == "bilinear_corners")
  return x


# The resize of each PAR step (image down, CAM scores up, refined scores down), as the module docstring states.
REF_STEPS = {"release": ("bilinear", "bilinear_corners", "bilinear"), "area": ("area", "area", "area")}


def ref_neighbours(img: np.ndarray, y: int, x: int, dilations) -> list[np.ndarray]:
  """Values of the 8 * len(dilations) neighbours of (y, x), index clamping = replicate padding."""
  height, width = img.shape[:2]
  values = []
  for d in dilations:
    for dy in (-1, 0, 1):
      for dx in (-1, 0, 1):
        if dy == 0 and dx == 0:
          continue
        yy = min(max(y + dy * d, 0), height - 1)
        xx = min(max(x + dx * d, 0), width - 1)
        values.append(img[yy, xx])
  return values


def ref_affinities(img: np.ndarray, dilations, temperature: float, pos_weight: float) -> np.ndarray:
  """(H, W, K) affinities of the spec: std of the K neighbour values per channel (ddof 1)."""
  height, width, channels = img.shape
  num = 8 * len(dilations)
  dist = []
  for d in dilations:
    for dy in (-1, 0, 1):
      for dx in (-1, 0, 1):
        if dy or dx:
          dist.append(d * (math.sqrt(2) if dy and dx else 1.0))
  dist_mean = sum(dist) / num
  dist_std = math.sqrt(sum((r - dist_mean) ** 2 for r in dist) / (num - 1))
  pos_logits = [-(r / (dist_std + 1e-8) / temperature) ** 2 for r in dist]
  pos_soft = [math.exp(v - max(pos_logits)) for v in pos_logits]
  pos_soft = [v / sum(pos_soft) for v in pos_soft]

  out = np.zeros((height, width, num))
  for y in range(height):
    for x in range(width):
      neigh = ref_neighbours(img, y, x, dilations)
      logits = [0.0] * num
      for c in range(channels):
        vals = [float(v[c]) for v in neigh]
        mean = sum(vals) / num
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (num - 1))
        for k in range(num):
          logits[k] += -(abs(vals[k] - img[y, x, c]) / (std + 1e-8) / temperature) ** 2 / channels
      top = max(logits)
      soft = [math.exp(v - top) for v in logits]
      total = sum(soft)
      for k in range(num):
        out[y, x, k] = (soft[k] / total + pos_weight * pos_soft[k]) / (1 + pos_weight)
  return out


def ref_propagate(maps: np.ndarray, aff: np.ndarray, dilations, num_iters: int) -> np.ndarray:
  height, width, _ = maps.shape
  for _ in range(num_iters):
    new = np.zeros_like(maps)
    for y in range(height):
      for x in range(width):
        for k, value in enumerate(ref_neighbours(maps, y, x, dilations)):
          new[y, x] += aff[y, x, k] * value
    maps = new
  return maps


def ref_par(image: np.ndarray, cam: np.ndarray, thresholds, num_iters=10, dilations=DILATIONS,
            temperature=0.3, downscale=2, pos_weight=0.0, resampling="release") -> np.ndarray:
  """Refined scores of one image: (T, h, w, 2), channel 0 background, 1 foreground."""
  height, width, _ = image.shape
  h, w = cam.shape
  image_down, scores_up, scores_down = REF_STEPS[resampling]
  small = ref_resize(image.astype(np.float64), height // downscale, width // downscale, image_down)
  aff = ref_affinities(small, dilations, temperature, pos_weight)
  result = []
  for tau in thresholds:
    scores = np.zeros((h, w, 2))
    for y in range(h):
      for x in range(w):
        e_bg, e_fg = math.exp(tau), math.exp(float(cam[y, x]))
        scores[y, x] = (e_bg / (e_bg + e_fg), e_fg / (e_bg + e_fg))
    up = ref_resize(scores, small.shape[0], small.shape[1], scores_up)
    refined = ref_propagate(up, aff, dilations, num_iters)
    result.append(ref_resize(refined, h, w, scores_down))
  return np.stack(result)


def assert_fg_matches(fg: np.ndarray, ref_scores: np.ndarray, margin: float = 1e-5) -> None:
  """fg `(T, h, w)` equals the reference argmax wherever the reference is not a near-tie."""
  decided = np.abs(ref_scores[..., 1] - ref_scores[..., 0]) > margin
  assert decided.mean() > 0.9  # The comparison is not vacuous.
  np.testing.assert_array_equal(fg[decided], (ref_scores[..., 1] > ref_scores[..., 0])[decided])


# ---- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["area", "bilinear", "bilinear_corners"])
@pytest.mark.parametrize("in_size,out_size", [(8, 4), (7, 3), (5, 5), (3, 8), (4, 7), (32, 8), (8, 32)])
def test_resize_matches_reference(in_size, out_size, method):
  x = np.random.default_rng(0).normal(size=(2, in_size, in_size + 1, 3)).astype(np.float32)
  got = par.resize_spatial(x, out_size, out_size + 2, method)
  want = np.stack([ref_resize(xi.astype(np.float64), out_size, out_size + 2, method) for xi in x])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_bilinear_weights_are_pytorchs_interpolate():
  """Rows worked out by hand from F.interpolate's coordinate rules (2 -> 4 and 8 -> 2)."""
  np.testing.assert_allclose(par.bilinear_weights(2, 4, align_corners=True),
                             [[1, 0], [2 / 3, 1 / 3], [1 / 3, 2 / 3], [0, 1]], rtol=1e-6)
  np.testing.assert_allclose(par.bilinear_weights(2, 4, align_corners=False),  # c = 0 (clamped), 0.25, 0.75, 1.25.
                             [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]], rtol=1e-6)
  down = np.zeros((2, 8))
  down[0, 1:3] = down[1, 5:7] = 0.5  # Factor 4: c = 1.5 and 5.5, the mean of each cell's two middle pixels.
  np.testing.assert_allclose(par.bilinear_weights(8, 2, align_corners=False), down, rtol=1e-6)
  with pytest.raises(ValueError, match="unknown PAR resampling 'nearest'"):
    par.pixel_adaptive_refinement(np.zeros((1, 8, 8, 3), np.float32), np.zeros((1, 2, 2), np.float32),
                                  resampling="nearest")


def test_area_weights_rows_sum_to_one_and_reject_upsampling():
  np.testing.assert_allclose(par.area_weights(7, 3).sum(axis=1), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="7 -> 9"):
    par.area_weights(7, 9)


@pytest.mark.parametrize("pos_weight", [0.0, 0.01])
def test_affinities_and_propagation_match_reference(pos_weight):
  rng = np.random.default_rng(1)
  img = rng.random((2, 6, 5, 3)).astype(np.float32)  # Dilation 8 > size: replicate padding.
  img[1, :, :2] = 0.25  # A flat patch: zero std on some channels.
  aff = par.pixel_affinities(img, DILATIONS, 0.3, pos_weight)
  want_aff = np.stack([ref_affinities(im.astype(np.float64), DILATIONS, 0.3, pos_weight)
                       for im in img])
  np.testing.assert_allclose(np.asarray(aff), want_aff, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(aff).sum(-1), 1.0, rtol=1e-5)

  maps = rng.random((2, 6, 5, 4)).astype(np.float32)
  got = par.propagate(maps, aff, DILATIONS, 3)
  want = np.stack([ref_propagate(m.astype(np.float64), a, DILATIONS, 3)
                   for m, a in zip(maps, want_aff)])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("resampling", par.RESAMPLING)
def test_par_two_flat_regions_matches_reference(resampling):
  rng = np.random.default_rng(2)
  img = np.zeros((2, 8, 8, 3), np.float32)
  img[:, :, :4] = (0.9, 0.3, 0.2)
  img[:, :, 4:] = (0.2, 0.4, 0.9)
  img[1] += 0.05 * rng.random((8, 8, 3)).astype(np.float32)
  cams = rng.random((2, 2, 2)).astype(np.float32)
  fg = refine(img, cams, resampling=resampling)
  assert fg.shape == (2, 2, 2, 2) and fg.dtype == bool
  for b in range(2):
    assert_fg_matches(np.asarray(fg[b]), ref_par(img[b], cams[b], (0.7, 0.3), resampling=resampling))


@pytest.mark.parametrize("thresholds,pos_weight,resampling",
                         [((0.7, 0.3), 0.0, "release"), ((0.3, 0.7), 0.01, "release"), ((0.7, 0.3), 0.0, "area")])
def test_par_random_image_matches_reference(thresholds, pos_weight, resampling):
  rng = np.random.default_rng(3)
  img = rng.random((2, 14, 12, 3)).astype(np.float32)  # Half size 7x6; CAM 3x2: odd ratios.
  cams = rng.random((2, 3, 2)).astype(np.float32)
  fg = refine(img, cams, thresholds=thresholds, pos_weight=pos_weight, resampling=resampling)
  for b in range(2):
    assert_fg_matches(np.asarray(fg[b]),
                      ref_par(img[b], cams[b], thresholds, pos_weight=pos_weight, resampling=resampling))


def test_par_spreads_within_colour_region_and_stops_at_edge():
  img = np.zeros((1, 32, 32, 3), np.float32)
  img[:, :, :16] = (0.8, 0.2, 0.2)  # Left half of the image = CAM columns 0 and 1.
  img[:, :, 16:] = (0.2, 0.3, 0.8)
  cam = np.zeros((1, 4, 4), np.float32)
  cam[:, :, :2] = 1.0
  cam[:, 0, 0] = 0.0  # A hole inside the lesion region.
  cam[:, :, 2] = 0.5  # Activation bleeding across the edge.
  region = np.zeros((4, 4), bool)
  region[:, :2] = True

  raw = refine(img, cam, num_iters=0)[0]
  assert not np.array_equal(np.asarray(raw[0]), region)  # Hole.
  assert not np.array_equal(np.asarray(raw[1]), region)  # Hole and bleeding.
  refined = refine(img, cam)[0]
  np.testing.assert_array_equal(np.asarray(refined[0]), region)
  np.testing.assert_array_equal(np.asarray(refined[1]), region)

  # Control: without the colour edge the same CAM spreads over the whole image.
  flat = refine(np.full_like(img, 0.5), cam)[0]
  assert np.asarray(flat[1]).all() and not np.asarray(flat[0]).any()


def test_par_batch_equals_single_images():
  rng = np.random.default_rng(4)
  img = rng.random((2, 14, 12, 3)).astype(np.float32)  # Shapes of the test above: compiled once.
  cams = rng.random((2, 3, 2)).astype(np.float32)
  batched = np.asarray(refine(img, cams))
  for b in range(2):
    single = np.asarray(refine(img[b:b + 1], cams[b:b + 1]))
    np.testing.assert_array_equal(batched[b:b + 1], single)


def test_par_rejects_bad_shapes():
  img = np.zeros((2, 8, 8, 3), np.float32)
  with pytest.raises(ValueError, match="cams"):
    par.pixel_adaptive_refinement(img, np.zeros((3, 2, 2), np.float32))
  with pytest.raises(ValueError, match="images"):
    par.pixel_adaptive_refinement(img[0], np.zeros((2, 2, 2), np.float32))
  with pytest.raises(ValueError, match="downscale"):
    par.pixel_adaptive_refinement(img, np.zeros((2, 2, 2), np.float32), downscale=16)
