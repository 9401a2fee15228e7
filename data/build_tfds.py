"""Builds one of the TFDS datasets of this folder without the `tfds` command line tool.

  python data/build_tfds.py pagkd_synthetic --data_dir ~/tensorflow_datasets [--config demo]
  python data/build_tfds.py piccolo --manual_dir /data/piccolo --data_dir ~/tensorflow_datasets

Prints the prepared dataset folder (the one holding dataset_info.json): give it to the training
config as `--config.data.tfds_dir=...`. (`tfds build data/<name> ...` does the same, but the
tensorflow-datasets 4.9 command line tool also needs apache-beam installed: tensorflow/datasets
issue #5463.) Needs the `tfds` extra: `pip install -e .[tfds]`.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import sys
from typing import Sequence

DATA_DIR = pathlib.Path(__file__).resolve().parent
DATASETS = ("pagkd_synthetic", "piccolo", "polypset")


def builder_class(name: str):
  """The `Builder` class of `data/<name>/<name>_dataset_builder.py`.

  The module is imported as a top-level module (`<name>_dataset_builder`): for a dotted module
  name tensorflow-datasets 4.9.10 imports `importlib_resources`, which it does not install on
  Python >= 3.9 (tensorflow/datasets issue #11212).
  """
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
  for folder in (DATA_DIR, DATA_DIR / name):  # endoscopy_builder.py, then the builder.
    if str(folder) not in sys.path:
      sys.path.insert(0, str(folder))
  return importlib.import_module(f"{name}_dataset_builder").Builder


def build(name: str, *, data_dir: str, manual_dir: str | None = None,
          config: str | object | None = None) -> pathlib.Path:
  """Downloads nothing; prepares dataset `name` under `data_dir`; returns its versioned folder.

  `config` is a config name of the builder or a BuilderConfig instance (None: the default).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  cls = builder_class(name)
  builder = cls(data_dir=data_dir, config=config) if config is not None else cls(data_dir=data_dir)
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
  builder.download_and_prepare(download_config=download_config)
  return pathlib.Path(builder.data_dir)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("dataset", choices=DATASETS)
  parser.add_argument("--data_dir", required=True, help="TFDS data folder to write into")
  parser.add_argument("--manual_dir", default=None, help="folder with the extracted images")
  parser.add_argument("--config", default=None, help="builder config name")
  args = parser.parse_args(argv)
  print(build(args.dataset, data_dir=args.data_dir, manual_dir=args.manual_dir,
              config=args.config))


if __name__ == "__main__":
  main()
