"""Throughput of the class-group training pipeline (decode + augment) with 0, 1, 2, ... workers, against the
images/s the training steps consume at the same image size and group size.

By default it writes a temporary folder of 3 classes x 40 JPEGs (256 x 256) per modality; with
`--manifest` it reads real data instead. The consumers are the PaGKD and WLI-baseline steps built as the trainer
builds them (training_steps.py; `--consumer_model=none` skips them); the pipeline and the steps are timed one
after the other, not concurrently, so on a CPU-only machine the two figures compete for the same cores in real
training. Prints a table and writes JSON with machine info:

  python benchmarks/input_pipeline.py --image_size=224 --steps=20 --workers=0,1,2
  python benchmarks/input_pipeline.py --image_size=448 --workers=0,4,8 --consumer_dtype=bfloat16
"""

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

import result_file

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
_CONSUMER_MODEL = flags.DEFINE_enum("consumer_model", "resnet50", ["resnet50", "resnet18", "tiny", "none"],
                                    "Backbone of the consuming training steps ('none': pipeline only).")
_CONSUMER_DTYPE = flags.DEFINE_enum("consumer_dtype", "float32", ["float32", "bfloat16"], "Their compute dtype.")
_CONSUMER_STEPS = flags.DEFINE_list("consumer_steps", ["pagkd", "baseline"], "Steps whose consumption is measured.")
_CONSUMER_REPEATS = flags.DEFINE_integer("consumer_repeats", 3, "Timed calls per step (median reported).")


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


def _consumers(num_classes: int) -> list[dict]:
  """Images/s each training step consumes at this benchmark's image size and group size."""
  if _CONSUMER_MODEL.value == "none":
    return []
  import training_steps  # JAX is only imported when the steps are measured.
  config = training_steps.make_config(model=_CONSUMER_MODEL.value, image_size=_IMAGE_SIZE.value,
                                      dtype=_CONSUMER_DTYPE.value, group_size=_GROUP_SIZE.value,
                                      num_classes=num_classes)
  out = []
  for name in _CONSUMER_STEPS.value:
    step, info = training_steps.compile_step(training_steps.build_step(name, config))
    timing = training_steps.time_step(step, _CONSUMER_REPEATS.value)
    out.append({"step": name, "model": _CONSUMER_MODEL.value, "dtype": _CONSUMER_DTYPE.value,
                "compile_s": info["compile_s"], **timing})
    del step
  return out


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
  consumers = _consumers(len(classes))

  print(f"\nInput pipeline: {source}; image_size {_IMAGE_SIZE.value}, group size "
        f"{_GROUP_SIZE.value}, {2 * len(classes) * _GROUP_SIZE.value} images/step; "
        f"{os.cpu_count()} CPUs")
  print(f"single thread: decode {costs['decode_ms']:.2f} ms/image, augment "
        f"{costs['augment_ms']:.2f} ms/image")
  print(f"{'workers':>8} {'first batch s':>14} {'steps/s':>9} {'images/s':>10}")
  for run in runs:
    print(f"{run['num_workers']:>8d} {run['first_batch_s']:>14.2f} {run['steps_per_s']:>9.2f} "
          f"{run['images_per_s']:>10.1f}")
  if consumers:
    import training_steps
    device = training_steps.machine_info()["device_kind"]
    best = max(runs, key=lambda r: r["images_per_s"])
    print(f"\nConsumption of the training steps ({_CONSUMER_MODEL.value}, {_CONSUMER_DTYPE.value}, {device}) "
          f"against the best loader ({best['num_workers']} workers, {best['images_per_s']:.1f} images/s):")
    print(f"{'step':>9} {'images/step':>12} {'ms/step':>9} {'images/s':>10} {'loader / step':>14}")
    for c in consumers:
      c["loader_over_step"] = best["images_per_s"] / c["images_per_s"]
      print(f"{c['step']:>9} {c['images_per_step']:>12d} {1e3 * c['median_s']:>9.1f} {c['images_per_s']:>10.1f} "
            f"{c['loader_over_step']:>14.2f}")
    print("loader / step > 1: the pipeline delivers images faster than the step trains on them.")

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
      "consumers": consumers,
      "consumer_machine": __import__("training_steps").machine_info() if consumers else None,
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
  result_file.write(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)
