"""Predictions of a trained workdir's classifier on new images (predict.py).

  predictor = prediction.load_predictor(workdir)
  paths = prediction.collect_image_paths(["new_frames/", "more.csv", "one.png"])
  result = prediction.predict(predictor, paths, out_csv="preds.csv")

Inputs: an image file, a folder (searched recursively for .jpg/.jpeg/.png/.tif/.tiff, hidden entries skipped) or a
CSV with a `path` column (relative to the CSV's folder, or absolute; every other column is ignored, so a training
manifest works). Every image is read and decoded once first: an image that cannot be used (missing, unreadable,
undecodable) gets a row with its reason in the `error` column and empty probabilities, and does not stop the others.

The model: a stage-2 (`pagkd`) or `baseline` workdir predicts with its WLI classifier (the PaGKD student), a
`teacher` workdir with its NBI classifier; the log says which, with the checkpoint and its step. Images are resized
to `data.image_size` and normalised exactly as in evaluation (`augment.preprocess_eval`, `normalize_images`),
batched and sharded over every device (`inference.predict_records`), so any device count gives the same rows.
The probabilities are calibrated when the workdir has a temperature (calibration.json, from
`eval.py --config.eval.calibrate=True`) for the checkpoint used.

The CSV: `path, predicted, prob_<class>... (one per class, in config.data.classes order), error` (plus `cam`, the
overlay written for the row, with `cams_dir`); one row per input image, in input order.
"""

import csv
import dataclasses
import os
import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging

from pagkd_jax import experiment
from pagkd_jax import mesh as mesh_lib
from pagkd_jax import methods
from pagkd_jax.data import manifest as manifest_lib
from pagkd_jax.data import validate
from pagkd_jax.data.records import ImageRecord
from pagkd_jax.evaluation import calibration
from pagkd_jax.evaluation import evaluator
from pagkd_jax.evaluation import inference

_MODEL_NAMES = {"pagkd": "WLI PaGKD student", "baseline": "WLI baseline classifier", "teacher": "NBI teacher"}


def model_description(stage: str) -> str:
  """What a workdir of `stage` predicts with, for logs: "WLI PaGKD student", "NBI teacher", ..."""
  return _MODEL_NAMES.get(stage, f"{stage} classifier")


# ---- inputs --------------------------------------------------------------------------------------------------------
def _folder_images(folder: str) -> list[str]:
  found = []
  for root, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    found += [os.path.join(root, f) for f in sorted(files)
              if not f.startswith(".") and os.path.splitext(f)[1].lower() in manifest_lib.IMAGE_EXTENSIONS]
  return found


def _csv_images(csv_path: str) -> list[str]:
  with open(csv_path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f, skipinitialspace=True)
    columns = {(name or "").strip().lower(): name for name in (reader.fieldnames or [])}
    if "path" not in columns:
      raise ValueError(f"{csv_path}: no 'path' column (found: {list(columns)}); a CSV input lists images in a "
                       f"'path' column, relative to the CSV's folder or absolute.")
    base = os.path.dirname(os.path.abspath(csv_path))
    paths = []
    for row in reader:
      value = (row.get(columns["path"]) or "").strip()
      if value:
        paths.append(os.path.normpath(os.path.join(base, value)))
  return paths


def collect_image_paths(inputs: Sequence[str]) -> list[str]:
  """The image paths named by `inputs` (files, folders, CSVs; see the module docstring), in order.

  Raises:
    FileNotFoundError: an input does not exist (naming it).
    ValueError: a CSV input without a `path` column, or a folder without images.
  """
  paths = []
  for given in inputs:
    if os.path.isdir(given):
      found = _folder_images(given)
      if not found:
        raise ValueError(f"{given}: no images in this folder or below it (extensions "
                         f"{', '.join(manifest_lib.IMAGE_EXTENSIONS)}).")
      paths += found
    elif os.path.isfile(given) and given.lower().endswith(".csv"):
      paths += _csv_images(given)
    elif os.path.isfile(given):
      paths.append(given)
    else:
      raise FileNotFoundError(f"--input {given}: no such file or folder.")
  return paths


# ---- the model -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Predictor:
  """A workdir's classifier, restored and replicated over `mesh`; probabilities are softmax(logits / temperature)."""

  workdir: str
  config: object
  model: object
  variables: object
  step: int
  checkpoint: str  # "best" or "latest".
  temperature: float
  mesh: object

  @property
  def classes(self) -> tuple[str, ...]:
    return tuple(self.config.data.classes)

  @property
  def modality(self) -> str:
    return methods.stage_modality(self.config.stage)


def load_predictor(workdir: str, which: str = "best") -> Predictor:
  """The classifier of a training workdir (its `which` checkpoint) and its calibration temperature."""
  workdir = os.path.abspath(workdir)
  config = evaluator.load_config(workdir)
  mesh = mesh_lib.make_mesh()
  model = experiment.build_model(config)
  variables, step, kind = evaluator.restore_classifier(workdir, model, int(config.data.image_size), which, mesh)
  temperature = calibration.read_temperature(workdir, int(step))
  predictor = Predictor(workdir, config, model, variables, int(step), kind, temperature, mesh)
  logging.info("%s: predicting with the %s (stage %s, %s checkpoint, step %d) on %s images, %d x %d input; "
               "temperature %s%s", workdir, model_description(config.stage), config.stage, kind, step,
               predictor.modality.upper(), config.data.image_size, config.data.image_size, temperature,
               f" (from {calibration.CALIBRATION_NAME})" if temperature != 1.0 else " (uncalibrated)")
  return predictor


