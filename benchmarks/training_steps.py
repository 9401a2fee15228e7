"""The jitted training steps exactly as `trainer.run_stage` builds them, on random class-group batches; shared by
the benchmark scripts of this folder (train_step.py, compile_time.py, gkd_cost.py, input_pipeline.py).

Each step is `jax.jit(program.make_update(...))` with the trainer's input / output shardings over the ("data",)
mesh and the state donated; batches are random uint8 arrays (C, K, S, S, 3) per modality, sharded along K.
"""

import copy
import dataclasses
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pagkd_jax import base_config
from pagkd_jax import experiment
from pagkd_jax import mesh as mesh_lib
from pagkd_jax.data.normalization import normalize_images
from pagkd_jax.distill import pagkd
from pagkd_jax.methods import classifier
from pagkd_jax.methods import pagkd as pagkd_method
from pagkd_jax.methods.classifier import flatten_groups
from pagkd_jax.training import optimizer as optimizer_lib

STEPS = ("baseline", "teacher_forward", "pagkd_warmup", "pagkd")


def make_config(*, model: str, image_size: int, dtype: str, group_size: int, num_classes: int = 3,
                variant: str = "paper", level: str = "group"):
  """The paper's configuration (base_config) with the benchmarked values; distillation on from step 0."""
  config = base_config.get_config()
  config.model.name = model
  config.model.dtype = dtype
  config.data.image_size = image_size
  config.data.group_size = group_size
  config.data.classes = tuple(f"class{i}" for i in range(num_classes))
  config.distill.variant = variant
  config.distill.level = level
  config.distill.warmup_epochs = 0.0  # The lax.cond takes the distillation branch at every benchmarked step.
  return config


@dataclasses.dataclass
class Step:
  """A jitted step and its arguments; `run(args) -> new args` advances the state (donated) one step."""

  name: str
  jitted: Any  # jax.jit(...) object, for .lower().
  args: tuple
  run: Callable[[tuple], tuple]
  images_per_step: int


def random_batch(config, modalities, mesh, seed: int = 0) -> dict:
  """Random uint8 class groups {m: (C, K, S, S, 3)} and labels (C,), placed as the trainer places them."""
  c, k, s = len(config.data.classes), config.data.group_size, config.data.image_size
  rng = np.random.default_rng(seed)
  group_sharding = mesh_lib.group_batch_sharding(mesh)
  batch = {m: mesh_lib.global_array(rng.integers(0, 256, (c, k, s, s, 3), dtype=np.uint8), group_sharding,
                                    (c, k, s, s, 3)) for m in modalities}
  batch["label"] = mesh_lib.global_array(np.arange(c, dtype=np.int32), mesh_lib.replicated(mesh), (c,))
  return batch


def _update_step(name, program, config, model, mesh, steps_per_epoch: int = 100) -> Step:
  tx = optimizer_lib.make_optimizer(config.optim, 10 * steps_per_epoch, steps_per_epoch,
                                    gated_params=getattr(program, "gated_params", ()))
  replicated = mesh_lib.replicated(mesh)
  state = jax.jit(lambda rng: program.init_state(model, tx, rng, config), out_shardings=replicated)(
      jax.random.key(config.seed))
  group_sharding = mesh_lib.group_batch_sharding(mesh)
  batch_shardings = {m: group_sharding for m in program.modalities}
  batch_shardings["label"] = replicated
  frozen = jax.device_put(program.frozen, replicated)
  jitted = jax.jit(program.make_update(model, tx, config, steps_per_epoch),
                   in_shardings=(replicated, batch_shardings) + (replicated,) * len(frozen),
                   out_shardings=(replicated, replicated), donate_argnums=0)
  batch = random_batch(config, program.modalities, mesh)

  def run(args, fn=jitted):
    new_state, metrics = fn(*args)
    jax.block_until_ready((new_state, metrics))
    return (new_state,) + args[1:]

  images = len(config.data.classes) * config.data.group_size * len(program.modalities)
  return Step(name, jitted, (state, batch, *frozen), run, images)


def init_teacher(config, model, mesh):
  """Random teacher variables (the benchmark needs the shapes, not trained values), replicated."""
  size = config.data.image_size
  variables = jax.jit(lambda rng: model.init(rng, jnp.zeros((1, size, size, 3)), train=False),
                      out_shardings=mesh_lib.replicated(mesh))(jax.random.key(1))
  return dict(variables)


