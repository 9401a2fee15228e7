"""What a training run and an evaluation share: the data split and the model, both from the config."""

import dataclasses
import os

import jax
from absl import logging

from pagkd_jax import methods
from pagkd_jax.data import manifest as manifest_lib
from pagkd_jax.data import splits as splits_lib
from pagkd_jax.data import validate
from pagkd_jax.data.records import ImageRecord
from pagkd_jax.models import resnet


@dataclasses.dataclass(frozen=True)
class SplitData:
  """All records with their split ("train" / "val" / "test")."""

  classes: tuple[str, ...]
  records: tuple[ImageRecord, ...]
  splits: tuple[str, ...]

  def select(self, split: str, modality: str | None = None) -> list[ImageRecord]:
    return [r for r, s in zip(self.records, self.splits)
            if s == split and (modality is None or r.modality == modality)]


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def load_split_data(config, workdir: str | None = None, *, skipped_files_of: str | None = None) -> SplitData:
  """Reads the dataset named by `config.data` (generating the synthetic set first when enabled) and splits it by
  patient/lesion.

  Given a `workdir` (training), every image is checked first (`validate.check_records`): on errors this raises
  `validate.DataCheckError` listing all of them, unless every error is a bad file and
  `config.data.skip_bad_files` is set; then the bad files are dropped (the other images keep their split), listed
  in WORKDIR/skipped_files.csv, and WORKDIR/splits.csv is written (with the training labels the run uses:
  permuted with `config.data.shuffle_train_labels`). Without a workdir (evaluation) nothing is
  decoded; `skipped_files_of` names a training workdir whose skipped_files.csv lists records to leave out.
  """
  data = config.data
  classes = tuple(data.classes)
  manifest_path = None
  if data.synthetic.enabled:
    from pagkd_jax.data import synthetic
    if jax.process_index() == 0:
      manifest_path = synthetic.ensure_generated(data)
    _sync("synthetic_data")
    manifest_path = str(synthetic.ensure_generated(data) if jax.process_index() else manifest_path)
  if workdir is not None:
    records, splits = _checked_records(config, workdir, manifest_path)
  else:
    if manifest_path is not None:
      records = manifest_lib.read_manifest(manifest_path, classes)
    else:
      records = manifest_lib.load_records(data)
    splits = splits_lib.split_records(records, data)
    if skipped_files_of is not None:
      skipped = validate.read_skipped_files(os.path.join(skipped_files_of, validate.SKIPPED_FILES_NAME))
      kept = [(r, s) for r, s in zip(records, splits) if (r.path, r.record_index) not in skipped]
      records, splits = [r for r, _ in kept], [s for _, s in kept]
  if data.get("shuffle_train_labels", False):  # Negative control; validation and test labels stay true.
    records = splits_lib.shuffle_train_labels(records, splits, config.seed)
    logging.warning("data.shuffle_train_labels: the training labels are permuted (seed %d).", config.seed)
  result = SplitData(classes, tuple(records), tuple(splits))
  for split in splits_lib.SPLITS:
    counts = {m: len(result.select(split, m)) for m in ("wli", "nbi")}
    logging.info("split %s: %d WLI, %d NBI images", split, counts["wli"], counts["nbi"])
  if workdir is not None and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    manifest_lib.write_records_csv(records, splits, os.path.join(workdir, "splits.csv"), classes)
  return result


def _checked_records(config, workdir: str, manifest_path: str | None) -> tuple[list[ImageRecord], list[str]]:
  """The records and splits of a training run after `validate.check_records` (see `load_split_data`)."""
  data = config.data
  classes = tuple(data.classes)
  required = methods.get(config.stage).data_modalities
  records, splits, report = validate.check_data(data, manifest_path=manifest_path, required_modalities=required)
  for warning in report.warnings:
    logging.warning("data check: %s", warning)
  skip = bool(data.get("skip_bad_files", False))
  if report.errors and (report.unskippable or not skip):
    raise validate.DataCheckError(report)
  skipped_path = os.path.join(workdir, validate.SKIPPED_FILES_NAME)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    if report.bad_files:
      validate.write_skipped_files(skipped_path, report, classes)
    elif os.path.exists(skipped_path):
      os.remove(skipped_path)  # Left by an earlier run whose bad files have since been fixed.
  if report.bad_files:
    logging.warning("data check: skipping %d bad file(s) (config.data.skip_bad_files), listed in %s:\n  %s",
                    len(report.bad_files), skipped_path, "\n  ".join(str(f) for f in report.bad_files))
    records, splits = validate.drop_bad_files(records, splits, report)
  logging.info("data check: %s", report.summary())
  return records, splits


def distillation_warmup_steps(config, steps_per_epoch: int) -> int:
  """Updates of cross-entropy only before stage 2 adds L_pro and L_den (distill.warmup_epochs)."""
  return int(round(config.distill.warmup_epochs * steps_per_epoch))


def distillation_on(config, step: int, steps_per_epoch: int) -> bool:
  """Whether the model after `step` updates (a checkpoint of step `step`) was trained with distillation: a stage-2
  run with L_pro or L_den on, past its warm-up (update number s, counted from 1, distils when s - 1 >= warm-up)."""
  d = config.distill
  return (config.stage == "pagkd" and bool(d.use_pro or d.use_den)
          and step > distillation_warmup_steps(config, steps_per_epoch))


def build_model(config) -> resnet.ResNet:
  """The classifier of `config`: its architecture, and the Linear before the head that its stage's method adds
  (`methods.embedding_dim`)."""
  return resnet.create_resnet(config.model.name, len(config.data.classes), config.model.dtype,
                              config.model.conv_impl, embed_dim=methods.embedding_dim(config))
