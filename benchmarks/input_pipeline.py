"""Throughput of the class-group training pipeline (decode + augment) with 0, 1, 2, ... workers.

By default it writes a temporary folder of 3 classes x 40 JPEGs (256 x 256) per modality; with
`--manifest` it reads real data instead. Prints a table and writes JSON with machine info:

  python benchmarks/input_pipeline.py --image_size=224 --steps=20 --workers=0,1,2
"""

import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import grain
import numpy as np
import PIL
from absl import app, flags
from PIL import Image

from pagkd_jax import base_config
from pagkd_jax.data import augment, class_groups, image_io, manifest

_MANIFEST = flags.DEFINE_string("manifest", "", "CSV manifest of real data (default: temp JPEGs).")
_CLASSES = flags.DEFINE_list("classes", list(base_config.get_config().data.classes),
                             "Class names, in label order.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Output side length.")
_GROUP_SIZE = flags.DEFINE_integer("group_size", 8, "Images per class and modality per step.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per worker setting.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after the first batch.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "Worker counts to try.")
_BUFFER = flags.DEFINE_integer("worker_buffer_size", 2, "Prefetched batches per worker.")
_SOURCE_SIZE = flags.DEFINE_integer("source_size", 256, "Side of the temporary JPEGs.")
_PER_CLASS = flags.DEFINE_integer("images_per_class", 40, "Temporary JPEGs per class/modality.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/input_pipeline.json", "JSON output path.")


def _write_jpegs(root: pathlib.Path, classes, per_class: int, side: int) -> None:
  """Smooth random colour fields with noise, roughly the JPEG size of endoscopy frames."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:side, 0:side] / side
  for modality in ("wli", "nbi"):
    for name in classes:
      folder = root / modality / name
      folder.mkdir(parents=True)
      for i in range(per_class):
        phase = rng.uniform(0, 2 * np.pi, 3)
        field = 127 + 100 * np.sin(6 * xx[..., None] + 4 * yy[..., None] + phase)
        field += rng.normal(0, 12, field.shape)
        pixels = np.clip(field, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)


def _per_image_costs(records, size: int, aug_config, count: int = 40) -> dict[str, float]:
  """Single-thread milliseconds per image for reading + decoding and for augmenting."""
  rng = np.random.default_rng(0)
  chosen = [records[i] for i in rng.choice(len(records), min(count, len(records)), replace=False)]
  start = time.perf_counter()
  images = [image_io.read_image(r) for r in chosen]
  decoded = time.perf_counter()
  for image in images:
    augment.augment_train(image, size, aug_config, rng)
  augmented = time.perf_counter()
  return {"decode_ms": 1e3 * (decoded - start) / len(chosen),
          "augment_ms": 1e3 * (augmented - decoded) / len(chosen)}


def _run(records, classes, num_workers: int, aug_config) -> dict[str, float]:
  images_per_step = 2 * len(classes) * _GROUP_SIZE.value
  start = time.perf_counter()
  it = class_groups.make_train_iterator(
      records, classes=classes, modalities=("wli", "nbi"), group_size=_GROUP_SIZE.value,
      image_size=_IMAGE_SIZE.value, aug_config=aug_config, seed=0, num_workers=num_workers,
      worker_buffer_size=_BUFFER.value)
  try:
    next(it)
    first_batch_s = time.perf_counter() - start
    for _ in range(_WARMUP.value):
      next(it)
    timed = time.perf_counter()
    for _ in range(_STEPS.value):
      next(it)
    elapsed = time.perf_counter() - timed
  finally:
    it.close()
  return {"num_workers": num_workers, "first_batch_s": first_batch_s,
          "steps_per_s": _STEPS.value / elapsed,
          "images_per_s": _STEPS.value * images_per_step / elapsed}


def main(argv) -> None:
  del argv
  classes = tuple(_CLASSES.value)
  aug_config = base_config.get_config().data.augment
  with tempfile.TemporaryDirectory() as tmp:
    if _MANIFEST.value:
      records, source = manifest.read_manifest(_MANIFEST.value, classes), _MANIFEST.value
    else:
      root = pathlib.Path(tmp)
      _write_jpegs(root, classes, _PER_CLASS.value, _SOURCE_SIZE.value)
      records = manifest.records_from_folder(root, classes)
      source = (f"temporary JPEGs: {len(classes)} classes x {_PER_CLASS.value} per modality, "
                f"{_SOURCE_SIZE.value}x{_SOURCE_SIZE.value}")
    costs = _per_image_costs(records, _IMAGE_SIZE.value, aug_config)
    runs = [_run(records, classes, int(w), aug_config) for w in _WORKERS.value]

  print(f"\nInput pipeline: {source}; image_size {_IMAGE_SIZE.value}, group size "
        f"{_GROUP_SIZE.value}, {2 * len(classes) * _GROUP_SIZE.value} images/step; "
        f"{os.cpu_count()} CPUs")
  print(f"single thread: decode {costs['decode_ms']:.2f} ms/image, augment "
        f"{costs['augment_ms']:.2f} ms/image")
  print(f"{'workers':>8} {'first batch s':>14} {'steps/s':>9} {'images/s':>10}")
  for run in runs:
    print(f"{run['num_workers']:>8d} {run['first_batch_s']:>14.2f} {run['steps_per_s']:>9.2f} "
          f"{run['images_per_s']:>10.1f}")

  result = {
      "benchmark": "input_pipeline",
      "source": source,
      "image_size": _IMAGE_SIZE.value,
      "group_size": _GROUP_SIZE.value,
      "classes": list(classes),
      "steps": _STEPS.value,
      "warmup": _WARMUP.value,
      "worker_buffer_size": _BUFFER.value,
      "augment": aug_config.to_dict(),
      "single_thread": costs,
      "runs": runs,
      "machine": {
          "cpu_count": os.cpu_count(),
          "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                           else None,
          "platform": platform.platform(),
          "processor": platform.processor(),
          "python": sys.version.split()[0],
          "numpy": np.__version__,
          "pillow": PIL.__version__,
          "grain": getattr(grain, "__version__", "unknown"),
      },
  }
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2))
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
