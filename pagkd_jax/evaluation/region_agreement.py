"""Agreement of the region labels of spec 5.1-5.3 (CAM -> PAR -> dual threshold) with the true lesions of the
synthetic data set, on un-augmented evaluation images.

The generator writes, per image, a disc that holds the lesion (OUT/lesions.csv: centre and radius in the
generated image's pixels; the radius bounds the lesion's perturbed ellipse from above). Evaluation images are only
resized, so the disc scales with the image. A position of the (h, w) feature grid belongs to the disc when at least
half of its cell lies inside (the area estimated on `SUPERSAMPLE` x `SUPERSAMPLE` points per cell).

Metrics, pooled over all images and positions (L: labelled lesion, D: inside the disc, B: labelled background):
  lesion_iou            |L and D| / |L or D|
  disc_recall           |L and D| / |D|        (the disc's share that is labelled lesion)
  false_lesion_fraction |L and not D| / |L|    (the lesion labels that fall outside the disc)
  background_in_disc    |B and D| / |D|        (the disc's share that is labelled background)
  lesion_fraction, ambiguous_fraction, disc_fraction: shares of all positions.
A ratio with an empty denominator is None.

Where the labels lose the lesion, stage by stage (`evaluate_region_agreement`):
  cam_peak_in_disc      share of images whose CAM maximum lies in a disc cell (the CAM alone)
  without_par           the metrics of the dual threshold applied to the CAM itself (spec 5.3 without 5.2)
  disc_through_par      the metrics of a CAM equal to the disc (1 inside, 0 outside) refined by PAR: what PAR, at this
                        resolution and on these images, keeps of a perfect CAM
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from pagkd_jax.data import augment
from pagkd_jax.data import image_io
from pagkd_jax.data import synthetic
from pagkd_jax.data.normalization import normalize_images
from pagkd_jax.distill import pagkd
from pagkd_jax.distill import relations
from pagkd_jax.models import resnet
from pagkd_jax.models.cam import class_activation_map

SUPERSAMPLE = 8


def read_lesion_discs(synthetic_out: str) -> dict[str, tuple[float, float, float]]:
  """{absolute image path: (centre x, centre y, radius)} in generated-image pixels, from OUT/lesions.csv."""
  return synthetic.read_lesion_columns(
      synthetic_out, lambda row: (float(row["center_x"]), float(row["center_y"]), float(row["radius"])))


def disc_masks(discs: np.ndarray, source_size: int, grid: tuple[int, int]) -> np.ndarray:
  """Disc membership of every feature-grid cell.

  Args:
    discs: (N, 3) centre x, centre y, radius in pixels of the `source_size` x `source_size` generated image.
    grid: (h, w) of the feature map (the image is resized, so each cell covers source_size / h x source_size / w
      pixels).
  Returns:
    (N, h, w) bool: at least half of the cell inside the disc.
  """
  discs = np.asarray(discs, np.float64).reshape(-1, 3)
  h, w = grid
  sub = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
  ys = ((np.arange(h)[:, None] + sub[None, :]) * source_size / h).reshape(-1)  # (h * S,) point rows.
  xs = ((np.arange(w)[:, None] + sub[None, :]) * source_size / w).reshape(-1)
  cx, cy, r = (discs[:, i, None, None] for i in range(3))
  inside = (xs[None, None, :] - cx) ** 2 + (ys[None, :, None] - cy) ** 2 <= r ** 2  # (N, h * S, w * S)
  area = inside.reshape(len(discs), h, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(2, 4))
  return area >= 0.5


def _ratio(num: int, den: int) -> float | None:
  return float(num) / float(den) if den else None


def agreement(labels: np.ndarray, discs: np.ndarray) -> dict:
  """The metrics of the module docstring for labels (N, h, w) in {1, 0, -1} against disc masks (N, h, w)."""
  labels, discs = np.asarray(labels), np.asarray(discs, bool)
  if labels.shape != discs.shape:
    raise ValueError(f"region labels {labels.shape} and disc masks {discs.shape} differ in shape.")
  lesion = labels == relations.LESION
  background = labels == relations.BACKGROUND
  both = int(np.sum(lesion & discs))
  return {
      "lesion_iou": _ratio(both, int(np.sum(lesion | discs))),
      "disc_recall": _ratio(both, int(np.sum(discs))),
      "false_lesion_fraction": _ratio(int(np.sum(lesion & ~discs)), int(np.sum(lesion))),
      "background_in_disc": _ratio(int(np.sum(background & discs)), int(np.sum(discs))),
      "lesion_fraction": float(np.mean(lesion)),
      "ambiguous_fraction": float(np.mean(labels == relations.AMBIGUOUS)),
      "disc_fraction": float(np.mean(discs)),
      "n_images": int(labels.shape[0]),
  }


def make_region_label_fn(model, normalization: str, distill_config):
  """Jitted labels(variables, images (B, H, W, 3) uint8, classes (B,)) -> (B, h, w) int8: the CAM of the true
  class of the model's own head, refined and thresholded as in training (spec 5.1-5.3)."""
  stages_fn = make_label_stages_fn(model, normalization, distill_config)
  return jax.jit(lambda variables, images, classes: stages_fn(variables, images, classes)["labels"])


