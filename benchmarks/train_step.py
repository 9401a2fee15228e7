"""Train-step throughput of the WLI baseline step, the teacher forward pass and the full PaGKD step, and the
distillation overhead = PaGKD step time / (baseline step + teacher forward).

The steps are built as `trainer.run_stage` builds them (training_steps.py): the project's update functions,
jitted over the device mesh with the trainer's shardings, the state donated; random uint8 class groups
(C, K, S, S, 3) per modality; distillation on at every timed step. Times are medians of `--repeats` calls, each
blocked until ready, after one untimed call.

The steps are compiled first, then called in turn (round r runs each step once), so a change of machine load
slows all of them alike. "PaGKD warm-up" is the same PaGKD update during the cross-entropy warm-up (its lax.cond
skips the distillation; the teacher forward pass still runs).

The share of CAM + PAR + GKD-Den + GKD-Pro in the PaGKD step is given three ways:
* by difference: (PaGKD step - baseline step - teacher forward) / PaGKD step;
* against the warm-up step: (PaGKD step - PaGKD warm-up step) / PaGKD step;
* directly: those parts alone (training_steps.make_distillation_fn: CAM + PAR for both modalities, the heads'
  losses, gradient with respect to the heads and the student features) on random features of the step's shape,
  jitted on their own, divided by the PaGKD step time. This misses the backward pass through the student backbone that
  the distillation gradient adds, which the difference includes.

Paper setting: ResNet-50, 3 classes, groups of 8 (24 WLI + 24 NBI images), 224 and 448 px, float32 and bf16;
the goal on a GPU is overhead <= 1.15 and a distillation share under 10 %.

  python benchmarks/train_step.py                                       # the full table (meant for a GPU)
  python benchmarks/train_step.py --image_sizes=224 --dtypes=float32 --repeats=3    # a CPU-sized run
"""

import jax
from absl import app, flags

import result_file
import training_steps

