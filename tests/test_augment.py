"""Tests for the host-side augmentation against NumPy references."""

import numpy as np
import pytest

from pagkd_jax.data import augment

NO_AUG = dict(rotate=False, hflip=False, vflip=False, random_resized_crop=False,
              color_jitter=0.0)


def _image(seed: int = 0, size: tuple[int, int] = (8, 8)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)


def test_resize_shape_dtype_and_constant_image():
  out = augment.resize(np.full((30, 20, 3), 77, dtype=np.uint8), 12)
  assert out.shape == (12, 12, 3) and out.dtype == np.uint8
  assert np.all(out == 77)
  image = _image()
  np.testing.assert_array_equal(augment.resize(image, 8), image)
  np.testing.assert_array_equal(augment.preprocess_eval(image, 8), image)


def _bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) antialiased bilinear weights: a triangle of half-width max(1, scale) around
  each output centre, renormalised where it leaves the image."""
  scale = n_in / n_out
  support = max(1.0, scale)
  weights = np.zeros((n_out, n_in))
  for i in range(n_out):
    centre = (i + 0.5) * scale
    for j in range(n_in):
      weights[i, j] = max(0.0, 1.0 - abs(j + 0.5 - centre) / support)
    weights[i] /= weights[i].sum()
  return weights


@pytest.mark.parametrize("shape, size", [((8, 8), 4), ((12, 9), 5), ((3, 5), 7)])
def test_resize_matches_separable_bilinear_reference(shape, size):
  image = _image(1, shape)
  out = augment.resize(image, size).astype(int)
  rows, cols = _bilinear_weights(shape[0], size), _bilinear_weights(shape[1], size)
  expected = np.zeros((size, size, 3))
  for i in range(size):
    for j in range(size):
      for ch in range(3):
        expected[i, j, ch] = sum(rows[i, a] * cols[j, b] * float(image[a, b, ch])
                                 for a in range(shape[0]) for b in range(shape[1]))
  # PIL resamples rows and columns in two passes with 8-bit rounding in between.
  assert np.max(np.abs(out - expected)) <= 1.0


@pytest.mark.parametrize("angle, turns", [(90, 1), (-90, -1), (180, 2), (270, 3)])
def test_rotate_by_right_angles_matches_rot90(angle, turns):
  image = _image(2, (6, 6))
  np.testing.assert_array_equal(augment.rotate(image, angle), np.rot90(image, k=turns))


def test_rotate_fills_outside_with_black():
  image = np.full((9, 9, 3), 200, dtype=np.uint8)
  out = augment.rotate(image, 45)
  assert np.all(out[0, 0] == 0) and np.all(out[-1, -1] == 0)  # Corners leave the source.
  assert np.all(out[4, 4] == 200)  # The centre stays.


def test_flips_produce_the_four_numpy_flips_evenly():
  image = _image(3)
  references = {
      "none": image, "h": image[:, ::-1], "v": image[::-1], "hv": image[::-1, ::-1]}
  counts = dict.fromkeys(references, 0)
  for seed in range(400):
    out = augment.augment_train(image, 8, dict(NO_AUG, hflip=True, vflip=True),
                                np.random.default_rng(seed))
    matches = [name for name, ref in references.items() if np.array_equal(out, ref)]
    assert len(matches) == 1
    counts[matches[0]] += 1
  for name, count in counts.items():
    assert 60 <= count <= 140, (name, counts)  # Binomial(400, 1/4): mean 100, sd 8.7.


def test_training_rotation_is_an_integer_angle_in_range():
  image = _image(4, (12, 12))
  rotations = {angle: augment.rotate(image, angle) for angle in range(-180, 181)}
  seen = set()
  for seed in range(30):
    out = augment.augment_train(image, 12, dict(NO_AUG, rotate=True),
                                np.random.default_rng(seed))
    angles = [a for a, ref in rotations.items() if np.array_equal(out, ref)]
    assert angles, f"seed {seed}: output is no integer rotation"
    seen.update(angles)
  assert len(seen) > 10


def test_no_augmentation_is_a_plain_resize():
  image = _image(5, (20, 16))
  out = augment.augment_train(image, 10, NO_AUG, np.random.default_rng(0))
  np.testing.assert_array_equal(out, augment.resize(image, 10))


def test_augment_is_deterministic_per_rng_state():
  config = dict(rotate=True, hflip=True, vflip=True, random_resized_crop=True,
                crop_scale=(0.3, 1.0), color_jitter=0.4)
  image = _image(6, (40, 30))
  first = augment.augment_train(image, 16, config, np.random.default_rng(11))
  again = augment.augment_train(image, 16, config, np.random.default_rng(11))
  other = augment.augment_train(image, 16, config, np.random.default_rng(12))
  assert first.shape == (16, 16, 3) and first.dtype == np.uint8
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)


def test_large_image_with_rotation_gives_the_requested_size():
  out = augment.augment_train(_image(7, (130, 70)), 16, dict(NO_AUG, rotate=True),
                              np.random.default_rng(0))
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def _colour_reference(image, b, c, s):
  luma_weights = (0.299, 0.587, 0.114)
  h, w, _ = image.shape
  x = [[[min(max(float(image[i, j, k]) * b, 0.0), 255.0) for k in range(3)] for j in range(w)]
       for i in range(h)]
  mean = sum(sum(wk * x[i][j][k] for k, wk in enumerate(luma_weights))
             for i in range(h) for j in range(w)) / (h * w)
  x = [[[min(max(mean + c * (x[i][j][k] - mean), 0.0), 255.0) for k in range(3)]
        for j in range(w)] for i in range(h)]
  out = np.zeros_like(image)
  for i in range(h):
    for j in range(w):
      luma = sum(wk * x[i][j][k] for k, wk in enumerate(luma_weights))
      for k in range(3):
        out[i, j, k] = round(min(max(luma + s * (x[i][j][k] - luma), 0.0), 255.0))
  return out


@pytest.mark.parametrize("factors", [(1.0, 1.0, 1.0), (1.3, 0.7, 1.5), (0.6, 1.4, 0.2)])
def test_adjust_colour_matches_reference(factors):
  image = _image(8, (5, 4))
  out = augment.adjust_colour(image, *factors)
  reference = _colour_reference(image, *factors)
  # float32 against float64 arithmetic: a value may land on the other side of .5.
  assert np.max(np.abs(out.astype(int) - reference.astype(int))) <= 1
  assert np.mean(out == reference) > 0.95
  if factors == (1.0, 1.0, 1.0):
    np.testing.assert_array_equal(out, image)


def test_colour_jitter_draws_factors_in_range():
  image = _image(9)
  for seed in range(5):
    out = augment.augment_train(image, 8, dict(NO_AUG, color_jitter=0.3),
                                np.random.default_rng(seed))
    factors = np.random.default_rng(seed).uniform(0.7, 1.3, size=3)
    assert np.all((factors >= 0.7) & (factors <= 1.3))
    np.testing.assert_array_equal(out, augment.adjust_colour(image, *factors))


def test_random_resized_crop_box_respects_scale_and_aspect():
  rng = np.random.default_rng(0)
  height, width, scale = 60, 80, (0.25, 0.9)
  for _ in range(200):
    top, left, h, w = augment.random_resized_crop_box(height, width, scale, rng)
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    # Rounding h and w to integers moves area and aspect a little from the drawn values.
    area = h * w / (height * width)
    assert scale[0] - 0.03 <= area <= scale[1] + 0.03
    assert 3 / 4 * (1 - 2 / h) <= w / h <= 4 / 3 * (1 + 2 / h)


def test_random_resized_crop_box_falls_back_to_a_centred_crop():
  # A 2 x 200 strip: no crop of aspect in [3/4, 4/3] reaches a quarter of its area.
  box = augment.random_resized_crop_box(2, 200, (0.25, 1.0), np.random.default_rng(0))
  w = round(2 * 4 / 3)
  assert box == (0, (200 - w) // 2, 2, w)


def test_random_resized_crop_output_shape():
  config = dict(NO_AUG, random_resized_crop=True, crop_scale=(0.2, 0.5))
  out = augment.augment_train(_image(10, (50, 60)), 24, config, np.random.default_rng(1))
  assert out.shape == (24, 24, 3) and out.dtype == np.uint8


def test_bad_input_is_rejected():
  with pytest.raises(ValueError, match="uint8"):
    augment.resize(np.zeros((4, 4, 3), np.float32), 2)
  with pytest.raises(ValueError, match=r"\(4, 4\)"):
    augment.augment_train(np.zeros((4, 4), np.uint8), 2, NO_AUG, np.random.default_rng(0))



@pytest.mark.parametrize("seed", range(6))
def test_pair_views_get_the_same_rotation_and_flips(seed):
  """Both images of a pair: the rotation and flips drawn once, in the documented order, applied to each."""
  config = dict(NO_AUG, rotate=True, hflip=True, vflip=True)
  wli, nbi = _image(20 + seed, (20, 20)), _image(40 + seed, (20, 20))
  out_wli, out_nbi = augment.augment_train_pair(wli, nbi, 16, config, np.random.default_rng(seed))
  rng = np.random.default_rng(seed)
  angle, hflip, vflip = int(rng.integers(-180, 181)), rng.random() < 0.5, rng.random() < 0.5

  def reference(image):
    x = augment.rotate(image, angle)
    x = x[:, ::-1] if hflip else x
    x = x[::-1] if vflip else x
    return augment.resize(np.ascontiguousarray(x), 16)

  np.testing.assert_array_equal(out_wli, reference(wli))
  np.testing.assert_array_equal(out_nbi, reference(nbi))
  # The WLI view is the one `augment_train` gives from the same generator state.
  np.testing.assert_array_equal(out_wli, augment.augment_train(wli, 16, config, np.random.default_rng(seed)))


def test_pair_of_identical_images_stays_identical_under_every_augmentation():
  config = dict(rotate=True, hflip=True, vflip=True, random_resized_crop=True, crop_scale=(0.3, 1.0),
                color_jitter=0.4)
  image = _image(3, (40, 30))
  views = []
  for seed in range(8):
    out_wli, out_nbi = augment.augment_train_pair(image, image.copy(), 16, config, np.random.default_rng(seed))
    np.testing.assert_array_equal(out_wli, out_nbi)
    views.append(out_wli)
  assert len({v.tobytes() for v in views}) == len(views)  # Other generator states, other draws.


def test_pair_crop_is_scaled_to_an_image_of_another_size():
  """The crop box is drawn for the WLI image; an NBI image twice as large gets the same fractions of itself."""
  config = dict(NO_AUG, random_resized_crop=True, crop_scale=(0.2, 0.6))
  small = _image(11, (40, 60))
  large = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)  # (80, 120), each pixel a 2x2 block.
  for seed in range(5):
    transform = augment.draw_train_transform(40, 60, config, np.random.default_rng(seed))
    top, left, h, w = transform.crop
    assert transform.source_shape == (40, 60) and transform.angle is None
    np.testing.assert_array_equal(augment.apply_train_transform(small, transform, 12),
                                  augment.resize(small[top:top + h, left:left + w], 12))
    np.testing.assert_array_equal(augment.apply_train_transform(large, transform, 12),
                                  augment.resize(large[2 * top:2 * (top + h), 2 * left:2 * (left + w)], 12))
