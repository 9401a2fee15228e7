"""The project's baseline update and teacher forward pass side by side with PyTorch's on the same shapes.

JAX: the steps exactly as `trainer.run_stage` builds them (training_steps.py: the project's update function jitted
with the trainer's shardings, the state donated), once per `--conv_impls` value (model.conv_impl). PyTorch: a
ResNet of the same torchvision layout (torch_resnet.py), float32, in its default memory format, on the same random
uint8 class groups (C x N_c images of S x S), normalised inside the step as the project does:
* student step: train-mode forward, cross-entropy, backward, Adam (the project's optimiser: L2 weight decay added
  to the gradient, lr 1e-4) step;
* teacher forward: eval-mode forward under `torch.inference_mode()`.
PyTorch runs on as many threads as JAX's CPU backend uses (the CPUs this process may run on) unless
`--torch_threads` says otherwise. All steps are called in turn (round r runs each once, after one untimed call),
so a change of machine load slows all of them alike; medians of `--repeats` rounds; ratio = JAX time / PyTorch
time (> 1: JAX slower). PyTorch's OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE unless set otherwise):
on a CPU shared with other work, spinning OpenMP threads made its steps 2-4x slower. Needs PyTorch
(`pip install torch`).

  python benchmarks/vs_pytorch.py --model=resnet50 --group_sizes=2,8
  python benchmarks/vs_pytorch.py --model=tiny --group_sizes=8 --conv_impls=xla,auto
"""

import os

# Read once, when PyTorch loads its OpenMP runtime: set before any import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import result_file  # noqa: E402
import training_steps  # noqa: E402

_MODEL = flags.DEFINE_enum("model", "resnet50", ["resnet50", "resnet18", "tiny"], "Backbone of both frameworks.")
_GROUP_SIZES = flags.DEFINE_list("group_sizes", ["2", "8"], "N_c values: images per class and modality per step.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 3, "C.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Image side S.")
_CONV_IMPLS = flags.DEFINE_list("conv_impls", ["auto"], "model.conv_impl values timed for JAX (auto, xla, ...).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds (median reported).")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "PyTorch intra-op threads; 0: as many as JAX uses.")
_CACHE = flags.DEFINE_bool("persistent_cache", False, "Allow the persistent XLA cache.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/vs_pytorch.json", "JSON output path.")


