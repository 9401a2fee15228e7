"""Compile time of the update functions: `jax.jit(update, shardings...).lower(...)` and `.compile()` of the WLI
baseline step, the teacher forward pass and the PaGKD step, built as the trainer builds them
(training_steps.py), with the persistent compilation cache off so every figure is a real compilation.

  python benchmarks/compile_time.py                                   # resnet50, 224 and 448, float32 and bf16
  python benchmarks/compile_time.py --image_sizes=224 --dtypes=float32 --steps=baseline,pagkd
"""


from absl import app, flags

import result_file
import training_steps

_MODEL = flags.DEFINE_enum("model", "resnet50", ["resnet50", "resnet18", "tiny"], "Backbone of both networks.")
_IMAGE_SIZES = flags.DEFINE_list("image_sizes", ["224", "448"], "Image sides.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes (model.dtype).")
_STEPS = flags.DEFINE_list("steps", list(training_steps.STEPS), f"Steps, from {list(training_steps.STEPS)}.")
_VARIANTS = flags.DEFINE_list("variants", ["paper", "release"], "distill.variant values of the PaGKD step.")
_GROUP_SIZE = flags.DEFINE_integer("group_size", 8, "N_c: images per class and modality per step.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 3, "C.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/compile_time.json", "JSON output path.")


def main(argv) -> None:
  del argv
  training_steps.disable_persistent_cache()
  rows = []
  for size in (int(s) for s in _IMAGE_SIZES.value):
    for dtype in _DTYPES.value:
      for name in _STEPS.value:
        for variant in (_VARIANTS.value if name == "pagkd" else ["-"]):
          config = training_steps.make_config(model=_MODEL.value, image_size=size, dtype=dtype,
                                              group_size=_GROUP_SIZE.value, num_classes=_NUM_CLASSES.value,
                                              variant="paper" if variant == "-" else variant)
          _, info = training_steps.compile_step(training_steps.build_step(name, config))
          rows.append({"step": name, "variant": variant, "image_size": size, "dtype": dtype, **info})
          print(f"  {size}px {dtype} {name} {variant}: lower {info['lower_s']:.1f} s, compile "
                f"{info['compile_s']:.1f} s", flush=True)

  machine = training_steps.machine_info()
  print(f"\nCompile time: {_MODEL.value}, {_NUM_CLASSES.value} classes x groups of {_GROUP_SIZE.value}; "
        f"{machine['device_kind']} ({machine['backend']}), jax {machine['jax']}; persistent cache off")
  print(f"{'size':>5} {'dtype':>9} {'step':>16} {'variant':>8} {'lower s':>8} {'compile s':>10} {'temp MB':>8}")
  for r in rows:
    temp = "-" if r["temp_size_in_bytes"] is None else f"{r['temp_size_in_bytes'] / 2**20:.0f}"
    print(f"{r['image_size']:>5} {r['dtype']:>9} {r['step']:>16} {r['variant']:>8} {r['lower_s']:>8.1f} "
          f"{r['compile_s']:>10.1f} {temp:>8}")

  result = {"benchmark": "compile_time", "model": _MODEL.value, "num_classes": _NUM_CLASSES.value,
            "group_size": _GROUP_SIZE.value, "persistent_cache": False, "rows": rows, "machine": machine}
  result_file.write(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)
