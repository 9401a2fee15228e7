"""Tests of pagkd_jax.evaluation.figures: PNG outputs, bilinear CAM upsampling and blending."""

import matplotlib
import numpy as np
import pytest
from PIL import Image

from pagkd_jax.evaluation import figures

NAMES3 = ["hyperplasia", "adenoma", "adenocarcinoma"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_real_png(path, min_bytes=5000):
  data = open(path, "rb").read()
  assert data[:8] == PNG_SIGNATURE
  assert len(data) > min_bytes
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    pixels = np.asarray(image.convert("RGB"))
  assert pixels.shape[0] > 100 and pixels.shape[1] > 100
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # Not a blank canvas.
  return pixels


def reference_bilinear(cam, height, width):
  """Loop version: half-pixel centres, source coordinates clamped to the map."""
  h, w = cam.shape
  out = np.zeros((height, width))
  for i in range(height):
    y = min(max((i + 0.5) * h / height - 0.5, 0.0), h - 1)
    y0 = int(np.floor(y))
    y1 = min(y0 + 1, h - 1)
    for j in range(width):
      x = min(max((j + 0.5) * w / width - 0.5, 0.0), w - 1)
      x0 = int(np.floor(x))
      x1 = min(x0 + 1, w - 1)
      fy, fx = y - y0, x - x0
      out[i, j] = ((1 - fy) * ((1 - fx) * cam[y0, x0] + fx * cam[y0, x1])
                   + fy * ((1 - fx) * cam[y1, x0] + fx * cam[y1, x1]))
  return out


def random_probs(rng, labels, num_classes):
  logits = rng.normal(size=(len(labels), num_classes))
  logits[np.arange(len(labels)), labels] += 1.0
  return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def test_plot_roc_multiclass_and_binary(tmp_path):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, size=40)
  path = figures.plot_roc(labels, random_probs(rng, labels, 3), NAMES3, tmp_path / "roc3.png")
  assert path.exists()
  assert_real_png(path)
  labels2 = rng.integers(0, 2, size=20)
  path2 = figures.plot_roc(labels2, random_probs(rng, labels2, 2), ["neg", "pos"],
                           tmp_path / "sub" / "roc2.png")
  assert_real_png(path2)
  # A class without images is listed, not an error.
  labels_missing = np.array([0, 1, 0, 1, 0])
  figures.plot_roc(labels_missing, random_probs(rng, labels_missing, 3), NAMES3, tmp_path / "m.png")
  assert_real_png(tmp_path / "m.png")
  with pytest.raises(ValueError, match="probs"):
    figures.plot_roc(labels, np.ones((40, 2)) / 2, NAMES3, tmp_path / "bad.png")


@pytest.mark.parametrize("normalize", [False, True])
def test_plot_confusion(tmp_path, normalize):
  path = figures.plot_confusion([[5, 1, 0], [2, 7, 1], [0, 0, 0]], NAMES3,
                                tmp_path / "cm.png", normalize=normalize)
  assert_real_png(path)


def test_plot_confusion_rejects_bad_matrix(tmp_path):
  with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
    figures.plot_confusion([[1, 2], [3, 4]], NAMES3, tmp_path / "cm.png")
  with pytest.raises(ValueError, match="non-negative integer"):
    figures.plot_confusion([[1, -2, 0], [0, 1, 0], [0, 0, 1]], NAMES3, tmp_path / "cm.png")


def test_upsample_hand_values_and_reference():
  # 1 x 2 -> 1 x 4: source x = -0.25, 0.25, 0.75, 1.25 -> clamped 0, 0.25, 0.75, 1.
  np.testing.assert_allclose(figures.upsample_bilinear(np.array([[0.0, 1.0]]), 1, 4),
                             [[0.0, 0.25, 0.75, 1.0]])
  rng = np.random.default_rng(0)
  cam = rng.random((3, 5))
  for size in [(7, 11), (12, 10), (3, 5), (2, 3)]:
    np.testing.assert_allclose(figures.upsample_bilinear(cam, *size),
                               reference_bilinear(cam, *size), atol=1e-12)


def test_upsample_constant_is_constant():
  np.testing.assert_allclose(figures.upsample_bilinear(np.full((4, 3), 0.37), 17, 23),
                             np.full((17, 23), 0.37), atol=1e-15)


def test_cam_overlay_blend():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, size=(16, 12, 3), dtype=np.uint8)
  cam = rng.random((4, 3))
  np.testing.assert_array_equal(figures.cam_overlay(image, cam, alpha=0.0), image)
  jet = matplotlib.colormaps["jet"]
  expected = np.zeros((16, 12, 3))
  up = reference_bilinear(cam, 16, 12)
  for i in range(16):
    for j in range(12):
      colour = np.array(jet(up[i, j])[:3]) * 255.0
      expected[i, j] = 0.6 * image[i, j] + 0.4 * colour
  out = figures.cam_overlay(image, cam, alpha=0.4)
  assert out.dtype == np.uint8 and out.shape == image.shape
  assert np.abs(out.astype(np.int64) - expected).max() <= 0.5 + 1e-9
  # Fully opaque, constant CAM: every pixel is the one jet colour.
  solid = figures.cam_overlay(image, np.ones((2, 2)), alpha=1.0)
  top_colour = np.rint(np.array(jet(1.0)[:3]) * 255)
  np.testing.assert_array_equal(solid, np.broadcast_to(top_colour, solid.shape))


def test_cam_overlay_rejects_bad_input():
  image = np.zeros((8, 8, 3), dtype=np.uint8)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    figures.cam_overlay(image, np.full((2, 2), 1.5))
  # A float32 ulp above 1 is rounding, not an error.
  over = np.full((2, 2), np.float32(1.0) + np.finfo(np.float32).eps)
  np.testing.assert_array_equal(figures.cam_overlay(image, over),
                                figures.cam_overlay(image, np.ones((2, 2))))
  with pytest.raises(ValueError, match="uint8"):
    figures.cam_overlay(image.astype(np.float32), np.zeros((2, 2)))
  with pytest.raises(ValueError, match="alpha"):
    figures.cam_overlay(image, np.zeros((2, 2)), alpha=1.2)


def test_save_cam_overlays(tmp_path):
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
  cams = rng.random((3, 4, 4))
  titles = [f"true: adenoma / pred: adenoma (0.9{i})" for i in range(3)]
  paths = figures.save_cam_overlays(images, cams, tmp_path / "cams", titles)
  assert [p.name for p in paths] == ["cam_000.png", "cam_001.png", "cam_002.png"]
  for path in paths:
    assert_real_png(path)
  with pytest.raises(ValueError, match="title"):
    figures.save_cam_overlays(images, cams, tmp_path / "cams", titles[:2])
  with pytest.raises(ValueError, match=r"cams\[1\]"):
    bad = cams.copy()
    bad[1, 0, 0] = np.nan
    figures.save_cam_overlays(images, bad, tmp_path / "cams", titles)
