"""Host-side image augmentation (spec section 3): uint8 in, uint8 out, driven by a NumPy Generator.

Training order: optional random-resized crop, rotation by an integer angle in [-180, 180] about the
centre (bilinear, black fill), horizontal and vertical flips (p = 0.5 each), resize to
`size x size`, optional colour jitter. Normalisation is not done here: batches stay uint8 and are
normalised on device.
"""

import dataclasses
import math
from typing import Any

import numpy as np
from PIL import Image

# ITU-R 601 luma weights, as PIL's "L" conversion and torchvision's rgb_to_grayscale.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def _option(config: Any, name: str, default: Any) -> Any:
  """`config.name` for a ConfigDict, dict or any object; `default` when absent."""
  if isinstance(config, dict):
    return config.get(name, default)
  return getattr(config, name, default)


def _check_image(image: np.ndarray) -> None:
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """Bilinear (antialiased) resize of `(H, W, 3)` uint8 to `(size, size, 3)` uint8."""
  _check_image(image)
  if image.shape[:2] == (size, size):
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def rotate(image: np.ndarray, angle: float) -> np.ndarray:
  """Rotates `(H, W, 3)` uint8 counter-clockwise by `angle` degrees about the centre.

  Bilinear, same size, black outside the source.
  """
  _check_image(image)
  return np.asarray(_rotate_pil(Image.fromarray(image), angle))


def _rotate_pil(image: Image.Image, angle: float) -> Image.Image:
  return image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))


