"""Region labels against the synthetic data's true lesion discs: the metric and the disc grid against NumPy loops,
and CAMs equal to the disc, its inverse and a real network's on a few generated images."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagkd_jax import base_config
from pagkd_jax.data import augment
from pagkd_jax.data import image_io
from pagkd_jax.data import manifest as manifest_lib
from pagkd_jax.data import synthetic
from pagkd_jax.data.normalization import normalize_images
from pagkd_jax.distill import pagkd
from pagkd_jax.evaluation import region_agreement
from pagkd_jax.models import resnet

SOURCE, SIZE, GRID = 48, 64, 8  # Generated at 48 px, evaluated at 64 px, tiny ResNet (stride 8): 8 x 8 cells.


def _reference_masks(discs, source_size, h, w, n=region_agreement.SUPERSAMPLE):
  out = np.zeros((len(discs), h, w), bool)
  for i, (cx, cy, r) in enumerate(discs):
    for y in range(h):
      for x in range(w):
        hits = 0
        for a in range(n):
          for b in range(n):
            px = (x + (b + 0.5) / n) * source_size / w
            py = (y + (a + 0.5) / n) * source_size / h
            hits += (px - cx) ** 2 + (py - cy) ** 2 <= r ** 2
        out[i, y, x] = hits >= n * n / 2
  return out


def _reference_agreement(labels, discs):
  tp = fp = fn = bg_in = 0
  for lab, d in zip(labels.reshape(-1), discs.reshape(-1)):
    tp += lab == 1 and d
    fp += lab == 1 and not d
    fn += lab != 1 and d
    bg_in += lab == 0 and d
  return {"lesion_iou": tp / (tp + fp + fn), "disc_recall": tp / (tp + fn), "false_lesion_fraction": fp / (tp + fp),
          "background_in_disc": bg_in / (tp + fn)}


def test_disc_masks_and_agreement_match_numpy_loops():
  rng = np.random.default_rng(0)
  discs = np.stack([rng.uniform(10, 38, 5), rng.uniform(10, 38, 5), rng.uniform(4, 14, 5)], axis=1)
  masks = region_agreement.disc_masks(discs, SOURCE, (6, 6))
  np.testing.assert_array_equal(masks, _reference_masks(discs, SOURCE, 6, 6))
  assert 0 < masks.mean() < 1
  labels = rng.choice(np.array([1, 0, -1], np.int8), size=masks.shape)
  got = region_agreement.agreement(labels, masks)
  for key, value in _reference_agreement(labels, masks).items():
    assert got[key] == pytest.approx(value, rel=1e-12), key
  assert got["lesion_fraction"] == pytest.approx(np.mean(labels == 1))
  assert got["ambiguous_fraction"] == pytest.approx(np.mean(labels == -1))
  empty = region_agreement.agreement(np.zeros_like(labels), masks)  # No lesion label: no false-lesion ratio.
  assert empty["false_lesion_fraction"] is None and empty["lesion_iou"] == 0.0
  with pytest.raises(ValueError, match="differ in shape"):
    region_agreement.agreement(labels[:, :3], masks)


@pytest.fixture(scope="module")
def synthetic_images(tmp_path_factory):
  out = tmp_path_factory.mktemp("synthetic")
  manifest = synthetic.generate(out, image_size=SOURCE, lesions_per_class=2, images_per_lesion=1, seed=0)
  records = [r for r in manifest_lib.read_manifest(manifest, synthetic.DEFAULT_CLASSES) if r.modality == "nbi"]
  discs = region_agreement.read_lesion_discs(str(out))
  images = np.stack([augment.preprocess_eval(image_io.read_image(r), SIZE) for r in records])
  masks = region_agreement.disc_masks(np.asarray([discs[r.path] for r in records]), SOURCE, (GRID, GRID))
  return out, records, images, masks


def test_cams_equal_to_the_disc_agree_and_inverted_ones_do_not(synthetic_images):
  """Without PAR the dual threshold of a CAM equal to the disc gives the disc back (up to the resampling round trip
  of PAR's input and output); with PAR (10 iterations, dilations up to 8 on 32 px) the lesion label shrinks to the
  disc's core but never leaves it. An inverted CAM puts the lesion label outside the disc."""
  _, _, images, masks = synthetic_images
  assert masks.any(axis=(1, 2)).all() and not masks.all(axis=(1, 2)).any()
  x = normalize_images(jnp.asarray(images), "imagenet")
  results = {}
  for iters in (0, 10):
    d = base_config.get_config().distill
    d.par_iters = iters
    for name, cam in (("same", masks), ("inverted", ~masks)):
      labels = np.asarray(pagkd.cam_region_labels(x, jnp.asarray(cam, jnp.float32), d))
      results[iters, name] = region_agreement.agreement(labels, masks)
  same, inverted = results[0, "same"], results[0, "inverted"]
  assert same["lesion_iou"] > 0.85 and same["disc_recall"] > 0.85 and same["false_lesion_fraction"] < 0.05
  assert inverted["lesion_iou"] < 0.05 and inverted["false_lesion_fraction"] > 0.95
  assert inverted["background_in_disc"] > 0.85
  same, inverted = results[10, "same"], results[10, "inverted"]
  assert same["false_lesion_fraction"] < 0.05 and same["lesion_iou"] > 0.2
  assert inverted["lesion_iou"] < 0.05 and inverted["false_lesion_fraction"] > 0.95


def test_region_agreement_of_a_network_on_synthetic_records(synthetic_images):
  out, records, _, masks = synthetic_images
  config = base_config.get_config()
  config.data.synthetic.out = str(out)
  config.data.synthetic.image_size = SOURCE
  config.data.image_size = SIZE
  config.data.eval_batch_size = 4  # 6 records: a full and a padded batch.
  model = resnet.create_resnet("tiny", 3)
  variables = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
  result = region_agreement.evaluate_region_agreement(model, variables, records, config)
  # The same labels computed directly, image by image.
  labels_fn = region_agreement.make_region_label_fn(model, "imagenet", config.distill)
  labels = np.concatenate([
      np.asarray(labels_fn(variables, jnp.asarray(augment.preprocess_eval(image_io.read_image(r), SIZE))[None],
                           jnp.asarray([r.label]))) for r in records])
  expected = region_agreement.agreement(labels, masks)
  assert {k: result[k] for k in expected} == expected and result["n_images"] == len(records)
  # The stages: the CAM (NumPy), its dual threshold without PAR (NumPy), and a CAM equal to the disc through PAR.
  images = np.stack([augment.preprocess_eval(image_io.read_image(r), SIZE) for r in records])
  x = normalize_images(jnp.asarray(images), "imagenet")
  _, features = model.apply(variables, x, train=False)
  kernel = np.asarray(resnet.class_kernel(variables["params"]), np.float64)
  cams = []
  for f, r in zip(np.asarray(features, np.float64), records):
    cam = np.maximum(f @ kernel[:, r.label], 0.0)
    cams.append((cam - cam.min()) / (cam.max() - cam.min() + 1e-5))
  peaks = [m.reshape(-1)[int(np.argmax(c))] for c, m in zip(cams, masks)]
  assert result["cam_peak_in_disc"] == pytest.approx(np.mean(peaks))
  hi, lo = config.distill.thresholds
  plain = np.where(np.asarray(cams) > hi, 1, np.where(np.asarray(cams) > lo, -1, 0))
  assert result["without_par"] == region_agreement.agreement(plain, masks)
  disc_labels = np.asarray(pagkd.cam_region_labels(x, jnp.asarray(masks, jnp.float32), config.distill))
  assert result["disc_through_par"] == region_agreement.agreement(disc_labels, masks)
  assert result["disc_through_par"]["false_lesion_fraction"] in (None, 0.0) or \
      result["disc_through_par"]["false_lesion_fraction"] < 0.05  # PAR shrinks a perfect CAM; it does not move it.
  for key in ("lesion_iou", "disc_recall", "background_in_disc", "lesion_fraction"):
    assert 0.0 <= result[key] <= 1.0
  bad = records[:1] + [records[1].__class__(**{**records[1].__dict__, "path": str(out / "nope.png")})]
  with pytest.raises(ValueError, match="no lesion"):
    region_agreement.evaluate_region_agreement(model, variables, bad, config)
