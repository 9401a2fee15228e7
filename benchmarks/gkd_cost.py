"""Cost of GKD-Pro, GKD-Den and CAM + PAR against the group size N_c: time and compiled memory.

Each component is jitted alone on random inputs shaped as in the PaGKD step: G = C class groups of N_c images per
modality, layer4 features (h, w, F) (F = 2048 and h = w = 7 for ResNet-50 at 224 px; 14 at 448 px):

* pro: the two 1x1 embeddings, LR-QFormer (or the release's cross-attention) on both modalities, L_pro;
* den: the two 1x1 embeddings, SRCA in both directions, L_den (random lesion / background / ambiguous maps);
* cam_par: CAM of the true class, pixel-adaptive refinement on the images at half resolution, dual threshold,
  for the C N_c WLI and C N_c NBI images (no gradient in training, so forward only).

"fwd" is the loss alone; "fwd+bwd" is `jax.value_and_grad` with respect to the heads' parameters and the student
features (what training differentiates). Memory is `jitted.lower(...).compile().memory_analysis()`:
temp_size_in_bytes (the scratch XLA allocates for the program; None where the backend reports none).

  python benchmarks/gkd_cost.py                                  # N_c = 2..32, paper and release, 7 x 7 x 2048
  python benchmarks/gkd_cost.py --feature_size=14 --image_size=448 --dtype=bfloat16
"""

import math

import jax
import numpy as np
from absl import app, flags

import result_file
import training_steps