def build_step(name: str, config, mesh=None) -> Step:
  """"baseline": the WLI-only update; "teacher_forward": the frozen teacher's forward pass on the NBI groups, as
  in the PaGKD loss (inference-mode BatchNorm, logits and layer4 maps); "pagkd": the full stage-2 update with
  distillation on; "pagkd_warmup": the same update during the cross-entropy warm-up (the lax.cond takes the branch
  without distillation; the teacher forward pass still runs)."""
  mesh = mesh or mesh_lib.make_mesh()
  model = experiment.build_model(config)
  if name == "baseline":
    return _update_step(name, classifier.ClassifierProgram("wli"), config, model, mesh)
  teacher = init_teacher(config, model, mesh)
  if name in ("pagkd", "pagkd_warmup"):
    if name == "pagkd_warmup":
      config = copy.deepcopy(config)
      config.distill.warmup_epochs = 1e4  # Every benchmarked step is a warm-up step.
    return _update_step(name, pagkd_method.PaGKDProgram(frozen=(teacher,)), config, model, mesh)
  if name != "teacher_forward":
    raise ValueError(f"Unknown step {name!r}; expected one of {STEPS}.")
  replicated = mesh_lib.replicated(mesh)
  normalization = config.data.normalization

  def forward(teacher, batch):
    return model.apply(teacher, normalize_images(flatten_groups(batch["nbi"]), normalization), train=False)

  jitted = jax.jit(forward, in_shardings=(replicated, {"nbi": mesh_lib.group_batch_sharding(mesh),
                                                       "label": replicated}))
  batch = random_batch(config, ("nbi",), mesh)

  def run(args, fn=jitted):
    jax.block_until_ready(fn(*args))
    return args

  return Step(name, jitted, (teacher, batch), run, len(config.data.classes) * config.data.group_size)


def compile_step(step: Step) -> tuple[Step, dict]:
  """Lowers and compiles `step` ahead of time; returns the step running the compiled executable and the
  lower / compile seconds and compiled memory figures."""
  start = time.perf_counter()
  lowered = step.jitted.lower(*step.args)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  info = {"lower_s": lowered_at - start, "compile_s": done - lowered_at, **memory_stats(compiled)}
  run = step.run

  def run_compiled(args):
    return run(args, fn=compiled)

  return dataclasses.replace(step, run=run_compiled), info


def memory_stats(compiled) -> dict:
  """Byte counts of `compiled.memory_analysis()` (None where the backend gives none)."""
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError, AttributeError):
    stats = None
  names = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
           "generated_code_size_in_bytes", "peak_memory_in_bytes")
  return {n: (int(getattr(stats, n)) if stats is not None and getattr(stats, n, None) is not None else None)
          for n in names}


def time_step(step: Step, repeats: int, warmup: int = 1) -> dict:
  """Median (and all) seconds per call after `warmup` untimed calls; each call blocks until ready."""
  args = step.args
  for _ in range(warmup):
    args = step.run(args)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    args = step.run(args)
    times.append(time.perf_counter() - start)
  step.args = args  # The donated state lives on in the last output.
  median = statistics.median(times)
  return {"median_s": median, "times_s": times, "images_per_s": step.images_per_step / median,
          "images_per_step": step.images_per_step}


def time_interleaved(steps: dict[str, Step], repeats: int, warmup: int = 1) -> dict[str, dict]:
  """Like `time_step` for several steps, called in turn (round r runs every step once), so a machine whose load
  changes during the benchmark slows every step alike."""
  for step in steps.values():
    for _ in range(warmup):
      step.args = step.run(step.args)
  times = {name: [] for name in steps}
  for _ in range(repeats):
    for name, step in steps.items():
      start = time.perf_counter()
      step.args = step.run(step.args)
      times[name].append(time.perf_counter() - start)
  out = {}
  for name, step in steps.items():
    median = statistics.median(times[name])
    out[name] = {"median_s": median, "times_s": times[name], "images_per_s": step.images_per_step / median,
                 "images_per_step": step.images_per_step}
  return out


def machine_info() -> dict:
  devices = jax.devices()
  import flax
  import optax
  return {
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "jax": jax.__version__,
      "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
      "flax": flax.__version__,
      "optax": optax.__version__,
      "numpy": np.__version__,
      "python": sys.version.split()[0],
      "platform": platform.platform(),
      "processor": platform.processor(),
      "cpu_count": os.cpu_count(),
      "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
      "nice": os.nice(0),
  }


def _jaxlib_version():
  try:
    import jaxlib
    return jaxlib.__version__
  except (ImportError, AttributeError):
    return None


def disable_persistent_cache() -> None:
  """Compile times must be real compilations, not reads of a persistent XLA cache."""
  jax.config.update("jax_enable_compilation_cache", False)


# ---- the distillation parts alone (gkd_cost.py; train_step.py's direct share) ----------------------------------