def random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    rng: np.random.Generator,
    ratio: tuple[float, float] = _CROP_RATIO,
) -> tuple[int, int, int, int]:
  """`(top, left, h, w)` of a crop covering a `scale` fraction of the area, aspect in `ratio`.

  Ten tries at a random area and log-uniform aspect; if none fits, the largest centred crop
  whose aspect is clamped into `ratio`.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def adjust_colour(image: np.ndarray, brightness: float, contrast: float,
                  saturation: float) -> np.ndarray:
  """Brightness, then contrast, then saturation factors on `(H, W, 3)` uint8 (clipped per step).

  brightness: x * b. contrast: m + c (x - m), m = mean luma of the image. saturation:
  l + s (x - l), l = the pixel's luma. Factor 1 leaves the image unchanged.
  """
  _check_image(image)
  x = np.clip(image.astype(np.float32) * brightness, 0.0, 255.0)
  mean_luma = float((x @ _LUMA).mean())
  x = np.clip(mean_luma + contrast * (x - mean_luma), 0.0, 255.0)
  luma = (x @ _LUMA)[..., None]
  x = np.clip(luma + saturation * (x - luma), 0.0, 255.0)
  return np.rint(x).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """One random draw of the training augmentation, to apply to one image or to both images of a pair.

  Attributes:
    source_shape: (height, width) of the image the draw was made for.
    crop: (top, left, h, w) of the random-resized crop on an image of `source_shape`, None when off.
    angle: rotation in integer degrees, None when rotation is off.
    hflip, vflip: whether to flip.
    colour: (brightness, contrast, saturation) factors, None when colour jitter is off.
  """

  source_shape: tuple[int, int]
  crop: tuple[int, int, int, int] | None
  angle: int | None
  hflip: bool
  vflip: bool
  colour: tuple[float, float, float] | None


def draw_train_transform(height: int, width: int, aug_config: Any,
                         rng: np.random.Generator) -> TrainTransform:
  """Draws the random training view of an `height x width` image (see `augment_train` for `aug_config`).

  Draws, in this order and only when enabled: the crop box, the angle, the horizontal and the vertical flip,
  the three colour factors.
  """
  crop = None
  if _option(aug_config, "random_resized_crop", False):
    scale = tuple(_option(aug_config, "crop_scale", (0.5, 1.0)))
    crop = random_resized_crop_box(height, width, scale, rng)
  angle = int(rng.integers(-180, 181)) if _option(aug_config, "rotate", False) else None
  hflip = bool(_option(aug_config, "hflip", False) and rng.random() < 0.5)
  vflip = bool(_option(aug_config, "vflip", False) and rng.random() < 0.5)
  colour = None
  strength = float(_option(aug_config, "color_jitter", 0.0))
  if strength > 0:
    low, high = max(0.0, 1.0 - strength), 1.0 + strength
    colour = tuple(float(f) for f in rng.uniform(low, high, size=3))
  return TrainTransform((int(height), int(width)), crop, angle, hflip, vflip, colour)


def _crop_for(transform: TrainTransform, height: int, width: int) -> tuple[int, int, int, int]:
  """The crop box of `transform` on an `height x width` image: as drawn for its own size, else scaled to it."""
  top, left, h, w = transform.crop
  source_h, source_w = transform.source_shape
  if (height, width) == (source_h, source_w):
    return top, left, h, w
  h2 = min(height, max(1, round(h * height / source_h)))
  w2 = min(width, max(1, round(w * width / source_w)))
  top2 = min(height - h2, round(top * height / source_h))
  left2 = min(width - w2, round(left * width / source_w))
  return top2, left2, h2, w2


def apply_train_transform(image: np.ndarray, transform: TrainTransform, size: int) -> np.ndarray:
  """`(H, W, 3)` uint8 -> `(size, size, 3)` uint8: crop, rotation, flips, resize, colour factors of `transform`.

  An image of another size than `transform.source_shape` gets the crop box scaled to its size (same fractions of
  the image); everything else is size-free.
  """
  _check_image(image)
  if transform.crop is not None:
    top, left, h, w = _crop_for(transform, image.shape[0], image.shape[1])
    image = image[top:top + h, left:left + w]
  pil = Image.fromarray(image)
  if transform.angle is not None:
    # Rotating a large image costs more than the output needs: shrink it by an integer factor
    # first, keeping both sides >= size (and the aspect ratio) so the final resize still
    # downsamples.
    factor = min(pil.width, pil.height) // size
    if factor >= 2:
      pil = pil.reduce(factor)
    pil = _rotate_pil(pil, transform.angle)
  if transform.hflip:
    pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  if transform.vflip:
    pil = pil.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
  if pil.size != (size, size):
    pil = pil.resize((size, size), Image.Resampling.BILINEAR)
  out = np.asarray(pil)
  if transform.colour is not None:
    out = adjust_colour(out, *transform.colour)
  return out


def augment_train(image: np.ndarray, size: int, aug_config: Any,
                  rng: np.random.Generator) -> np.ndarray:
  """Random training view of `(H, W, 3)` uint8 as `(size, size, 3)` uint8.

  `aug_config` (e.g. `config.data.augment`): `random_resized_crop`, `crop_scale`, `rotate`,
  `hflip`, `vflip`, `color_jitter` (strength s: factors uniform in [1 - s, 1 + s]). The same
  `rng` state gives the same output.
  """
  _check_image(image)
  return apply_train_transform(image, draw_train_transform(image.shape[0], image.shape[1], aug_config, rng), size)


def augment_train_pair(wli: np.ndarray, nbi: np.ndarray, size: int, aug_config: Any,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """The two images of a pair, `(H, W, 3)` uint8 each, under ONE random draw (spec 8: the same rotation and
  flips, and the same crop fractions and colour factors), as two `(size, size, 3)` uint8 images.

  The draw is made for the WLI image's size (the NBI image gets the crop box scaled to its own size) and is the
  draw `augment_train` makes from the same `rng` state, so the WLI view equals `augment_train(wli, ...)`.
  """
  _check_image(wli)
  _check_image(nbi)
  transform = draw_train_transform(wli.shape[0], wli.shape[1], aug_config, rng)
  return apply_train_transform(wli, transform, size), apply_train_transform(nbi, transform, size)


def preprocess_eval(image: np.ndarray, size: int) -> np.ndarray:
  """Evaluation view: the resize only, `(H, W, 3)` -> `(size, size, 3)` uint8."""
  return resize(image, size)
