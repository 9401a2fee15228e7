"""Training methods: the table that maps `config.stage` to the method that trains it.

Each method is one module of this package with a function

  train(config, workdir, run_stage) -> dict

that trains `config.stage` in `workdir` by calling `run_stage(config, workdir, program)` (`trainer.run_stage`, the
loop every method shares) once per run it needs (stage "pagkd" trains its NBI teacher first), and returns the last
run's result. The trainer looks the stage up here (`get(config.stage).train(...)`) and names no method itself.

A program says what the loop trains:

  program.modalities: the modalities its class-group batches hold, e.g. ("wli", "nbi"); () for a program without
      the class-group stream, which trains its extra streams alone (a method trained on pairs only);
  program.init_state(model, tx, rng, config, backbone) -> TrainState: the state before the first update
      (`backbone`: pretrained variables, all but the head, or None);
  program.make_update(model, tx, config, steps_per_epoch) -> a pure update(state, batch, *frozen) -> (state, metrics)
      that the loop jits once over the device mesh, with the state donated;
  program.frozen: a tuple of extra inputs of the update that are never trained, donated or checkpointed (a teacher);
  program.gated_params (optional, default ()): top-level parameter groups its optimiser updates only when the update
      passes `gated_on=True` (`optimizer.make_optimizer`);
  program.selection_warmup_steps(config, steps_per_epoch) (optional, default 0): updates of a warm-up whose
      validations may not choose the best checkpoint when `train.select_after_warmup` is set;
  program.eval_variables(state) -> {"params", "batch_stats"}: the classifier that is validated and shipped;
  program.train_records(data) (optional, default: every training record): the records of the class-group stream
      (`data`: the run's `experiment.SplitData`);
  program.extra_streams (optional, default ()): streams trained beside the class-group stream, e.g. the paired
      stream (`streams.PairedStream`). Each has
        name: names its metrics (train/<name>/...) and its checkpoint item (data_iter_<name>);
        make_iterator(config, data, process_index, process_count) -> (checkpointable iterator, steps per epoch);
        batch_layout(config) -> {key: (global shape, split over the devices along the first axis)};
        images_per_step(config) -> int: images a step decodes (for the progress line's images/s);
        make_update(model, tx, config, steps_per_epoch) -> update(state, batch, *frozen) -> (state, metrics),
            jitted like the class-group update, with the same state and frozen inputs.
      One iteration takes a step of each extra stream, then one of the class-group stream; `steps_per_epoch` and
      every step count (state.step, train.num_steps, warm-ups) count the updates of all streams (`trainer`).
  program.batch_options (optional, default {}): options of the class-group loader that add keys to every batch
      (`class_groups.ClassGroupLoader`: views=2 adds a second augmented view of each image, row_indices=True each
      image's row in the training split); the update receives them beside the modalities;
  program.for_training_records(records, classes, config) -> program (optional): called by the loop with the training
      split's records (after the data check) before the state is built, for a program that needs them (CRCKD sizes
      its memory banks from them).

This module imports nothing of the project, so any module (the config check, the data split, the trainer) can read
the table without importing a method; a method's module is imported when it trains.
"""

import dataclasses
import importlib
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Method:
  """One value of `config.stage`."""

  module: str  # The module whose `train(config, workdir, run_stage)` trains the stage.
  modality: str  # The modality of the classifier it ships: what it is validated and tested on.
  data_modalities: tuple[str, ...]  # The modalities every class of the training data must have.
  # The config value that sets the size of a Linear between the pooled features and the head (`resnet.ResNet`'s
  # embed_dim), e.g. "crckd.embed_dim"; "" for the plain classifier. The evaluation builds the same model from it.
  embedding: str = ""
  # A paired comparison method (spec 9): trains on the pairs of the training split, or with
  # paired_method.unpaired on the class-group batches ("+ unpaired").
  pairs: bool = False

  def train(self, config, workdir: str, run_stage: Callable) -> dict:
    return importlib.import_module(self.module).train(config, workdir, run_stage)


METHODS: dict[str, Method] = {
    "teacher": Method("pagkd_jax.methods.classifier", "nbi", ("nbi",)),  # The NBI classifier (cross-entropy).
    "baseline": Method("pagkd_jax.methods.classifier", "wli", ("wli",)),  # The WLI-only classifier.
    "pagkd": Method("pagkd_jax.methods.pagkd", "wli", ("nbi", "wli")),  # The NBI teacher, then the WLI student.
    # CRCKD (spec CRCKD.md): a WLI classifier distilled from its own mean teacher, without NBI.
    "crckd": Method("pagkd_jax.methods.crckd", "wli", ("wli",), embedding="crckd.embed_dim"),
    # Hinton KD on pairs (spec 9): the NBI teacher, then a WLI classifier on the pairs alone, CE + T^2 KL (T = 4).
    "kd": Method("pagkd_jax.methods.hinton_kd", "wli", ("nbi", "wli"), pairs=True),
    # FitNets on pairs (spec 9): the NBI teacher, then a WLI classifier on the pairs alone, CE + the layer4 hint.
    "fitnets": Method("pagkd_jax.methods.fitnets", "wli", ("nbi", "wli"), pairs=True),
    # ADD (spec 9): the NBI teacher, then a WLI classifier on the pairs alone, CE then + dense loss + logit alignment.
    "add": Method("pagkd_jax.methods.add", "wli", ("nbi", "wli"), pairs=True),
}

STAGES = tuple(METHODS)  # The values of config.stage.


def get(stage: str) -> Method:
  """The method of `stage` (a value of config.stage); an unknown stage raises ValueError naming the known ones."""
  if stage not in METHODS:
    raise ValueError(f"Unknown config.stage {stage!r}; expected one of {STAGES}.")
  return METHODS[stage]


def embedding_dim(config) -> int:
  """The size of the classifier's Linear before its head for `config.stage` (`Method.embedding`), 0 for none."""
  node = config
  path = get(config.stage).embedding
  if not path:
    return 0
  for key in path.split("."):
    node = node[key]
  return int(node)


def stage_modality(stage: str) -> str:
  """The modality a stage trains and is evaluated on: NBI for the teacher, WLI otherwise."""
  return get(stage).modality
