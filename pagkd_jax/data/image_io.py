"""Image decoding: any common endoscopy export (JPEG, PNG, TIFF; 8/16-bit, float) to RGB uint8."""

import io

import numpy as np
from PIL import Image, ImageOps

from pagkd_jax.data.records import ImageRecord

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageDecodeError(ValueError):
  """An image could not be decoded (corrupt, truncated, or not an image)."""


def describe(record: ImageRecord) -> str:
  """`path (row N) [record i]`: where an image came from, for error messages."""
  text = record.path
  if record.row:
    text += f" (manifest row {record.row})"
  if record.record_index >= 0:
    text += f" [record {record.record_index}]"
  return text


def _composite_on_black(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  """round(colour * alpha / 255): `(H, W, 3)` and `(H, W)` uint8 to `(H, W, 3)` uint8."""
  weighted = colour.astype(np.uint32) * alpha[..., None].astype(np.uint32)
  return ((weighted + 127) // 255).astype(np.uint8)  # x / 255 is never exactly k + 1/2.


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
  """Float image to uint8: [0, 1] data is scaled by 255, [0, 255] data kept, anything else
  min-max scaled to [0, 255]; NaN counts as 0."""
  values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
  low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
  if low >= 0.0 and high <= 1.0:
    values = values * 255.0
  elif low < 0.0 or high > 255.0:
    values = (values - low) * (255.0 / max(high - low, 1e-12))
  return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _to_rgb_array(image: Image.Image) -> np.ndarray:
  """A loaded PIL image of any mode as `(H, W, 3)` uint8.

  Alpha is composited on black; 16-bit data (modes "I;16*" and "I", the latter clipped to
  [0, 65535]) is scaled by 255 / 65535 with rounding; float data see `_float_to_uint8`.
  """
  mode = image.mode
  if mode == "P":
    mode, image = ("RGBA", image.convert("RGBA")) if "transparency" in image.info else (
        "RGB", image.convert("RGB"))
  elif mode in ("PA", "RGBa", "La"):
    mode, image = "RGBA", image.convert("RGBA")
  if mode == "RGB":
    return np.asarray(image, dtype=np.uint8)
  if mode == "RGBA":
    array = np.asarray(image, dtype=np.uint8)
    return _composite_on_black(array[..., :3], array[..., 3])
  if mode == "LA":
    array = np.asarray(image, dtype=np.uint8)
    return _composite_on_black(np.repeat(array[..., :1], 3, axis=-1), array[..., 1])
  if mode in ("L", "1"):
    grey = np.asarray(image.convert("L"), dtype=np.uint8)
  elif mode in _SIXTEEN_BIT_MODES or mode == "I":
    values = np.clip(np.asarray(image).astype(np.float64), 0, 65535)
    grey = np.rint(values / 257.0).astype(np.uint8)
  elif mode == "F":
    grey = _float_to_uint8(np.asarray(image))
  else:  # CMYK, YCbCr, LAB, HSV, RGBX, ...
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
  return np.repeat(grey[..., None], 3, axis=-1)


def decode_image(data: bytes, source: str) -> np.ndarray:
  """Decodes encoded image bytes to `(H, W, 3)` uint8 RGB (EXIF orientation applied).

  Raises:
    ImageDecodeError: naming `source`, for undecodable, truncated or empty data.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()  # Truncated files fail here (LOAD_TRUNCATED_IMAGES is left False).
      ImageOps.exif_transpose(image, in_place=True)
      rgb = _to_rgb_array(image)
  except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
    raise ImageDecodeError(f"{source}: cannot decode image ({type(e).__name__}: {e})") from e
  return np.ascontiguousarray(rgb)


def read_encoded(record: ImageRecord) -> bytes:
  """The encoded bytes of `record`: a plain file, or an ArrayRecord entry when
  `record.record_index >= 0` (read by `tfds_source.read_encoded`).

  Raises:
    FileNotFoundError: naming the file and manifest row.
  """
  if record.record_index >= 0:
    from pagkd_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
    return tfds_source.read_encoded(record)
  try:
    with open(record.path, "rb") as f:
      return f.read()
  except FileNotFoundError as e:
    raise FileNotFoundError(f"image not found: {describe(record)}") from e


def read_image(record: ImageRecord) -> np.ndarray:
  """Reads and decodes `record` to `(H, W, 3)` uint8 RGB.

  Raises:
    FileNotFoundError: the file is missing.
    ImageDecodeError: the bytes are not a decodable image (message names path and row).
  """
  return decode_image(read_encoded(record), describe(record))
