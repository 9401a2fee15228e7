"""Input normalisation, applied on device to uint8 batches (they travel to the accelerator as uint8)."""

import jax.numpy as jnp

from pagkd_jax.base_config import IMAGENET_MEAN, IMAGENET_STD

NORMALIZATIONS = ("imagenet", "unit")  # The values of data.normalization.


def normalize_images(images, mode: str):
  """uint8 (..., H, W, 3) -> float32: "imagenet" mean/std normalisation or "unit" ([0, 1], the release)."""
  x = images.astype(jnp.float32) / 255.0
  if mode == "unit":
    return x
  if mode == "imagenet":
    return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
  raise ValueError(f"Unknown data.normalization {mode!r}; expected one of {NORMALIZATIONS}.")
