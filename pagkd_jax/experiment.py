"""What a training run and an evaluation share: the data split and the model, both from the config."""

import dataclasses
import os

import jax
from absl import logging

from pagkd_jax.data import manifest as manifest_lib
from pagkd_jax.data import splits as splits_lib
from pagkd_jax.data.records import ImageRecord
from pagkd_jax.models import resnet


def stage_modality(stage: str) -> str:
  """The modality a stage trains and is evaluated on: NBI for the teacher, WLI otherwise."""
  if stage == "teacher":
    return "nbi"
  if stage in ("baseline", "pagkd"):
    return "wli"
  raise ValueError(f"Unknown config.stage {stage!r}; expected 'teacher', 'baseline' or 'pagkd'.")


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


def load_split_data(config, workdir: str | None = None) -> SplitData:
  """Reads the dataset named by `config.data` (generating the synthetic set first when enabled), splits it by
  patient/lesion and, given a workdir, writes WORKDIR/splits.csv."""
  data = config.data
  classes = tuple(data.classes)
  if data.synthetic.enabled:
    from pagkd_jax.data import synthetic
    if jax.process_index() == 0:
      manifest_path = synthetic.ensure_generated(data)
    _sync("synthetic_data")
    manifest_path = synthetic.ensure_generated(data) if jax.process_index() else manifest_path
    records = manifest_lib.read_manifest(str(manifest_path), classes)
  else:
    records = manifest_lib.load_records(data)
  splits = splits_lib.assign_splits(records, num_folds=data.num_folds, fold=data.fold,
                                    val_fraction=data.val_fraction, seed=data.split_seed)
  result = SplitData(classes, tuple(records), tuple(splits))
  for split in splits_lib.SPLITS:
    counts = {m: len(result.select(split, m)) for m in ("wli", "nbi")}
    logging.info("split %s: %d WLI, %d NBI images", split, counts["wli"], counts["nbi"])
  if workdir is not None and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    manifest_lib.write_records_csv(records, splits, os.path.join(workdir, "splits.csv"), classes)
  return result


def build_model(config) -> resnet.ResNet:
  return resnet.create_resnet(config.model.name, len(config.data.classes), config.model.dtype)
