"""The training loop: data, model, one jitted update over the device mesh, validation, checkpoints, logs.

`train_and_evaluate(config, workdir)` trains the stage named by `config.stage` with its method (the table in
`pagkd_jax.methods`) and resumes from the latest checkpoint in `workdir` when there is one: the state and the
data-iterator positions are restored, so the resumed run takes exactly the steps an uninterrupted run would.

Streams. Every program trains on the class-group stream; a program may add streams of its own
(`program.extra_streams`, e.g. the paired stream of "PaGKD (all)"), each with its own jitted update over the same
mesh and its own iterator. One iteration takes one optimiser step of every extra stream, in order, then one of the
class-group stream; a stream whose epoch is shorter waits (takes no step) until the longest one's epoch ends
(`epoch_schedule`). A "step" is one optimiser update of any stream: `state.step`, `train.num_steps`, the checkpoint
and log steps, the learning-rate schedule and the warm-ups count updates, and an epoch is the sum of the streams'
steps per epoch. An extra stream's metrics are logged as train/<stream name>/<metric>.
"""

import json
import math
import os
import time

import jax
import numpy as np
from absl import logging
from flax import traverse_util

from pagkd_jax import base_config
from pagkd_jax import checkpointing
from pagkd_jax import experiment
from pagkd_jax import mesh as mesh_lib
from pagkd_jax import methods
from pagkd_jax.data import class_groups
from pagkd_jax.evaluation import inference
from pagkd_jax.evaluation import metrics as metrics_lib
from pagkd_jax.models import pretrained
from pagkd_jax.models import torchvision_layout
from pagkd_jax.training import metric_log
from pagkd_jax.training import nonfinite
from pagkd_jax.training import optimizer as optimizer_lib
from pagkd_jax.training import preemption


# Values a resumed run may change: how long it runs, how often it logs and saves, how it reads its data, where
# its inputs now live. Any other difference would silently continue a different experiment.
RESUMABLE_CHANGES = ("train.num_steps", "train.epochs", "train.log_every_steps", "train.eval_every_steps",
                     "train.checkpoint_every_steps", "train.keep_latest", "train.on_nonfinite", "train.log_grad_norms",
                     "data.num_workers", "data.worker_buffer_size", "data.eval_batch_size", "data.skip_bad_files",
                     "data.manifest", "data.root", "data.tfds_dir", "data.synthetic.out", "teacher.workdir",
                     "model.init_from", "model.conv_impl", "eval.")


