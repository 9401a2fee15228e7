"""A trained classifier as a self-contained program: `predict.py --workdir=W --export=DIR`.

DIR holds
  model.jaxexport   the serialised `jax.export` program probs = f(weights, images): images uint8 (B, H, W, 3) RGB of
                    any batch size B and any size H x W (symbolic dimensions), resized to the model's input (bilinear,
                    antialiased, rounded to uint8 as the training pipeline's images are), normalised as in training,
                    classified; probs (B, C) float32 = softmax(logits / temperature). Lowered for CPU and CUDA
                    (the tests run the CPU program only).
  weights.npz       the weights, one array per "params/..." / "batch_stats/..." path (the program's first argument).
  model.json        classes (in output order), input_size, temperature, normalization, the stage and modality, the
                    workdir and checkpoint step it came from.

Running it needs jax and numpy only (pagkd_jax/exported_model.py, which imports nothing else from this project):

  exported = jax.export.deserialize(open("DIR/model.jaxexport", "rb").read())
  weights = dict(np.load("DIR/weights.npz"))
  probs = exported.call(weights, images)  # images: uint8 (B, H, W, 3)

The resize runs inside the program (`jax.image.resize`, float arithmetic), where predict.py resizes with PIL
(`augment.preprocess_eval`, fixed-point arithmetic): images of the input size give the same probabilities, others
can differ by one grey level in a few pixels after the resize (tests/test_model_export.py measures both).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from pagkd_jax.data.normalization import normalize_images
from pagkd_jax.evaluation import prediction

PROGRAM_NAME = "model.jaxexport"
WEIGHTS_NAME = "weights.npz"
INFO_NAME = "model.json"
PLATFORMS = ("cpu", "cuda")


def flatten_variables(variables) -> dict[str, np.ndarray]:
  """{"params": {"conv1": {"kernel": a}}, ...} -> {"params/conv1/kernel": a, ...} (host numpy arrays)."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(variables))[0]:
    flat["/".join(str(getattr(k, "key", k)) for k in path)] = np.asarray(leaf)
  return flat


def unflatten_variables(flat: dict) -> dict:
  """The inverse of `flatten_variables`."""
  tree: dict = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def resize_images(images, size: int):
  """uint8 (B, H, W, 3) -> uint8 (B, size, size, 3): bilinear, antialiased when shrinking, rounded (works with
  symbolic B, H, W)."""
  resized = jax.image.resize(images.astype(jnp.float32), (images.shape[0], size, size, images.shape[3]), "linear",
                             antialias=True)
  return jnp.clip(jnp.round(resized), 0, 255).astype(jnp.uint8)


def make_classifier_fn(model, image_size: int, normalization: str, temperature: float):
  """probs(flat weights, uint8 images (B, H, W, 3)) -> (B, C) float32: the exported function."""

  def probs(flat_weights, images):
    x = normalize_images(resize_images(images, image_size), normalization)
    logits, _ = model.apply(unflatten_variables(flat_weights), x, train=False)
    return jax.nn.softmax(logits.astype(jnp.float32) / temperature)

  return probs


def export_predictor(predictor: prediction.Predictor, out_dir: str, platforms=PLATFORMS) -> str:
  """Writes DIR/model.jaxexport, weights.npz and model.json (module docstring); returns `out_dir`."""
  config = predictor.config
  size = int(config.data.image_size)
  weights = flatten_variables(predictor.variables)
  fn = make_classifier_fn(predictor.model, size, config.data.normalization, predictor.temperature)
  batch, height, width = jax.export.symbolic_shape("batch, height, width")
  weight_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights.items()}
  exported = jax.export.export(jax.jit(fn), platforms=platforms)(
      weight_specs, jax.ShapeDtypeStruct((batch, height, width, 3), jnp.uint8))
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, PROGRAM_NAME), "wb") as f:
    f.write(exported.serialize())
  np.savez(os.path.join(out_dir, WEIGHTS_NAME), **weights)
  info = {
      "classes": list(predictor.classes),
      "input_size": size,
      "temperature": float(predictor.temperature),
      "normalization": config.data.normalization,
      "input": "uint8 RGB images (batch, height, width, 3), any batch size and image size",
      "output": "float32 probabilities (batch, classes), softmax(logits / temperature)",
      "stage": config.stage,
      "model": prediction.model_description(config.stage),
      "modality": predictor.modality,
      "architecture": config.model.name,
      "workdir": predictor.workdir,
      "checkpoint": predictor.checkpoint,
      "checkpoint_step": predictor.step,
      "platforms": list(platforms),
      "jax_version": jax.__version__,
  }
  with open(os.path.join(out_dir, INFO_NAME), "w") as f:
    json.dump(info, f, indent=2)
  logging.info("Exported the %s of %s (step %d, temperature %s) -> %s (%s, %s, %s)", info["model"],
               predictor.workdir, predictor.step, predictor.temperature, out_dir, PROGRAM_NAME, WEIGHTS_NAME,
               INFO_NAME)
  return out_dir