def make_label_stages_fn(model, normalization: str, distill_config):
  """Jitted stages(variables, images (B, H, W, 3) uint8, classes (B,), discs (B, h, w) bool or None) -> dict:
  "cams" (B, h, w) float32 in [0, 1]; "labels" (B, h, w) int8 as in training (spec 5.1-5.3); "without_par" the
  dual threshold of the CAM itself; with discs, "disc_through_par": the labels of a CAM equal to the disc."""
  thresholds = tuple(distill_config.thresholds)

  def stages_fn(variables, images, classes, discs=None):
    x = normalize_images(images, normalization)
    _, features = model.apply(variables, x, train=False)
    cams = class_activation_map(features, resnet.class_kernel(variables["params"]), classes)
    out = {"cams": cams, "labels": pagkd.cam_region_labels(x, cams, distill_config),
           "without_par": relations.dual_threshold_labels(
               jnp.stack([cams > tau for tau in thresholds], axis=1), thresholds)}
    if discs is not None:
      out["disc_through_par"] = pagkd.cam_region_labels(x, discs.astype(jnp.float32), distill_config)
    return out

  return jax.jit(stages_fn)


def cam_peak_in_disc(cams: np.ndarray, discs: np.ndarray) -> float:
  """Share of images (N,) whose CAM (N, h, w) has its maximum (first one) in a disc cell of discs (N, h, w)."""
  flat = np.asarray(cams).reshape(len(cams), -1)
  return float(np.mean(np.asarray(discs, bool).reshape(len(cams), -1)[np.arange(len(cams)), flat.argmax(-1)]))


def evaluate_region_agreement(model, variables, records, config, batch_size: int | None = None) -> dict:
  """Region labels of `model` on the un-augmented `records` (with their true classes) against their lesion discs.

  `config`: the run's config (data.synthetic for the discs and their pixel size, data.image_size,
  data.normalization, distill for PAR and the thresholds).
  """
  if not records:
    raise ValueError("evaluate_region_agreement: no records.")
  discs_by_path = read_lesion_discs(config.data.synthetic.out)
  missing = [r.path for r in records if os.path.realpath(r.path) not in discs_by_path]
  if missing:
    raise ValueError(f"{len(missing)} image(s) have no lesion in {config.data.synthetic.out}/{synthetic.LESIONS_NAME}, "
                     f"e.g. {missing[:3]}.")
  size = config.data.image_size
  batch_size = batch_size or config.data.eval_batch_size
  stages_fn = make_label_stages_fn(model, config.data.normalization, config.distill)
  variables = jax.device_get(variables)
  discs = np.asarray([discs_by_path[os.path.realpath(r.path)] for r in records])
  grid = jax.eval_shape(lambda v, x: model.apply(v, x, train=False)[1], variables,
                        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)).shape[1:3]
  masks = disc_masks(discs, int(config.data.synthetic.image_size), grid)
  stages = {"cams": [], "labels": [], "without_par": [], "disc_through_par": []}
  for start in range(0, len(records), batch_size):
    chunk = records[start:start + batch_size]
    images = np.stack([augment.preprocess_eval(image_io.read_image(r), size) for r in chunk])
    classes = np.asarray([r.label for r in chunk], np.int32)
    chunk_masks = masks[start:start + batch_size]
    pad = batch_size - len(chunk)  # Fixed batch shape: one compilation.
    if pad:
      images = np.concatenate([images, np.repeat(images[-1:], pad, 0)])
      classes = np.concatenate([classes, np.repeat(classes[-1:], pad)])
      chunk_masks = np.concatenate([chunk_masks, np.repeat(chunk_masks[-1:], pad, 0)])
    out = stages_fn(variables, jnp.asarray(images), jnp.asarray(classes), jnp.asarray(chunk_masks))
    for name in stages:
      stages[name].append(np.asarray(out[name])[:len(chunk)])
  stages = {name: np.concatenate(values) for name, values in stages.items()}
  return {**agreement(stages["labels"], masks), "cam_peak_in_disc": cam_peak_in_disc(stages["cams"], masks),
          "without_par": agreement(stages["without_par"], masks),
          "disc_through_par": agreement(stages["disc_through_par"], masks)}
