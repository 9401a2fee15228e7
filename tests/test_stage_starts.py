"""Where each stage starts and which checkpoint it ships: the same start for the baseline and the stage-2 student,
a trained run's workdir as `config.model.init_from`, and best-checkpoint selection after the distillation warm-up."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from pagkd_jax import checkpointing
from pagkd_jax import experiment
from pagkd_jax import mesh as mesh_lib
from pagkd_jax.data import class_groups
from pagkd_jax.models import pretrained
from pagkd_jax.models import resnet
from pagkd_jax.training import classifier_step
from pagkd_jax.training import optimizer
from pagkd_jax.training import pagkd_step
from pagkd_jax.training import trainer
from training_configs import tiny_synthetic_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
  """A 3-step NBI teacher, a 6-step WLI baseline and the same 6 steps of stage 2 with both losses off."""
  root = tmp_path_factory.mktemp("runs")
  teacher = tiny_synthetic_config(data_dir, stage="teacher", num_steps=3)
  trainer.train_and_evaluate(teacher, str(root / "teacher"))
  baseline = tiny_synthetic_config(data_dir, stage="baseline", num_steps=6)
  baseline.train.keep_latest = 2
  trainer.train_and_evaluate(baseline, str(root / "baseline"))
  control = tiny_synthetic_config(data_dir, stage="pagkd", num_steps=6)
  control.train.keep_latest = 2
  control.teacher.workdir = str(root / "teacher")
  control.distill.use_pro = control.distill.use_den = False
  trainer.train_and_evaluate(control, str(root / "control"))
  return {"teacher": root / "teacher", "baseline": root / "baseline", "control": root / "control",
          "baseline_config": baseline, "control_config": control}


def _rows(workdir, key):
  return [(r["step"], r[key]) for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if key in r]


def test_stage_two_without_distillation_is_bitwise_the_baseline(runs, data_dir):
  """Same initial weights (same key, same init function), same WLI batches, same update: after 6 steps the student
  and its BatchNorm statistics are bitwise the baseline's, at every checkpoint."""
  for step in (3, 6):
    _, base = checkpointing.read_latest_state(str(runs["baseline"]), step)
    _, ctrl = checkpointing.read_latest_state(str(runs["control"]), step)
    assert set(ctrl["params"]) == {"student", "heads"}
    paths = jax.tree_util.tree_flatten_with_path(base["params"])[0]
    assert len(paths) > 20
    jax.tree.map(np.testing.assert_array_equal, base["params"], ctrl["params"]["student"])
    jax.tree.map(np.testing.assert_array_equal, base["batch_stats"], ctrl["batch_stats"]["student"])
  # The comparison is of trained weights: training moved them between the two checkpoints.
  first = checkpointing.read_latest_state(str(runs["baseline"]), 3)[1]["params"]
  assert not np.array_equal(first["conv1"]["kernel"], base["params"]["conv1"]["kernel"])
  # And so the same validation scores.
  assert _rows(runs["baseline"], "val/auc") == _rows(runs["control"], "val/auc")
  assert _rows(runs["baseline"], "train/loss_cls") == _rows(runs["control"], "train/loss_cls")


def test_wli_batches_do_not_depend_on_the_other_modality(runs):
  config = runs["baseline_config"]
  records = experiment.load_split_data(config).select("train", None)
  kwargs = dict(classes=tuple(config.data.classes), group_size=config.data.group_size,
                image_size=config.data.image_size, aug_config=config.data.augment, seed=config.seed)
  wli_only = class_groups.ClassGroupLoader(records, modalities=("wli",), **kwargs)
  both = class_groups.ClassGroupLoader(records, modalities=("wli", "nbi"), **kwargs)
  for step in range(4):
    a, b = wli_only[step], both[step]
    np.testing.assert_array_equal(a["wli"], b["wli"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(b["wli"], b["nbi"])


def _backbone(variables):
  return {"params": {k: v for k, v in variables["params"].items() if k != "fc"},
          "batch_stats": variables["batch_stats"]}


@pytest.mark.parametrize("source", ["teacher", "control"])
def test_init_from_a_workdir_starts_every_stage_from_its_best_backbone(runs, data_dir, source):
  """A teacher's workdir gives its classifier, a stage-2 workdir its student: params and BatchNorm statistics of
  the best checkpoint, with a freshly initialised head, for the baseline and the stage-2 student alike."""
  workdir = str(runs[source])
  step = checkpointing.best_checkpoint_step(workdir)
  assert step is not None
  best = checkpointing.read_best_variables(workdir, step)
  mesh = mesh_lib.make_mesh()
  model = resnet.create_resnet("tiny", 3)
  config = tiny_synthetic_config(data_dir, stage="baseline")
  tx = optimizer.make_optimizer(config.optim, 10, 5)
  scratch = trainer.initial_state(config, classifier_step.ClassifierProgram("wli"), model, tx, mesh)
  config.model.init_from = workdir
  for stage, program in (("baseline", classifier_step.ClassifierProgram("wli")),
                         ("pagkd", pagkd_step.PaGKDProgram(frozen=()))):
    config.stage = stage
    state = trainer.initial_state(config, program, model, tx, mesh)
    params = state.params["student"] if stage == "pagkd" else state.params
    batch_stats = state.batch_stats["student"] if stage == "pagkd" else state.batch_stats
    jax.tree.map(np.testing.assert_array_equal, _backbone({"params": params, "batch_stats": batch_stats}),
                 _backbone(best))
    jax.tree.map(np.testing.assert_array_equal, params["fc"], scratch.params["fc"])  # The head: random init.
  # The source run was trained: its backbone is not the random start of the same seed.
  assert not np.array_equal(best["params"]["conv1"]["kernel"], scratch.params["conv1"]["kernel"])
  assert not np.array_equal(best["batch_stats"]["bn1"]["mean"], scratch.batch_stats["bn1"]["mean"])
  assert not np.array_equal(best["params"]["fc"]["kernel"], scratch.params["fc"]["kernel"])


def test_init_from_a_workdir_of_another_architecture_or_without_checkpoint_is_refused(runs, tmp_path):
  teacher = str(runs["teacher"])
  with pytest.raises(ValueError, match=f"init_from={re.escape(teacher)} is a training workdir of a tiny model .* "
                                       f"config.model.name is 'resnet18'"):
    pretrained.load(teacher, "resnet18")
  untrained = tmp_path / "untrained"
  untrained.mkdir()
  shutil.copy(os.path.join(teacher, "config.json"), untrained / "config.json")
  with pytest.raises(FileNotFoundError,
                     match=f"init_from={re.escape(str(untrained))} is a training workdir without a best checkpoint"):
    pretrained.load(str(untrained), "tiny")
  # The normalisation its weights were trained with is the workdir's own.
  assert pretrained.normalization_of(teacher) == runs["baseline_config"].data.normalization == "imagenet"
  edited = json.loads((untrained / "config.json").read_text())
  edited["data"]["normalization"] = "unit"
  (untrained / "config.json").write_text(json.dumps(edited))
  assert pretrained.normalization_of(str(untrained)) == "unit"