def jax_threads() -> int:
  """CPUs XLA's CPU backend sizes its thread pool to (those this process may run on)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def torch_steps(model_name: str, num_classes: int, group_size: int, size: int, lr: float, weight_decay: float):
  """(student step, teacher forward) as `training_steps.Step`s on random uint8 batches (C, N_c, S, S, 3)."""
  import torch
  import torch_resnet
  from pagkd_jax import base_config

  mean = torch.tensor(base_config.IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(base_config.IMAGENET_STD).view(1, 3, 1, 1)
  rng = np.random.default_rng(0)
  b = num_classes * group_size

  def batch():
    images = torch.from_numpy(rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8))
    return images, torch.arange(b) % num_classes

  def normalize(images):  # uint8 NHWC -> float32 NCHW, ImageNet mean / std (data.normalization = "imagenet").
    # Contiguous NCHW: a permuted (channels-last) input made torch 2.13's CPU backward abort (double free).
    return ((images.permute(0, 3, 1, 2).float() / 255.0 - mean) / std).contiguous()

  torch.manual_seed(0)
  student = torch_resnet.create_torch_resnet(model_name, num_classes).train()
  optimizer = torch.optim.Adam(student.parameters(), lr=lr, weight_decay=weight_decay)
  s_images, s_labels = batch()

  def student_step(args):
    optimizer.zero_grad(set_to_none=True)
    logits, _ = student(normalize(s_images))
    torch.nn.functional.cross_entropy(logits, s_labels).backward()
    optimizer.step()
    return args

  teacher = torch_resnet.random_torch_resnet(model_name, seed=1, num_classes=num_classes)
  t_images, _ = batch()

  def teacher_forward(args):
    with torch.inference_mode():
      teacher(normalize(t_images))
    return args

  return (training_steps.Step("torch_baseline", None, (), student_step, b),
          training_steps.Step("torch_teacher_forward", None, (), teacher_forward, b))


def measure(group_size: int) -> dict:
  steps = {}
  for impl in _CONV_IMPLS.value:
    config = training_steps.make_config(model=_MODEL.value, image_size=_IMAGE_SIZE.value, dtype="float32",
                                        group_size=group_size, num_classes=_NUM_CLASSES.value)
    config.model.conv_impl = impl
    for name in ("baseline", "teacher_forward"):
      steps[f"jax_{name}[{impl}]"], info = training_steps.compile_step(training_steps.build_step(name, config))
      print(f"  N_c={group_size} jax {name} conv_impl={impl}: compiled in {info['compile_s']:.1f} s", flush=True)
  optim = config.optim
  steps["torch_baseline"], steps["torch_teacher_forward"] = torch_steps(
      _MODEL.value, _NUM_CLASSES.value, group_size, _IMAGE_SIZE.value, optim.learning_rate, optim.weight_decay)
  load_before = os.getloadavg()
  timings = training_steps.time_interleaved(steps, _REPEATS.value)
  load_after = os.getloadavg()
  medians = {name: t["median_s"] for name, t in timings.items()}
  ratios = {}
  for impl in _CONV_IMPLS.value:
    b, t = medians[f"jax_baseline[{impl}]"], medians[f"jax_teacher_forward[{impl}]"]
    ratios[impl] = {"baseline": b / medians["torch_baseline"],
                    "teacher_forward": t / medians["torch_teacher_forward"],
                    "baseline_plus_teacher": (b + t) / (medians["torch_baseline"] + medians["torch_teacher_forward"])}
  return {"group_size": group_size, "images_per_modality": _NUM_CLASSES.value * group_size,
          "timings": timings, "ratios": ratios, "loadavg_before": list(load_before), "loadavg_after": list(load_after)}


def main(argv) -> None:
  del argv
  import torch
  threads = _TORCH_THREADS.value or jax_threads()
  torch.set_num_threads(threads)
  if not _CACHE.value:
    training_steps.disable_persistent_cache()
  results = [measure(int(k)) for k in _GROUP_SIZES.value]

  machine = training_steps.machine_info()
  c, s = _NUM_CLASSES.value, _IMAGE_SIZE.value
  print(f"\n{_MODEL.value}, {s} px, float32, {c} classes x N_c images; {machine['device_kind']} "
        f"({machine['cpu_count']} CPUs), jax {machine['jax']}, torch {torch.__version__} on {threads} threads "
        f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}); "
        f"median of {_REPEATS.value} interleaved rounds; ratio = JAX / PyTorch")
  print(f"{'N_c':>4} {'conv_impl':>13} | {'JAX update s':>12} {'torch step s':>12} {'ratio':>6} | "
        f"{'JAX teacher s':>13} {'torch fwd s':>11} {'ratio':>6} | {'sum ratio':>9} | load avg (1 min) before, after")
  for r in results:
    m = {name: t["median_s"] for name, t in r["timings"].items()}
    for impl, ratio in r["ratios"].items():
      print(f"{r['group_size']:>4} {impl:>13} | {m[f'jax_baseline[{impl}]']:>12.3f} {m['torch_baseline']:>12.3f} "
            f"{ratio['baseline']:>6.2f} | {m[f'jax_teacher_forward[{impl}]']:>13.3f} "
            f"{m['torch_teacher_forward']:>11.3f} {ratio['teacher_forward']:>6.2f} | "
            f"{ratio['baseline_plus_teacher']:>9.2f} | {r['loadavg_before'][0]:.1f}, {r['loadavg_after'][0]:.1f}")
  result = {"benchmark": "vs_pytorch", "model": _MODEL.value, "num_classes": c, "image_size": s, "dtype": "float32",
            "conv_impls": _CONV_IMPLS.value, "repeats": _REPEATS.value, "torch": torch.__version__,
            "torch_threads": threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "results": results, "machine": machine}
  result_file.write(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)
