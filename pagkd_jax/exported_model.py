"""Runs a classifier written by `predict.py --workdir=W --export=DIR`, with jax and numpy only.

This file imports nothing else from the project: copy it beside an application, or use the three lines it wraps:

  exported = jax.export.deserialize(open("DIR/model.jaxexport", "rb").read())
  weights = dict(np.load("DIR/weights.npz"))
  probs = exported.call(weights, images)  # images: uint8 (B, H, W, 3) RGB, any B, H, W -> (B, C) float32

With this module:

  model = ExportedModel("DIR")
  probs = model(images)            # (B, H, W, 3) uint8, one (H, W, 3) image, or a list of images of any sizes
  model.classes[probs.argmax(-1)]  # class names (model.json: classes, input_size, temperature, ...)

The program resizes (bilinear, antialiased) and normalises itself; give it decoded RGB images as they are.
"""

import json
import os

import jax
import numpy as np

PROGRAM_NAME = "model.jaxexport"
WEIGHTS_NAME = "weights.npz"
INFO_NAME = "model.json"


class ExportedModel:
  """The exported program, its weights and model.json (`info`) from `directory`."""

  def __init__(self, directory: str):
    self.directory = directory
    with open(os.path.join(directory, PROGRAM_NAME), "rb") as f:
      self.exported = jax.export.deserialize(bytearray(f.read()))
    with np.load(os.path.join(directory, WEIGHTS_NAME)) as npz:
      self.weights = {k: npz[k] for k in npz.files}
    with open(os.path.join(directory, INFO_NAME)) as f:
      self.info = json.load(f)
    self.classes = np.asarray(self.info["classes"])

  def __call__(self, images) -> np.ndarray:
    """Probabilities (B, C) of uint8 RGB images: an array (B, H, W, 3), one image (H, W, 3), or a list of images
    (several sizes are run one size at a time, the rows kept in order)."""
    if isinstance(images, (list, tuple)):
      if not images:
        return np.zeros((0, len(self.classes)), np.float32)
      images = [np.asarray(x) for x in images]
      if len({x.shape for x in images}) == 1:
        return self(np.stack(images))
      return np.concatenate([self(x[None]) for x in images])
    images = np.asarray(images)
    if images.ndim == 3:
      return self(images[None])[0]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise ValueError(f"expected uint8 RGB images (B, H, W, 3), got {images.dtype} {images.shape}")
    return np.asarray(self.exported.call(self.weights, images))