def config_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
  """(key, old value, new value) of every config value that differs (JSON forms of the configs)."""
  a, b = traverse_util.flatten_dict(old, sep="."), traverse_util.flatten_dict(new, sep=".")
  return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_resume_config(config, workdir: str) -> None:
  """Refuses to resume `workdir` with a config that changes what is trained (naming each difference); logs the
  harmless differences (RESUMABLE_CHANGES)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    # A value added to the project after the run was saved is what the run did (its default, or the earlier
    # behaviour where the default changed it): resuming with another value is a change like any other.
    old, _ = base_config.complete_saved_config(json.load(f))
  changes = config_changes(old, json.loads(config.to_json_best_effort()))
  blocking = [c for c in changes
              if not any(c[0] == r or (r.endswith(".") and c[0].startswith(r)) for r in RESUMABLE_CHANGES)]
  if blocking:
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in blocking)
    raise ValueError(f"{workdir} holds a run with another configuration ({listed}). Resuming it would mix two "
                     f"experiments: use a new --workdir, or the workdir's values (its config.json).")
  for k, a, b in changes:
    logging.info("Resuming with %s changed: %r -> %r", k, a, b)


def write_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def epoch_schedule(steps_per_epoch: dict[str, int]) -> list[str]:
  """The stream of each update of one epoch: iteration i takes one step of every stream (in the dict's order) that
  has more than i steps an epoch, so a shorter stream waits until the epoch ends.

  E.g. {"paired": 2, "groups": 3} -> ["paired", "groups", "paired", "groups", "groups"]."""
  longest = max(steps_per_epoch.values())
  return [name for i in range(longest) for name, steps in steps_per_epoch.items() if i < steps]


def stream_of_step(schedule: list[str], step: int) -> str:
  """The stream that update number `step` (counted from 1) trains."""
  return schedule[(step - 1) % len(schedule)]


def steps_taken(schedule: list[str], name: str, steps: int) -> int:
  """How many of the first `steps` updates train stream `name` (its iterator's position after them)."""
  epochs, rest = divmod(steps, len(schedule))
  return epochs * schedule.count(name) + schedule[:rest].count(name)


def total_steps(config, steps_per_epoch: int) -> int:
  if config.train.num_steps > 0:
    return int(config.train.num_steps)
  return max(1, math.ceil(config.train.epochs * steps_per_epoch))


def selectable_as_best(config, program, step: int, num_steps: int, steps_per_epoch: int) -> bool:
  """Whether the validation of `step` may choose the best checkpoint. With `train.select_after_warmup`, a program
  with a warm-up (`program.selection_warmup_steps`, e.g. stage 2's cross-entropy warm-up) chooses among the steps
  after it. The last step always may, so every run has a best checkpoint."""
  if step == num_steps or not config.train.select_after_warmup:
    return True
  warmup = getattr(program, "selection_warmup_steps", None)
  return warmup is None or step > warmup(config, steps_per_epoch)


def validate(predict_fn, variables, records, classes, config, mesh) -> dict:
  """Validation metrics (AUC, accuracy, macro F1) of `variables` on `records`."""
  probs = inference.predict_records(predict_fn, variables, records, image_size=config.data.image_size,
                                    batch_size=config.data.eval_batch_size, mesh=mesh,
                                    num_workers=config.data.num_workers)
  labels = np.asarray([r.label for r in records])
  report = metrics_lib.classification_report(labels, probs, classes, n_bootstrap=0)
  nll = float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))))
  return {"auc": report["auc"], "accuracy": report["accuracy"], "f1_macro": report["f1_macro"], "loss": nll}


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config.stage` in `workdir` with the stage's method; returns the last validation metrics and the best
  checkpoint's."""
  return methods.get(config.stage).train(config, workdir, run_stage)


def initial_state(config, program, model, tx, mesh, load_backbone: bool = True):
  """The state before the first update, replicated over `mesh`: random, with every backbone variable taken from
  `config.model.init_from` when it is set (and `load_backbone`; a resumed run restores its own state instead)."""
  backbone = None
  if config.model.init_from and load_backbone:
    backbone = pretrained.load(config.model.init_from, config.model.name)
    logging.info("Backbone initialised from %s", config.model.init_from)
    trained_on = pretrained.normalization_of(config.model.init_from)
    if config.data.normalization != trained_on:
      logging.warning("config.data.normalization=%r but the weights of %s were trained on %r-normalised inputs.",
                      config.data.normalization, config.model.init_from, trained_on)
  elif not config.model.init_from and config.model.name in torchvision_layout.IMPORTABLE:
    logging.warning("Training %s from random weights (config.model.init_from is empty); the paper starts from "
                    "ImageNet weights: see the README, 'ImageNet weights'.", config.model.name)
  init = jax.jit(lambda rng, backbone: program.init_state(model, tx, rng, config, backbone),
                 out_shardings=mesh_lib.replicated(mesh))
  return init(jax.random.key(config.seed), backbone)


def run_stage(config, workdir: str, program) -> dict:
  """The loop shared by every stage; `program` says what is trained (what a program supplies: the
  `pagkd_jax.methods` docstring)."""
  workdir = os.path.abspath(workdir)
  methods.get(config.stage)  # An unknown stage fails here, before anything is written.
  if config.train.on_nonfinite not in nonfinite.MODES:
    raise ValueError(f"config.train.on_nonfinite={config.train.on_nonfinite!r}; expected one of {nonfinite.MODES}.")
  resuming = checkpointing.latest_checkpoint_step(workdir) is not None
  if resuming:
    check_resume_config(config, workdir)
  write_config(config, workdir)
  opened = []  # What the loop opens and this function closes, whatever happens.
  try:
    with preemption.PreemptionWatch() as watch:
      return _train_loop(config, workdir, program, resuming, watch, opened)
  finally:  # Also on an error or SIGTERM: checkpoints being written are finished, so none is left half-saved.
    for resource in reversed(opened):
      resource.close()


MAIN_STREAM = "groups"  # The class-group stream's name in `epoch_schedule` (its metrics are logged as train/<metric>).


def _train_loop(config, workdir, program, resuming, watch, opened):
  modality = methods.stage_modality(config.stage)
  data = experiment.load_split_data(config, workdir)  # Checks every image first; nothing is created before.
  ckpts = checkpointing.RunCheckpoints(workdir, keep_latest=config.train.keep_latest)
  opened.append(ckpts)
  classes = data.classes
  train_records = program.train_records(data) if hasattr(program, "train_records") else data.select("train", None)
  val_records = data.select("val", modality)
  num_classes, group_size, size = len(classes), config.data.group_size, config.data.image_size
  extra_streams = tuple(getattr(program, "extra_streams", ()))
  names = [stream.name for stream in extra_streams]
  if MAIN_STREAM in names or len(set(names)) != len(names):
    raise ValueError(f"stream names {names} must be distinct and not {MAIN_STREAM!r}")
  groups_stream = bool(program.modalities)  # A program without modalities trains its extra streams alone.
  if not groups_stream and not extra_streams:
    raise ValueError(f"The program of stage {config.stage!r} has neither modalities nor extra streams: nothing to "
                     f"train.")

  mesh = mesh_lib.make_mesh()
  if groups_stream:
    mesh_lib.check_divisible("data.group_size", group_size, mesh)
    if group_size % jax.process_count():
      raise ValueError(f"data.group_size={group_size} must be a multiple of the number of processes "
                       f"({jax.process_count()}).")
  stream_steps, extra_iters = {}, {}
  for stream in extra_streams:  # Opened first: a stream without data fails before the main stream starts.
    extra_iters[stream.name], stream_steps[stream.name] = stream.make_iterator(
        config, data, jax.process_index(), jax.process_count())
  if groups_stream:
    stream_steps[MAIN_STREAM] = class_groups.steps_per_epoch(train_records, classes, modality, group_size)
  schedule = epoch_schedule(stream_steps)
  steps_per_epoch = len(schedule)
  num_steps = total_steps(config, steps_per_epoch)
  logging.info("stage %s: %d training %s images, %d steps per epoch (%s), %d steps on %d devices", config.stage,
               sum(r.modality == modality for r in train_records), modality.upper(), steps_per_epoch,
               ", ".join(f"{n}: {k}" for n, k in stream_steps.items()), num_steps, mesh.devices.size)

  if hasattr(program, "for_training_records"):  # A program that needs the training split (see methods).
    program = program.for_training_records(train_records, classes, config)
  batch_options = dict(getattr(program, "batch_options", {}))
  model = experiment.build_model(config)
  tx = optimizer_lib.make_optimizer(config.optim, num_steps, steps_per_epoch,
                                    gated_params=getattr(program, "gated_params", ()))
  replicated = mesh_lib.replicated(mesh)
  state = initial_state(config, program, model, tx, mesh, load_backbone=not resuming)

  train_iter = None  # The class-group stream's iterator, when the program has one.
  if groups_stream:
    train_iter = class_groups.make_train_iterator(
        train_records, classes=classes, modalities=program.modalities, group_size=group_size, image_size=size,
        aug_config=config.data.augment, seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), num_workers=config.data.num_workers,
        worker_buffer_size=config.data.worker_buffer_size, **batch_options)

  meta = {"best_val_auc": None, "best_step": None}
  if resuming:
    state, meta = ckpts.restore_latest(checkpointing.abstract_like(state, replicated), train_iter, extra_iters)
    logging.info("Resumed from step %d in %s", int(state.step), workdir)
  start_step = int(state.step)
  iterators = {**({MAIN_STREAM: train_iter} if groups_stream else {}), **extra_iters}
  for name, it in iterators.items():
    position, expected = it.get_state().get("step"), steps_taken(schedule, name, start_step)
    if position is not None and position != expected:
      raise ValueError(f"The {name} stream's iterator is at step {position} after {start_step} updates; the "
                       f"schedule of {workdir} expects {expected}. The checkpoint was written with other data.")

  group_sharding = mesh_lib.group_batch_sharding(mesh)
  group_keys = class_groups.group_keys(program.modalities, **batch_options)  # (C, K, ...) arrays, sharded over K.
  batch_shardings = {key: group_sharding for key in group_keys}
  batch_shardings["label"] = replicated
  frozen = jax.device_put(program.frozen, replicated)
  skip = config.train.on_nonfinite == "skip"

  def jitted(update_fn, shardings):
    if skip:
      update_fn = nonfinite.skip_nonfinite(update_fn)
    return jax.jit(update_fn, in_shardings=(replicated, shardings) + (replicated,) * len(frozen),
                   out_shardings=(replicated, replicated), donate_argnums=0)

  def to_global(local):
    batch = {key: mesh_lib.global_array(local[key], group_sharding, (num_classes, group_size) + local[key].shape[2:])
             for key in group_keys}
    batch["label"] = mesh_lib.global_array(local["label"], replicated, (num_classes,))
    return batch

  streams = {}  # name: (iterator, jitted update, local batch -> global arrays)
  if groups_stream:
    streams[MAIN_STREAM] = (train_iter, jitted(program.make_update(model, tx, config, steps_per_epoch),
                                               batch_shardings), to_global)
  for stream in extra_streams:
    layout = stream.batch_layout(config)  # {key: (global shape, sharded over the devices along its first axis)}
    shardings = {}
    for key, (shape, sharded) in layout.items():
      if sharded:
        mesh_lib.check_divisible(f"the {stream.name} stream's batch ({key})", shape[0], mesh)
        if shape[0] % jax.process_count():
          raise ValueError(f"the {stream.name} stream's batch ({key}) of {shape[0]} must be a multiple of the "
                           f"number of processes ({jax.process_count()}).")
      shardings[key] = mesh_lib.eval_batch_sharding(mesh) if sharded else replicated

    def stream_to_global(local, layout=layout, shardings=shardings):
      return {k: mesh_lib.global_array(local[k], shardings[k], layout[k][0]) for k in layout}

    streams[stream.name] = (extra_iters[stream.name],
                            jitted(stream.make_update(model, tx, config, steps_per_epoch), shardings),
                            stream_to_global)
  predict_fn = inference.make_predict_fn(model, config.data.normalization, mesh)

  log = metric_log.MetricLog(workdir, resume_step=start_step)
  opened.append(log)
  images_per_step = {MAIN_STREAM: num_classes * group_size * len(program.modalities),
                     **{stream.name: stream.images_per_step(config) for stream in extra_streams}}
  progress = metric_log.Progress(num_steps, sum(images_per_step[n] for n in schedule) / len(schedule), start_step)
  pending = []  # (step, stream, device metrics) not yet checked.
  fetched = {name: [] for name in streams}  # Checked host metrics not yet logged, per stream.
  val = {}
  t_start = time.perf_counter()

  def check_pending() -> None:
    """Fetches the metrics of the steps since the last check; stops on a non-finite one unless skipping."""
    host = jax.device_get([m for _, _, m in pending])
    steps = [s for s, _, _ in pending]
    if skip:
      skipped = [(s, nonfinite.nonfinite_terms(m)) for s, m in zip(steps, host) if m["skipped"]]
      for s, terms in skipped:
        logging.warning("Skipped step %d: non-finite %s (config.train.on_nonfinite='skip').", s, ", ".join(terms))
    else:
      nonfinite.check_finite(steps, host, workdir)
    for (_, name, _), m in zip(pending, host):
      fetched[name].append(m)
    pending.clear()

  for step in range(start_step + 1, num_steps + 1):
    name = stream_of_step(schedule, step)
    iterator, update, globalize = streams[name]
    state, step_metrics = update(state, globalize(next(iterator)), *frozen)
    pending.append((step, name, step_metrics))
    last = step == num_steps
    stop = watch.stop_now(step)
    log_now = step % config.train.log_every_steps == 0 or last or stop
    eval_now = step % config.train.eval_every_steps == 0 or last
    save_now = step % config.train.checkpoint_every_steps == 0 or last or stop
    if log_now or eval_now or save_now:
      check_pending()
    if log_now:
      scalars = {}
      for stream_name, rows in fetched.items():
        if rows:
          prefix = "train/" if stream_name == MAIN_STREAM else f"train/{stream_name}/"
          scalars.update({f"{prefix}{k}": v for k, v in _mean_metrics(rows).items()})
          rows.clear()
      scalars["train/epoch"] = step / steps_per_epoch
      scalars.update(progress.report(step, scalars))
      log.write(step, scalars)
    if eval_now:
      variables = program.eval_variables(state)
      val = validate(predict_fn, variables, val_records, classes, config, mesh)
      log.write(step, {f"val/{k}": v for k, v in val.items() if v is not None})
      logging.info("step %d validation: %s", step, json.dumps(val))
      best = meta["best_val_auc"]
      selectable = selectable_as_best(config, program, step, num_steps, steps_per_epoch)
      if not selectable:
        logging.info("step %d is in the distillation warm-up: not eligible as the best checkpoint "
                     "(config.train.select_after_warmup).", step)
      if selectable and val["auc"] is not None and (best is None or val["auc"] > best):
        meta = {"best_val_auc": float(val["auc"]), "best_step": step}
        ckpts.save_best(step, variables, val["auc"])
    if save_now:
      ckpts.save_latest(step, state, train_iter, meta, extra_iters)
    if stop and not last:
      ckpts.wait()
      raise preemption.Preempted(step, workdir)
  ckpts.wait()
  logging.info("Finished %s in %.1f s; best validation AUC %s at step %s", config.stage,
               time.perf_counter() - t_start, meta["best_val_auc"], meta["best_step"])
  return {"val": val, **meta}


def _mean_metrics(rows: list[dict]) -> dict:
  """Means over logged steps; with skipped steps, over the others, and `skipped_steps` counts them."""
  if rows and "skipped" in rows[0]:
    kept = [r for r in rows if not r["skipped"]]
    means = {k: float(np.mean([r[k] for r in kept])) if kept else float("nan") for k in rows[0] if k != "skipped"}
    return {**means, "skipped_steps": float(sum(r["skipped"] for r in rows))}
  return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
