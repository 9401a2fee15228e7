"""The project's synthetic WLI/NBI endoscopy images (`pagkd_jax.data.synthetic`) as a TFDS dataset.

  tfds build data/pagkd_synthetic --data_dir ~/tensorflow_datasets             # generates
  tfds build data/pagkd_synthetic --manual_dir data/synthetic_endoscopy/...   # an existing folder

Without a manual folder the images are generated (deterministically, from the config's
parameters) into a temporary folder that is removed afterwards. With `--manual_dir` pointing at a
folder written by `pagkd_jax.data.synthetic.generate` (it has `synthetic.json` and
`manifest.csv`), that folder is read instead; its own `synthetic.json` then says how it was made.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile
from typing import Any, Iterator

import tensorflow_datasets as tfds

import endoscopy_builder  # data/ is on sys.path under `tfds build data/pagkd_synthetic`.
from pagkd_jax.data import synthetic


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  """Generation parameters, as in `pagkd_jax.data.synthetic.generate`."""

  classes: tuple[str, ...] = synthetic.DEFAULT_CLASSES
  image_size: int = 128
  lesions_per_class: int = 40
  images_per_lesion: int = 3
  paired_fraction: float = 0.0
  seed: int = 0


class Builder(endoscopy_builder.EndoscopyBuilder):
  """Synthetic WLI/NBI endoscopy lesions whose class is carried by a fine surface pattern."""

  BUILDER_CONFIGS = [
      SyntheticConfig(name="default", description="128 px, 40 lesions per class and modality, "
                      "3 views per lesion (720 images), no pairs."),
      SyntheticConfig(name="paired", paired_fraction=0.5,
                      description="As default, with half of the lesions seen in both "
                      "modalities (shared lesion_id and pair_id)."),
      SyntheticConfig(name="demo", image_size=96, lesions_per_class=60,
                      description="The images of configs/synthetic.py: 96 px, 60 lesions per "
                      "class and modality, 3 views (1080 images)."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Optional. Without a manual folder the images are generated. To package an existing synthetic
folder instead, pass `--manual_dir` pointing at a folder written by
`python -m pagkd_jax.data.synthetic --out DIR` (it holds synthetic.json and manifest.csv).
"""

  def classes(self) -> tuple[str, ...]:
    return tuple(self.builder_config.classes)

  def _existing_folder(self, dl_manager: tfds.download.DownloadManager) -> pathlib.Path | None:
    """The manual folder when it holds a synthetic dataset, else None (then we generate)."""
    try:
      folder = pathlib.Path(dl_manager.manual_dir)
    except AssertionError:  # No manual folder given, or it is empty.
      return None
    params_path = folder / synthetic.PARAMS_NAME
    if not (params_path.is_file() and (folder / synthetic.MANIFEST_NAME).is_file()):
      raise FileNotFoundError(f"{folder} is not a synthetic dataset folder: it needs "
                              f"{synthetic.PARAMS_NAME} and {synthetic.MANIFEST_NAME}")
    found = tuple(json.loads(params_path.read_text())["classes"])
    if found != self.classes():
      raise ValueError(f"{params_path}: classes {found} differ from the builder config's "
                       f"{self.classes()}")
    return folder

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    return {endoscopy_builder.SPLIT: self._generate_examples(self._existing_folder(dl_manager))}

  def _generate_examples(self, directory: pathlib.Path | None
                         ) -> Iterator[tuple[str, dict[str, Any]]]:
    if directory is not None:
      yield from endoscopy_builder.generate_examples(directory, self.classes())
      return
    config = self.builder_config
    with tempfile.TemporaryDirectory(prefix="pagkd_synthetic_") as tmp:
      synthetic.generate(tmp, classes=config.classes, image_size=config.image_size,
                         lesions_per_class=config.lesions_per_class,
                         images_per_lesion=config.images_per_lesion,
                         paired_fraction=config.paired_fraction, seed=config.seed)
      yield from endoscopy_builder.generate_examples(tmp, self.classes())
