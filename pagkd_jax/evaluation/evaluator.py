"""Test-split evaluation of trained workdirs: metrics with lesion-bootstrap intervals, ROC, confusion matrix,
expected calibration error and reliability diagram (with `config.eval.calibrate`, a temperature fitted on the
validation split first: calibration.py), and CAM overlays (on synthetic data also the region labels' agreement with
the true lesions). Several workdirs
(the folds of a cross-validation) are also pooled into one report."""

import csv
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from pagkd_jax import base_config
from pagkd_jax import checkpointing
from pagkd_jax import experiment
from pagkd_jax import mesh as mesh_lib
from pagkd_jax import methods
from pagkd_jax.data import augment
from pagkd_jax.data import class_groups
from pagkd_jax.data import image_io
from pagkd_jax.evaluation import calibration
from pagkd_jax.evaluation import figures
from pagkd_jax.evaluation import inference
from pagkd_jax.evaluation import metrics as metrics_lib
from pagkd_jax.evaluation import region_agreement
from pagkd_jax.evaluation import shortcut


def load_config(workdir: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """WORKDIR/config.json, with `overrides` ({"eval.calibrate": True, ...}, eval.py's --config.eval.X) applied.
  Values added to the project after the run was saved are what the run did (`base_config.complete_saved_config`)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} is not a training workdir (train.py writes it).")
  with open(path) as f:
    saved, added = base_config.complete_saved_config(json.load(f))
  config = ml_collections.ConfigDict(saved)
  if added:
    flat = traverse_util.flatten_dict(saved, sep=".")
    logging.info("%s: config values added since the run was saved, read as what it did: %s", workdir,
                 ", ".join(f"{k}={flat[k]!r}" for k in added))
  for key, value in (overrides or {}).items():
    *parents, name = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value  # A value of another type than the run's is reported by the config check.
  return config


def _check_same_test_split(workdir: str, test_records) -> None:
  """The test images recomputed from the config must be those recorded in WORKDIR/splits.csv at training."""
  path = os.path.join(workdir, "splits.csv")
  if not os.path.exists(path):
    return
  with open(path, newline="") as f:
    then = {(row["path"], row["modality"]) for row in csv.DictReader(f) if row["split"] == "test"}
  modalities = {r.modality for r in test_records}
  then = sorted(p for p, m in then if m in modalities)
  now = sorted(r.path for r in test_records)
  if now != then:
    missing = sorted(set(then) - set(now))[:5]
    extra = sorted(set(now) - set(then))[:5]
    raise ValueError(f"The test split of {workdir} differs from {path} (the data or the split settings changed "
                     f"since training): missing {missing}, new {extra}.")


def _write_report(out_dir: str, report: dict, labels, probs, classes, n_bins: int, uncalibrated=None) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(report, f, indent=2)
  figures.plot_roc(labels, probs, classes, os.path.join(out_dir, "roc.png"))
  figures.plot_confusion(np.asarray(report["confusion_matrix"]), classes, os.path.join(out_dir, "confusion.png"))
  series = {"model": probs} if uncalibrated is None else {
      f"temperature {report['temperature']:.3g}": probs, "uncalibrated (temperature 1)": uncalibrated}
  series = {name: {**calibration.reliability_bins(labels, p, n_bins),
                   "ece": calibration.expected_calibration_error(labels, p, n_bins)} for name, p in series.items()}
  figures.plot_reliability(series, os.path.join(out_dir, "reliability.png"),
                           f"Reliability on {report.get('n_images', len(labels))} test images")


def _fit_calibration(workdir: str, config, val_records, predict, kind: str, step: int) -> float:
  """config.eval.calibrate: the temperature fitted on the validation split's images of the stage's modality,
  written to WORKDIR/calibration.json (process 0) with the checkpoint it belongs to and the validation NLL and ECE
  before and after."""
  if not val_records:
    raise ValueError(f"{workdir}: config.eval.calibrate needs validation images, and the validation split has none "
                     f"(data.val_fraction={config.data.val_fraction}).")
  outputs = predict(val_records)
  labels = np.asarray([r.label for r in val_records])
  temperature = calibration.fit_temperature(outputs["log_probs"], labels)
  n_bins = int(config.eval.get("calibration_bins", 15))
  calibrated = calibration.apply_temperature(outputs["log_probs"], temperature)
  record = {"temperature": temperature, "fitted_on": "val", "n_images": len(val_records),
            "checkpoint": kind, "checkpoint_step": step,
            "val_nll_before": calibration.negative_log_likelihood(outputs["log_probs"], labels, 1.0),
            "val_nll_after": calibration.negative_log_likelihood(outputs["log_probs"], labels, temperature),
            "val_ece_before": calibration.expected_calibration_error(labels, outputs["probs"], n_bins),
            "val_ece_after": calibration.expected_calibration_error(labels, calibrated, n_bins)}
  if jax.process_index() == 0:
    path = calibration.write_calibration(workdir, record)
    logging.info("%s: temperature %.4f fitted on %d validation images (NLL %.4f -> %.4f, ECE %.4f -> %.4f) -> %s",
                 workdir, temperature, len(val_records), record["val_nll_before"], record["val_nll_after"],
                 record["val_ece_before"], record["val_ece_after"], path)
  return temperature


def evaluate_workdir(workdir: str, which: str = "best", overrides: dict | None = None) -> dict:
  """Evaluates one workdir's model on its test split; writes WORKDIR/eval/. Returns arrays for pooling.
  `overrides`: config values replacing the run's ({"eval.calibrate": True}; `load_config`)."""
  workdir = os.path.abspath(workdir)
  config = load_config(workdir, overrides)
  data = experiment.load_split_data(config, skipped_files_of=workdir)
  classes = data.classes
  modality = methods.stage_modality(config.stage)
  test_records = data.select("test", modality)
  if not test_records:
    raise ValueError(f"{workdir}: the test split has no {modality.upper()} images.")
  _check_same_test_split(workdir, test_records)

  mesh = mesh_lib.make_mesh()
  model = experiment.build_model(config)
  size = config.data.image_size
  variables, step, kind = restore_classifier(workdir, model, size, which, mesh)
  logging.info("%s: evaluating the %s checkpoint (step %d) on %d test %s images", workdir, kind, step,
               len(test_records), modality.upper())

  predict_fn = inference.make_predict_fn(model, config.data.normalization, mesh)
  predict = lambda records: inference.predict_records(
      predict_fn, variables, records, image_size=size, batch_size=config.data.eval_batch_size, mesh=mesh,
      num_workers=config.data.num_workers, outputs=("probs", "log_probs"))
  if config.eval.get("calibrate", False):
    temperature = _fit_calibration(workdir, config, data.select("val", modality), predict, kind, int(step))
  else:
    temperature = calibration.read_temperature(workdir, int(step))
  test_outputs = predict(test_records)
  uncalibrated = test_outputs["probs"]
  probs = uncalibrated if temperature == 1.0 else calibration.apply_temperature(test_outputs["log_probs"],
                                                                                temperature)
  labels = np.asarray([r.label for r in test_records])
  groups = np.asarray([r.group_key for r in test_records])
  report = metrics_lib.classification_report(labels, probs, classes, groups=groups,
                                             n_bootstrap=config.eval.bootstrap_samples, seed=config.seed)
  n_bins = int(config.eval.get("calibration_bins", 15))
  report.update({"workdir": workdir, "stage": config.stage, "modality": modality, "checkpoint": kind,
                 "checkpoint_step": int(step), "fold": int(config.data.fold), "temperature": temperature,
                 "ece": calibration.expected_calibration_error(labels, probs, n_bins),
                 "ece_uncalibrated": calibration.expected_calibration_error(labels, uncalibrated, n_bins),
                 **_distillation_record(workdir, config, data, kind, int(step))})
  if config.data.synthetic.enabled:
    report["region_agreement"] = _region_agreement(workdir, config, data, model, variables, test_records, which)
    if modality == "wli" and config.data.synthetic.get("shortcut_agreement", 0.0) > 0:
      casts = shortcut.read_casts(config.data.synthetic.out)
      report["shortcut"] = shortcut.shortcut_reliance(
          probs, np.asarray([casts.get(os.path.realpath(r.path), -1) for r in test_records]))
      logging.info("%s: predictions against the synthetic shortcut's colour cast: %s", workdir, report["shortcut"])
  if jax.process_index() == 0:
    out_dir = os.path.join(workdir, "eval")
    _write_report(out_dir, report, labels, probs, classes, n_bins,
                  uncalibrated=None if temperature == 1.0 else uncalibrated)
    _write_cams(out_dir, model, variables, config, test_records, probs, classes)
    logging.info("%s: test AUC %s, accuracy %.4f, macro F1 %.4f, ECE %.4f (temperature %s) -> %s/metrics.json",
                 workdir, report["auc"], report["accuracy"], report["f1_macro"], report["ece"], temperature, out_dir)
  return {"report": report, "labels": labels, "probs": probs, "groups": groups, "classes": classes,
          "seed": int(config.seed), "bootstrap": int(config.eval.bootstrap_samples), "calibration_bins": n_bins}


def _distillation_record(workdir: str, config, data, kind: str, step: int) -> dict:
  """Whether the evaluated checkpoint was trained with distillation (metrics.json), logged; a warning when a stage-2
  run ships a model that never saw it."""
  if config.stage != "pagkd":
    return {"distillation_on": False, "distillation_warmup_steps": None}
  modality = methods.stage_modality(config.stage)
  steps_per_epoch = class_groups.steps_per_epoch(data.select("train", None), data.classes, modality,
                                                 int(config.data.group_size))
  warmup = experiment.distillation_warmup_steps(config, steps_per_epoch)
  on = experiment.distillation_on(config, step, steps_per_epoch)
  if on:
    logging.info("%s: the %s checkpoint (step %d) was trained with distillation (from update %d on).", workdir, kind,
                 step, warmup + 1)
  elif not (config.distill.use_pro or config.distill.use_den):
    logging.warning("%s: the %s checkpoint (step %d) was trained without distillation: distill.use_pro and "
                    "distill.use_den are both off in this run.", workdir, kind, step)
  else:
    logging.warning("%s: the %s checkpoint (step %d) is from the cross-entropy warm-up (distillation from update %d "
                    "on): this stage-2 model never saw distillation. config.train.select_after_warmup=True restricts "
                    "the best checkpoint to distilled steps.", workdir, kind, step, warmup + 1)
  return {"distillation_on": on, "distillation_warmup_steps": warmup}


def restore_classifier(workdir: str, model, size: int, which: str = "best", mesh=None):
  """(variables, step, kind) of WORKDIR's `which` checkpoint ("best" or "latest"), replicated over `mesh`
  (default: all devices); `checkpointing.restore_model_variables` says which one is taken."""
  mesh = mesh_lib.make_mesh() if mesh is None else mesh
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  abstract = checkpointing.abstract_like(dict(abstract), mesh_lib.replicated(mesh))
  return checkpointing.restore_model_variables(workdir, abstract, which)


def _region_agreement(workdir, config, data, model, variables, test_records, which) -> dict:
  """Synthetic data: region labels of the evaluated model on its test images, and for a stage-2 run those of its
  NBI teacher (best checkpoint) on the NBI test images, against the true lesion discs (region_agreement.py)."""
  modality = methods.stage_modality(config.stage)
  result = {"model": {"modality": modality,
                      **region_agreement.evaluate_region_agreement(model, variables, test_records, config)}}
  if config.stage == "pagkd":
    teacher_dir = config.teacher.workdir or os.path.join(workdir, "teacher")
    nbi_test = data.select("test", "nbi")
    if os.path.isdir(teacher_dir) and nbi_test:
      teacher, _, _ = restore_classifier(teacher_dir, model, config.data.image_size, "best")
      result["teacher"] = {"modality": "nbi", "workdir": teacher_dir,
                           **region_agreement.evaluate_region_agreement(model, teacher, nbi_test, config)}
    else:
      logging.warning("%s: no teacher in %s, or no NBI test image: teacher region agreement left out.", workdir,
                      teacher_dir)
  for who, entry in result.items():
    logging.info("%s: %s region labels against the true lesions: IoU %s, disc recall %s, false lesion %s; CAM "
                 "maximum in the disc in %s of the images; disc recall without PAR %s, of a CAM equal to the disc "
                 "after PAR %s", workdir, who, entry["lesion_iou"], entry["disc_recall"],
                 entry["false_lesion_fraction"], entry["cam_peak_in_disc"], entry["without_par"]["disc_recall"],
                 entry["disc_through_par"]["disc_recall"])
  return result


def _write_cams(out_dir, model, variables, config, records, probs, classes) -> None:
  n = min(config.eval.num_cam_images, len(records))
  if n == 0:
    return
  picks = np.linspace(0, len(records) - 1, n).round().astype(int)
  preds = probs[picks].argmax(-1)
  titles = [f"true: {classes[records[i].label]} / pred: {classes[p]} ({probs[i, p]:.2f})"
            for i, p in zip(picks, preds)]
  write_cam_overlays(os.path.join(out_dir, "cams"), model, variables, config, [records[i] for i in picks], preds,
                     titles, batch_size=n)


def write_cam_overlays(out_dir, model, variables, config, records, classes, titles, names=None,
                       batch_size: int | None = None) -> list:
  """Each record's image (resized to the model input) beside its CAM for `classes[i]` (an index per record), as
  `out_dir/cam_000.png`, ... or `names`; computed in padded batches of `batch_size` (default
  `config.data.eval_batch_size`) so any number of images compiles once. Returns the paths written."""
  size = config.data.image_size
  batch_size = batch_size or int(config.data.eval_batch_size)
  cam_fn = inference.make_cam_fn(model, config.data.normalization)
  host_variables = jax.device_get(variables)
  classes = np.asarray(classes, np.int32)
  names = list(names) if names is not None else [f"cam_{i:03d}.png" for i in range(len(records))]
  paths = []
  for start in range(0, len(records), batch_size):
    chunk = records[start:start + batch_size]
    images = np.zeros((batch_size, size, size, 3), np.uint8)
    images[:len(chunk)] = [augment.preprocess_eval(image_io.read_image(r), size) for r in chunk]
    chunk_classes = np.zeros((batch_size,), np.int32)
    chunk_classes[:len(chunk)] = classes[start:start + len(chunk)]
    cams = np.asarray(cam_fn(host_variables, jnp.asarray(images), jnp.asarray(chunk_classes)))
    paths += figures.save_cam_overlays(images[:len(chunk)], cams[:len(chunk)], out_dir,
                                       titles[start:start + len(chunk)], names=names[start:start + len(chunk)])
  return paths


def evaluate(workdirs: list[str], out: str | None = None, which: str = "best", overrides: dict | None = None) -> dict:
  """Evaluates each workdir; with several, also writes a pooled report to `out` (default:
  FIRST_WORKDIR/eval_pooled). Returns the pooled report (or the single one)."""
  results = [evaluate_workdir(w, which, overrides) for w in workdirs]
  if len(results) == 1:
    return results[0]["report"]
  classes = results[0]["classes"]
  for w, r in zip(workdirs, results):
    if tuple(r["classes"]) != tuple(classes):
      raise ValueError(f"Cannot pool {w}: its classes {list(r['classes'])} differ from {list(classes)} of "
                       f"{workdirs[0]}.")
  labels = np.concatenate([r["labels"] for r in results])
  probs = np.concatenate([r["probs"] for r in results])
  groups = np.concatenate([np.char.add(f"{i}:", r["groups"].astype(str)) for i, r in enumerate(results)])
  pooled = metrics_lib.classification_report(labels, probs, classes, groups=groups,
                                             n_bootstrap=results[0]["bootstrap"], seed=results[0]["seed"])
  pooled["per_fold"] = [r["report"] for r in results]
  pooled["fold_summary"] = metrics_lib.per_fold_summary([r["report"] for r in results])
  pooled["workdirs"] = [os.path.abspath(w) for w in workdirs]
  n_bins = results[0]["calibration_bins"]
  pooled["ece"] = calibration.expected_calibration_error(labels, probs, n_bins)
  out_dir = os.path.abspath(out) if out else os.path.join(os.path.abspath(workdirs[0]), "eval_pooled")
  if jax.process_index() == 0:
    _write_report(out_dir, pooled, labels, probs, classes, n_bins)
    logging.info("Pooled %d workdirs: test AUC %s -> %s/metrics.json", len(workdirs), pooled["auc"], out_dir)
  return pooled