def random_inputs(num_classes: int, group_size: int, feature_size: int, features: int, image_size: int,
                  seed: int = 0) -> dict:
  """Features (B, h, w, F), images (B, S, S, 3) and labels (B,) for B = C N_c images per modality, K-major as
  `flatten_groups` orders them; head kernels (F, C); random region maps (C, N_c, h, w) in {-1, 0, 1}."""
  c, k, h = num_classes, group_size, feature_size
  keys = jax.random.split(jax.random.key(seed), 8)
  b = c * k
  return {
      "s_features": jax.nn.relu(jax.random.normal(keys[0], (b, h, h, features))),
      "t_features": jax.nn.relu(jax.random.normal(keys[1], (b, h, h, features))),
      "x_wli": jax.random.normal(keys[2], (b, image_size, image_size, 3)),
      "x_nbi": jax.random.normal(keys[3], (b, image_size, image_size, 3)),
      "s_kernel": jax.random.normal(keys[4], (features, c)) / math.sqrt(features),
      "t_kernel": jax.random.normal(keys[5], (features, c)) / math.sqrt(features),
      "regions_wli": jax.random.randint(keys[6], (c, k, h, h), -1, 2).astype(jnp.int8),
      "regions_nbi": jax.random.randint(keys[7], (c, k, h, h), -1, 2).astype(jnp.int8),
      "labels": jnp.tile(jnp.arange(c), k),
      "group_labels": jnp.arange(c),
  }


def make_heads_loss(config):
  """(heads_params, s_features, inputs) -> lambda_pro L_pro + lambda_den L_den, and the heads' initial params.

  The features are regrouped (K * C, ...) -> (C, K, ...) as in the PaGKD step; regions come from `inputs`."""
  num_classes = len(config.data.classes)
  heads = pagkd_method.make_heads(config, num_classes)
  d = config.distill
  lambda_pro = pagkd.resolved(d, "lambda_pro") if d.use_pro else 0.0
  lambda_den = d.lambda_den if d.use_den else 0.0

  def loss(params, s_features, inputs):
    s = pagkd_method.unflatten_groups(s_features, num_classes)
    t = pagkd_method.unflatten_groups(inputs["t_features"], num_classes)
    out = heads.apply({"params": params}, s, t, inputs["group_labels"], inputs["regions_wli"],
                      inputs["regions_nbi"])
    return lambda_pro * out["loss_pro"] + lambda_den * out["loss_den"]

  def init(inputs):
    s = pagkd_method.unflatten_groups(inputs["s_features"], num_classes)
    t = pagkd_method.unflatten_groups(inputs["t_features"], num_classes)
    return heads.init(jax.random.key(0), s, t, inputs["group_labels"], inputs["regions_wli"],
                      inputs["regions_nbi"])["params"]

  return loss, init


def make_region_fn(config):
  """inputs -> (regions_wli, regions_nbi): CAM -> PAR -> dual threshold for both modalities, as the step."""
  d = config.distill

  def regions(inputs):
    return (pagkd.region_labels(inputs["x_wli"], inputs["s_features"], inputs["s_kernel"], inputs["labels"], d),
            pagkd.region_labels(inputs["x_nbi"], inputs["t_features"], inputs["t_kernel"], inputs["labels"], d))

  return regions


def make_distillation_fn(config):
  """Everything the PaGKD step adds on the student's and teacher's features: CAM + PAR for both modalities, then
  GKD-Pro and GKD-Den, differentiated with respect to the heads' parameters and the student features.
  Returns (fn(params, inputs) -> (loss, grads), init(inputs) -> params)."""
  loss, init = make_heads_loss(config)
  region_fn = make_region_fn(config)
  num_classes = len(config.data.classes)

  def full_loss(params, s_features, inputs):
    r_wli, r_nbi = region_fn({**inputs, "s_features": jax.lax.stop_gradient(s_features)})
    inputs = {**inputs, "regions_wli": pagkd_method.unflatten_groups(r_wli, num_classes),
              "regions_nbi": pagkd_method.unflatten_groups(r_nbi, num_classes)}
    return loss(params, s_features, inputs)

  def fn(params, inputs):
    return jax.value_and_grad(full_loss, argnums=(0, 1))(params, inputs["s_features"], inputs)

  return fn, init


def measure(fn, args, repeats: int) -> dict:
  """Compile `jax.jit(fn)` ahead of time on `args`, then time it (median of `repeats` after one warm-up)."""
  jitted = jax.jit(fn)

  def run(a, fn=jitted):
    jax.block_until_ready(fn(*a))
    return a

  step = Step("f", jitted, args, run, 0)
  step, info = compile_step(step)
  timing = time_step(step, repeats)
  return {"ms": 1e3 * timing["median_s"], "times_ms": [1e3 * t for t in timing["times_s"]], **info}