_GROUP_SIZES = flags.DEFINE_list("group_sizes", ["2", "4", "8", "16", "32"], "N_c values.")
_VARIANTS = flags.DEFINE_list("variants", ["paper", "release"], "distill.variant values.")
_COMPONENTS = flags.DEFINE_list("components", ["pro", "den", "cam_par"], "Components to time.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 3, "C: class groups per modality.")
_FEATURE_SIZE = flags.DEFINE_integer("feature_size", 7, "h = w of the layer4 maps (7 at 224 px, 14 at 448 px).")
_FEATURES = flags.DEFINE_integer("features", 2048, "F: layer4 channels (2048 for ResNet-50, 512 for ResNet-18).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Image side for cam_par.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the heads.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per setting (median reported).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/gkd_cost.json", "JSON output path.")


def component_config(component: str, variant: str, num_classes: int, group_size: int, dtype: str):
  """The paper config with only `component`'s loss switched on."""
  config = training_steps.make_config(model="resnet50", image_size=_IMAGE_SIZE.value, dtype=dtype,
                                      group_size=group_size, num_classes=num_classes, variant=variant)
  config.distill.use_pro = component in ("pro", "both")
  config.distill.use_den = component in ("den", "both")
  return config


def growth_exponent(group_sizes, values) -> float | None:
  """Least-squares slope of log(value) against log(N_c): ~1 linear growth, ~2 quadratic."""
  pts = [(math.log(n), math.log(v)) for n, v in zip(group_sizes, values) if v and v > 0]
  if len(pts) < 2:
    return None
  x, y = np.asarray(pts).T
  return float(np.polyfit(x, y, 1)[0])


def _mb(b):
  return "-" if b is None else f"{b / 2**20:.1f}"


def main(argv) -> None:
  del argv
  sizes = [int(n) for n in _GROUP_SIZES.value]
  c, dtype = _NUM_CLASSES.value, _DTYPE.value
  rows = []
  for component in _COMPONENTS.value:
    variants = ["-"] if component == "cam_par" else _VARIANTS.value
    for variant in variants:
      for n in sizes:
        config = component_config(component, "paper" if variant == "-" else variant, c, n, dtype)
        inputs = training_steps.random_inputs(c, n, _FEATURE_SIZE.value, _FEATURES.value, _IMAGE_SIZE.value)
        row = {"component": component, "variant": variant, "group_size": n,
               "tokens_per_group": n * _FEATURE_SIZE.value ** 2}
        if component == "cam_par":
          row["fwd"] = training_steps.measure(training_steps.make_region_fn(config), (inputs,), _REPEATS.value)
          row["fwd_bwd"] = None
        else:
          loss, init = training_steps.make_heads_loss(config)
          params = init(inputs)
          row["fwd"] = training_steps.measure(loss, (params, inputs["s_features"], inputs), _REPEATS.value)
          row["fwd_bwd"] = training_steps.measure(jax.value_and_grad(loss, argnums=(0, 1)),
                                                  (params, inputs["s_features"], inputs), _REPEATS.value)
        rows.append(row)
        main_entry = row["fwd_bwd"] or row["fwd"]
        print(f"  {component:8s} {variant:8s} N_c={n:3d}: {main_entry['ms']:9.2f} ms, temp "
              f"{_mb(main_entry['temp_size_in_bytes'])} MB", flush=True)

  growth = []
  for component in _COMPONENTS.value:
    for variant in (["-"] if component == "cam_par" else _VARIANTS.value):
      sel = [r for r in rows if r["component"] == component and r["variant"] == variant]
      key = "fwd" if component == "cam_par" else "fwd_bwd"
      growth.append({"component": component, "variant": variant, "measure": key,
                     "time_exponent": growth_exponent([r["group_size"] for r in sel], [r[key]["ms"] for r in sel]),
                     "temp_exponent": growth_exponent([r["group_size"] for r in sel],
                                                      [r[key]["temp_size_in_bytes"] for r in sel])})

  machine = training_steps.machine_info()
  print(f"\nGKD cost against group size: C = {c} groups, features {_FEATURE_SIZE.value}x{_FEATURE_SIZE.value}x"
        f"{_FEATURES.value}, images {_IMAGE_SIZE.value}px (cam_par), {dtype}; {machine['device_kind']} "
        f"({machine['backend']}), median of {_REPEATS.value}")
  print(f"{'component':>9} {'variant':>8} {'N_c':>4} {'tokens':>7} {'fwd ms':>9} {'fwd+bwd ms':>11} "
        f"{'x prev':>7} {'temp MB':>9} {'x prev':>7} {'peak MB':>8}")
  prev = None
  for r in rows:
    e = r["fwd_bwd"] or r["fwd"]
    same = prev is not None and prev["component"] == r["component"] and prev["variant"] == r["variant"]
    pe = (prev["fwd_bwd"] or prev["fwd"]) if same else None
    t_ratio = f"{e['ms'] / pe['ms']:.2f}" if pe else "-"
    m_ratio = (f"{e['temp_size_in_bytes'] / pe['temp_size_in_bytes']:.2f}"
               if pe and e["temp_size_in_bytes"] and pe["temp_size_in_bytes"] else "-")
    fb = f"{r['fwd_bwd']['ms']:.2f}" if r["fwd_bwd"] else "-"
    print(f"{r['component']:>9} {r['variant']:>8} {r['group_size']:>4} {r['tokens_per_group']:>7} "
          f"{r['fwd']['ms']:>9.2f} {fb:>11} {t_ratio:>7} {_mb(e['temp_size_in_bytes']):>9} {m_ratio:>7} "
          f"{_mb(e['peak_memory_in_bytes']):>8}")
    prev = r
  print("(x prev: ratio to the previous N_c of the fwd+bwd time / temp memory; cam_par: fwd)")
  print(f"\n{'component':>9} {'variant':>8} {'time ~ N_c^a':>13} {'temp ~ N_c^a':>13}")
  for g in growth:
    te = "-" if g["time_exponent"] is None else f"{g['time_exponent']:.2f}"
    me = "-" if g["temp_exponent"] is None else f"{g['temp_exponent']:.2f}"
    print(f"{g['component']:>9} {g['variant']:>8} {te:>13} {me:>13}")

  result = {"benchmark": "gkd_cost", "num_classes": c, "feature_size": _FEATURE_SIZE.value,
            "features": _FEATURES.value, "image_size": _IMAGE_SIZE.value, "dtype": dtype,
            "repeats": _REPEATS.value, "rows": rows, "growth": growth, "machine": machine}
  result_file.write(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)
