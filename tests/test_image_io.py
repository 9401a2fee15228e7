"""Tests for image decoding: every PIL mode to (H, W, 3) uint8, and errors naming the source."""

import io
import sys
import types

import numpy as np
import pytest
from PIL import Image

from pagkd_jax.data import image_io
from pagkd_jax.data.records import ImageRecord


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _composite_reference(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  if colour.ndim == 2:
    colour = np.stack([colour] * 3, axis=-1)
  out = np.zeros(colour.shape, dtype=np.uint8)
  for i in range(colour.shape[0]):
    for j in range(colour.shape[1]):
      for ch in range(3):
        out[i, j, ch] = int(round(float(colour[i, j, ch]) * float(alpha[i, j]) / 255.0))
  return out


@pytest.fixture
def rng() -> np.random.Generator:
  return np.random.default_rng(0)


def test_rgb_png_round_trips(rng):
  pixels = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
  out = image_io.decode_image(_encode(Image.fromarray(pixels)), "x.png")
  assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
  np.testing.assert_array_equal(out, pixels)


def test_grayscale_is_replicated_to_three_channels(rng):
  grey = rng.integers(0, 256, (4, 6), dtype=np.uint8)
  out = image_io.decode_image(_encode(Image.fromarray(grey, mode="L")), "g.png")
  assert out.shape == (4, 6, 3) and out.dtype == np.uint8
  for ch in range(3):
    np.testing.assert_array_equal(out[..., ch], grey)


def test_rgba_is_composited_on_black(rng):
  rgba = rng.integers(0, 256, (4, 5, 4), dtype=np.uint8)
  rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
  out = image_io.decode_image(_encode(Image.fromarray(rgba, mode="RGBA")), "a.png")
  np.testing.assert_array_equal(out, _composite_reference(rgba[..., :3], rgba[..., 3]))
  np.testing.assert_array_equal(out[0, 0], 0)
  np.testing.assert_array_equal(out[0, 1], rgba[0, 1, :3])


def test_grey_with_alpha(rng):
  la = rng.integers(0, 256, (3, 4, 2), dtype=np.uint8)
  out = image_io.decode_image(_encode(Image.fromarray(la, mode="LA")), "la.png")
  np.testing.assert_array_equal(out, _composite_reference(la[..., 0], la[..., 1]))


def test_palette_image_maps_through_its_palette(rng):
  palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
  indices = rng.integers(0, 256, (4, 6), dtype=np.uint8)
  image = Image.fromarray(indices, mode="P")
  image.putpalette(palette.flatten().tolist())
  out = image_io.decode_image(_encode(image), "p.png")
  np.testing.assert_array_equal(out, palette[indices])


def test_palette_transparency_is_black(rng):
  palette = rng.integers(1, 256, (256, 3), dtype=np.uint8)
  indices = np.array([[0, 1], [2, 3]], dtype=np.uint8)
  image = Image.fromarray(indices, mode="P")
  image.putpalette(palette.flatten().tolist())
  out = image_io.decode_image(_encode(image, transparency=1), "pt.png")
  expected = palette[indices]
  expected[0, 1] = 0
  np.testing.assert_array_equal(out, expected)


def test_sixteen_bit_png_is_scaled_to_eight_bit(rng):
  values = rng.integers(0, 65536, (5, 4)).astype(np.uint16)
  values[0, 0], values[0, 1], values[0, 2] = 0, 65535, 257 * 100
  data = _encode(Image.fromarray(values))
  assert Image.open(io.BytesIO(data)).mode.startswith("I")
  out = image_io.decode_image(data, "deep.png")
  assert out.shape == (5, 4, 3) and out.dtype == np.uint8
  for i in range(5):
    for j in range(4):
      assert list(out[i, j]) == [int(round(values[i, j] / 257.0))] * 3
  assert out[0, 0, 0] == 0 and out[0, 1, 0] == 255 and out[0, 2, 0] == 100


def test_int32_tiff_is_treated_as_sixteen_bit():
  values = np.array([[0, 257, 65535, 70000], [-5, 1000, 32768, 12850]], dtype=np.int32)
  out = image_io.decode_image(_encode(Image.fromarray(values, mode="I"), "TIFF"), "i.tif")
  expected = [[int(round(min(max(v, 0), 65535) / 257.0))] * 3 for v in values.flatten()]
  np.testing.assert_array_equal(out.reshape(-1, 3), expected)


def test_float_tiff_in_unit_range_is_scaled_by_255(rng):
  values = rng.random((3, 4)).astype(np.float32)
  out = image_io.decode_image(_encode(Image.fromarray(values, mode="F"), "TIFF"), "f.tif")
  expected = np.array([[round(float(v) * 255.0) for v in row] for row in values])
  np.testing.assert_array_equal(out[..., 0], expected)
  np.testing.assert_array_equal(out[..., 2], expected)


def test_cmyk_is_converted_to_rgb(rng):
  cmyk = rng.integers(0, 256, (3, 4, 4), dtype=np.uint8)
  out = image_io.decode_image(_encode(Image.fromarray(cmyk, mode="CMYK"), "TIFF"), "c.tif")
  assert out.shape == (3, 4, 3) and out.dtype == np.uint8
  for i in range(3):
    for j in range(4):
      c = cmyk[i, j].astype(float)
      expected = [round((255 - c[ch]) * (255 - c[3]) / 255.0) for ch in range(3)]
      assert list(out[i, j]) == expected


def test_garbage_bytes_raise_naming_the_source():
  with pytest.raises(image_io.ImageDecodeError, match="bad/file.jpg"):
    image_io.decode_image(b"this is not an image", "bad/file.jpg")
  with pytest.raises(image_io.ImageDecodeError, match="empty.png"):
    image_io.decode_image(b"", "empty.png")


def test_truncated_jpeg_raises_naming_the_source(rng):
  pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
  data = _encode(Image.fromarray(pixels), "JPEG", quality=95)
  with pytest.raises(image_io.ImageDecodeError, match="cut.jpg"):
    image_io.decode_image(data[: len(data) // 2], "cut.jpg")


def test_read_image_of_a_missing_file_names_path_and_row(tmp_path):
  record = ImageRecord(path=str(tmp_path / "gone.png"), modality="wli", label=0, lesion_id="l",
                       row=7)
  with pytest.raises(FileNotFoundError, match=r"gone\.png \(manifest row 7\)"):
    image_io.read_image(record)


def test_read_image_of_a_corrupt_file_names_path_and_row(tmp_path):
  path = tmp_path / "corrupt.jpg"
  path.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
  record = ImageRecord(path=str(path), modality="nbi", label=1, lesion_id="l", row=3)
  with pytest.raises(image_io.ImageDecodeError, match=r"corrupt\.jpg \(manifest row 3\)"):
    image_io.read_image(record)


def test_read_image_of_a_record_entry_uses_tfds_source(monkeypatch, rng):
  pixels = rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)
  calls = []

  def read_encoded(record):
    calls.append(record)
    return _encode(Image.fromarray(pixels))

  fake = types.ModuleType("pagkd_jax.data.tfds_source")
  fake.read_encoded = read_encoded
  monkeypatch.setitem(sys.modules, "pagkd_jax.data.tfds_source", fake)
  import pagkd_jax.data  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(pagkd_jax.data, "tfds_source", fake, raising=False)
  record = ImageRecord(path="/shard-00000.array_record", modality="wli", label=0,
                       lesion_id="l", record_index=4)
  np.testing.assert_array_equal(image_io.read_image(record), pixels)
  assert calls == [record]
