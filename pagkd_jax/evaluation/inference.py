"""Class probabilities of a model over a list of records, batched, sharded over the mesh, each image once."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pagkd_jax import mesh as mesh_lib
from pagkd_jax.data import eval_batches
from pagkd_jax.data.normalization import normalize_images
from pagkd_jax.models import resnet
from pagkd_jax.models.cam import class_activation_map


def make_predict_fn(model, normalization: str, mesh, temperature: float = 1.0):
  """Jitted predict(variables, batch) -> {"probs": (B, C), "log_probs": (B, C), "index": (B,), "mask": (B,)},
  replicated.

  probs = softmax(logits / temperature) in float32 (log_probs its log); temperature 1 is the model as trained,
  another value a calibrated one (calibration.py).
  """

  def predict(variables, batch):
    logits, _ = model.apply(variables, normalize_images(batch["image"], normalization), train=False)
    logits = logits.astype(jnp.float32) / temperature
    return {"probs": jax.nn.softmax(logits), "log_probs": jax.nn.log_softmax(logits), "index": batch["index"],
            "mask": batch["mask"]}

  return jax.jit(predict, in_shardings=(mesh_lib.replicated(mesh), mesh_lib.eval_batch_sharding(mesh)),
                 out_shardings=mesh_lib.replicated(mesh))


def predict_records(predict_fn, variables, records, *, image_size: int, batch_size: int, mesh,
                    num_workers: int = 0, on_batch: Callable[[int, int], None] | None = None,
                    outputs: str | tuple[str, ...] = "probs") -> np.ndarray | dict[str, np.ndarray]:
  """Probabilities (N, C) of `records`, in their order. Every record is predicted exactly once.

  `outputs`: the predict_fn output to return ("probs" or "log_probs"), or a tuple of them (then a dict of arrays).

  `batch_size` is rounded up to a multiple of the number of devices (padding is masked), so a checkpoint can be
  evaluated on any number of devices. `on_batch(images done, N)` is called after every batch (progress).
  """
  batch_size = -(-batch_size // mesh.devices.size) * mesh.devices.size
  sharding = mesh_lib.eval_batch_sharding(mesh)
  names = (outputs,) if isinstance(outputs, str) else tuple(outputs)
  results = None
  seen = np.zeros(len(records), np.int64)
  for local in eval_batches.make_eval_iterator(records, image_size=image_size, batch_size=batch_size,
                                               process_index=jax.process_index(),
                                               process_count=jax.process_count(), num_workers=num_workers):
    batch = {k: mesh_lib.global_array(v, sharding, (batch_size,) + v.shape[1:]) for k, v in local.items()}
    out = jax.device_get(predict_fn(variables, batch))
    valid = out["mask"].astype(bool)
    if results is None:
      results = {k: np.zeros((len(records), out[k].shape[-1]), np.float32) for k in names}
    idx = out["index"][valid]
    for k in names:
      results[k][idx] = out[k][valid]
    np.add.at(seen, idx, 1)
    if on_batch is not None:
      on_batch(int(np.count_nonzero(seen)), len(records))
  if len(records) and not np.all(seen == 1):
    raise RuntimeError(f"Evaluation visited images {np.flatnonzero(seen != 1)[:10]} not exactly once.")
  if results is None:
    results = {k: np.zeros((0, 0), np.float32) for k in names}
  return results[outputs] if isinstance(outputs, str) else results


def make_cam_fn(model, normalization: str):
  """Jitted cams(variables, images (B, H, W, 3) uint8, classes (B,)) -> (B, h, w) in [0, 1]."""

  def cams(variables, images, classes):
    _, features = model.apply(variables, normalize_images(images, normalization), train=False)
    return class_activation_map(features, resnet.class_kernel(variables["params"]), classes)

  return jax.jit(cams)