_MODEL = flags.DEFINE_enum("model", "resnet50", ["resnet50", "resnet18", "tiny"], "Backbone of both networks.")
_IMAGE_SIZES = flags.DEFINE_list("image_sizes", ["224", "448"], "Image sides.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes (model.dtype).")
_GROUP_SIZE = flags.DEFINE_integer("group_size", 8, "N_c: images per class and modality per step.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 3, "C.")
_VARIANT = flags.DEFINE_enum("variant", "paper", ["paper", "release"], "distill.variant of the PaGKD step.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per step (median reported).")
_DIRECT = flags.DEFINE_bool("direct", True, "Also time CAM + PAR + GKD-Den + GKD-Pro alone.")
_CACHE = flags.DEFINE_bool("persistent_cache", False, "Allow the persistent XLA cache (off: real compile times).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/train_step.json", "JSON output path.")


def measure_setting(size: int, dtype: str) -> dict:
  config = training_steps.make_config(model=_MODEL.value, image_size=size, dtype=dtype,
                                      group_size=_GROUP_SIZE.value, num_classes=_NUM_CLASSES.value,
                                      variant=_VARIANT.value)
  result = {"image_size": size, "dtype": dtype, "steps": {}}
  steps, infos = {}, {}
  for name in training_steps.STEPS:
    steps[name], infos[name] = training_steps.compile_step(training_steps.build_step(name, config))
    print(f"  {size}px {dtype} {name}: compiled in {infos[name]['compile_s']:.1f} s", flush=True)
  timings = training_steps.time_interleaved(steps, _REPEATS.value)
  for name in steps:
    result["steps"][name] = {**infos[name], **timings[name]}
    print(f"  {size}px {dtype} {name}: {1e3 * timings[name]['median_s']:.1f} ms/step, "
          f"{timings[name]['images_per_s']:.1f} images/s", flush=True)
  del steps
  t = {k: v["median_s"] for k, v in result["steps"].items()}
  result["overhead"] = t["pagkd"] / (t["baseline"] + t["teacher_forward"])
  result["warmup_overhead"] = t["pagkd_warmup"] / (t["baseline"] + t["teacher_forward"])
  result["distill_share_by_difference"] = (t["pagkd"] - t["baseline"] - t["teacher_forward"]) / t["pagkd"]
  result["distill_share_vs_warmup"] = (t["pagkd"] - t["pagkd_warmup"]) / t["pagkd"]
  if _DIRECT.value:
    model = training_steps.experiment.build_model(config)
    _, feats = jax.eval_shape(lambda: model.apply(
        model.init(jax.random.key(0), jax.numpy.zeros((1, size, size, 3)), train=False),
        jax.numpy.zeros((1, size, size, 3)), train=False))
    inputs = training_steps.random_inputs(_NUM_CLASSES.value, _GROUP_SIZE.value, feats.shape[1], feats.shape[3],
                                          size)
    fn, init = training_steps.make_distillation_fn(config)
    direct = training_steps.measure(fn, (init(inputs), inputs), _REPEATS.value)
    result["distill_direct"] = direct
    result["distill_share_direct"] = direct["ms"] / 1e3 / t["pagkd"]
  return result


def main(argv) -> None:
  del argv
  if not _CACHE.value:
    training_steps.disable_persistent_cache()
  settings = []
  for size in (int(s) for s in _IMAGE_SIZES.value):
    for dtype in _DTYPES.value:
      settings.append(measure_setting(size, dtype))

  machine = training_steps.machine_info()
  c, k = _NUM_CLASSES.value, _GROUP_SIZE.value
  print(f"\nTrain step: {_MODEL.value}, {c} classes x groups of {k} ({c * k} WLI + {c * k} NBI images), "
        f"{_VARIANT.value} variant; {machine['device_kind']} ({machine['backend']}, {machine['device_count']} "
        f"device(s)), jax {machine['jax']}; median of {_REPEATS.value}")
  print(f"{'size':>5} {'dtype':>9} | {'baseline ms':>11} {'img/s':>7} | {'teacher fwd ms':>14} {'img/s':>7} | "
        f"{'warm-up ms':>10} | {'PaGKD ms':>9} {'img/s':>7} | {'overhead':>8} {'warm-up ovh':>11} | "
        f"{'distill %: diff':>15} {'vs warm-up':>10} {'direct':>7}")
  for s in settings:
    st = s["steps"]
    direct = f"{100 * s['distill_share_direct']:.1f}" if "distill_share_direct" in s else "-"
    print(f"{s['image_size']:>5} {s['dtype']:>9} | {1e3 * st['baseline']['median_s']:>11.1f} "
          f"{st['baseline']['images_per_s']:>7.1f} | {1e3 * st['teacher_forward']['median_s']:>14.1f} "
          f"{st['teacher_forward']['images_per_s']:>7.1f} | {1e3 * st['pagkd_warmup']['median_s']:>10.1f} | "
          f"{1e3 * st['pagkd']['median_s']:>9.1f} {st['pagkd']['images_per_s']:>7.1f} | {s['overhead']:>8.3f} "
          f"{s['warmup_overhead']:>11.3f} | {100 * s['distill_share_by_difference']:>15.1f} "
          f"{100 * s['distill_share_vs_warmup']:>10.1f} {direct:>7}")
  print("overhead = PaGKD / (baseline + teacher fwd); warm-up ovh = PaGKD warm-up step / (baseline + teacher fwd).")
  print("images/s: baseline and PaGKD count the images the step trains on (PaGKD: WLI + NBI), the teacher the "
        "NBI images it reads. Goal (paper setting, GPU): overhead <= 1.15, distillation < 10 %.")

  result = {"benchmark": "train_step", "model": _MODEL.value, "num_classes": c, "group_size": k,
            "variant": _VARIANT.value, "repeats": _REPEATS.value, "persistent_cache": _CACHE.value,
            "settings": settings, "machine": machine}
  result_file.write(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)