# ---- predicting ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Predictions:
  """One entry per input image: `probs[i]` (C,) is NaN where `errors[i]` says why the image was not used."""

  paths: list[str]
  probs: np.ndarray  # (N, C) float32.
  errors: list[str]  # "" for a predicted image.
  classes: tuple[str, ...]
  cams: list[str] | None = None  # The overlay written for each row ("" for an unused image), with cams_dir.
  upsampled: list[str] = dataclasses.field(default_factory=list)  # Used images smaller than the input.

  @property
  def predicted(self) -> list[str]:
    return ["" if e else self.classes[int(np.argmax(p))] for p, e in zip(self.probs, self.errors)]


def predict_paths(predictor: Predictor, paths: Sequence[str], *, batch_size: int | None = None,
                  num_workers: int | None = None, log_every_seconds: float = 30.0) -> Predictions:
  """Probabilities of every image in `paths` (see the module docstring); progress in the log for long inputs."""
  config = predictor.config
  size = int(config.data.image_size)
  records = [ImageRecord(path=p, modality=predictor.modality, label=0, lesion_id=p) for p in paths]
  facts = validate.inspect_images(records)
  errors = [f.problem for f in facts]
  usable = [i for i, e in enumerate(errors) if not e]
  upsampled = [paths[i] for i in usable if min(facts[i].height, facts[i].width) < size]
  if len(usable) < len(paths):
    logging.warning("%d of %d image(s) cannot be used (their rows give the reason):\n  %s", len(paths) - len(usable),
                    len(paths), "\n  ".join(f"{p}: {e}" for p, e in zip(paths, errors) if e))
  if upsampled:
    logging.warning("%d image(s) are smaller than the %d x %d input on their shorter side and are upsampled, e.g. "
                    "%s", len(upsampled), size, size, ", ".join(upsampled[:3]))
  probs = np.full((len(paths), len(predictor.classes)), np.nan, np.float32)
  if usable:
    predict_fn = inference.make_predict_fn(predictor.model, config.data.normalization, predictor.mesh,
                                           predictor.temperature)
    start = last = time.perf_counter()

    def progress(done: int, total: int) -> None:
      nonlocal last
      now = time.perf_counter()
      if now - last >= log_every_seconds or done == total:
        last = now
        logging.info("predicted %d / %d images (%.1f images/s)", done, total, done / max(now - start, 1e-9))

    probs[usable] = inference.predict_records(
        predict_fn, predictor.variables, [records[i] for i in usable], image_size=size,
        batch_size=int(batch_size or config.data.eval_batch_size), mesh=predictor.mesh,
        num_workers=int(config.data.num_workers if num_workers is None else num_workers), on_batch=progress)
  return Predictions(list(paths), probs, errors, predictor.classes, upsampled=upsampled)


def write_cams(predictor: Predictor, predictions: Predictions, cams_dir: str) -> None:
  """CAM overlays of the predicted class of every used image: `cams_dir/<row>_<file stem>.png` (row: 0-based, as in
  the CSV); sets `predictions.cams`."""
  used = [i for i, e in enumerate(predictions.errors) if not e]
  records = [ImageRecord(path=predictions.paths[i], modality=predictor.modality, label=0, lesion_id="")
             for i in used]
  preds = [int(np.argmax(predictions.probs[i])) for i in used]
  names = [f"{i:05d}_{os.path.splitext(os.path.basename(predictions.paths[i]))[0]}.png" for i in used]
  titles = [f"{os.path.basename(predictions.paths[i])}: {predictions.classes[p]} ({predictions.probs[i, p]:.2f})"
            for i, p in zip(used, preds)]
  written = evaluator.write_cam_overlays(cams_dir, predictor.model, predictor.variables, predictor.config, records,
                                         preds, titles, names=names)
  predictions.cams = [""] * len(predictions.paths)
  for i, path in zip(used, written):
    predictions.cams[i] = str(path)


def write_csv(predictions: Predictions, out_csv: str) -> None:
  """`path, predicted, prob_<class>..., error[, cam]`, one row per input image, probabilities to 6 decimals."""
  os.makedirs(os.path.dirname(os.path.abspath(out_csv)), exist_ok=True)
  with open(out_csv, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["path", "predicted", *(f"prob_{c}" for c in predictions.classes), "error"]
                    + (["cam"] if predictions.cams is not None else []))
    for i, (path, label, error) in enumerate(zip(predictions.paths, predictions.predicted, predictions.errors)):
      probs = [""] * len(predictions.classes) if error else [f"{p:.6f}" for p in predictions.probs[i]]
      writer.writerow([path, label, *probs, error] + ([predictions.cams[i]] if predictions.cams is not None else []))


def predict(predictor: Predictor, paths: Sequence[str], out_csv: str | None = None, *, cams_dir: str | None = None,
            batch_size: int | None = None) -> Predictions:
  """predict.py: the predictions of `predictor` on the images `paths` (`collect_image_paths`), written to `out_csv`
  and CAM overlays to `cams_dir` (process 0)."""
  logging.info("%d image(s) to predict", len(paths))
  predictions = predict_paths(predictor, paths, batch_size=batch_size)
  if jax.process_index() == 0:
    if cams_dir:
      write_cams(predictor, predictions, cams_dir)
      logging.info("CAM overlays -> %s", cams_dir)
    if out_csv:
      write_csv(predictions, out_csv)
      n_bad = sum(bool(e) for e in predictions.errors)
      logging.info("%d prediction(s)%s -> %s", len(paths) - n_bad,
                   f", {n_bad} image(s) not used (see the error column)" if n_bad else "", out_csv)
  return predictions
