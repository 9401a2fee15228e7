"""The TFDS builder shared by the endoscopy datasets (`pagkd_synthetic`, `piccolo`, `polypset`).

Each dataset is one `train` split of images with their metadata; the project does its own
lesion-grouped k-fold splits on top (`pagkd_jax.data.splits`). Images are stored with their
original encoding (the file bytes, JPEG or PNG, are copied, never re-encoded). Records are written
as ArrayRecord, which `pagkd_jax.data.tfds_source` reads without TensorFlow.

Features:
  image       encoded image bytes (original encoding), RGB.
  modality    "wli" or "nbi".
  label       ClassLabel with the dataset's class names.
  lesion_id   lesion identifier (unique across modalities unless the images are a true pair).
  patient_id  patient identifier, "" when unknown.
  pair_id     shared by a WLI and an NBI image of the same lesion view, "" when unpaired.
  filename    the image's path relative to the source folder (for tracing).

Building needs the `tfds` extra (`pip install -e .[tfds]`: tensorflow-datasets + tensorflow-cpu).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Iterator, Sequence

import tensorflow_datasets as tfds

from pagkd_jax.data import manifest as manifest_lib
from pagkd_jax.data.records import ImageRecord

MANIFEST_NAME = "manifest.csv"
SPLIT = "train"

LAYOUT_INSTRUCTIONS = """\
Lay the extracted images out in the manual folder (`--manual_dir DIR`) in one of two ways:

1. A manifest `DIR/manifest.csv` with the columns
     path,modality,label,lesion_id[,patient_id,pair_id]
   `path` relative to DIR (or absolute), `modality` wli or nbi, `label` a class name (or its
   index), `lesion_id` the lesion (images of one lesion always land in the same fold),
   `patient_id` / `pair_id` optional. Preferred: it keeps lesion and patient identities.
2. Class folders `DIR/<modality>/<class>/*.{jpg,jpeg,png,tif,tiff}` (modality wli or nbi). Files
   named `<lesion>__<anything>.<ext>` share the lesion `<lesion>`; any other file is its own
   lesion.
"""


def read_source_folder(directory: str | os.PathLike[str],
                       classes: Sequence[str]) -> list[ImageRecord]:
  """Records of `directory/manifest.csv` if it exists, else of `directory/<modality>/<class>/`.

  Raises:
    FileNotFoundError: `directory` does not exist.
    pagkd_jax.data.manifest.ManifestError: listing every bad row, folder or file.
  """
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"dataset folder not found: {directory}")
  manifest = directory / MANIFEST_NAME
  if manifest.is_file():
    return manifest_lib.read_manifest(manifest, classes)
  return manifest_lib.records_from_folder(directory, classes)


def _relative_name(path: str, directory: pathlib.Path) -> str:
  try:
    return pathlib.Path(path).resolve().relative_to(directory.resolve()).as_posix()
  except ValueError:  # Absolute path outside the folder.
    return pathlib.Path(path).as_posix()


def generate_examples(directory: str | os.PathLike[str], classes: Sequence[str]
                      ) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields (key, example) for every image of a source folder; key = path relative to it."""
  directory = pathlib.Path(directory)
  for record in read_source_folder(directory, classes):
    name = _relative_name(record.path, directory)
    yield name, {
        "image": pathlib.Path(record.path),  # A path: TFDS copies the bytes as they are.
        "modality": record.modality,
        "label": int(record.label),
        "lesion_id": record.lesion_id,
        "patient_id": record.patient_id,
        "pair_id": record.pair_id,
        "filename": name,
    }


class EndoscopyBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base builder: subclasses set CLASSES, HOMEPAGE and how to find the source folder."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version: one `train` split (folds are made by the project)."}
  CLASSES: tuple[str, ...] = ()
  HOMEPAGE = ""

  def __init__(self, *, file_format: str | None = None, **kwargs: Any):
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def classes(self) -> tuple[str, ...]:
    """Class names in label order."""
    return tuple(self.CLASSES)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "modality": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=list(self.classes())),
            "lesion_id": tfds.features.Text(),
            "patient_id": tfds.features.Text(),
            "pair_id": tfds.features.Text(),
            "filename": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage=self.HOMEPAGE or None,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    return {SPLIT: self._generate_examples(dl_manager.manual_dir)}

  def _generate_examples(self, directory: str | os.PathLike[str]
                         ) -> Iterator[tuple[str, dict[str, Any]]]:
    yield from generate_examples(directory, self.classes())
