"""Where each stage starts and which checkpoint it ships: the same start for the baseline and the stage-2 student,
a trained run's workdir as `config.model.init_from`, and best-checkpoint selection after the distillation warm-up."""

import json
import os

import jax
import numpy as np
import pytest

from pagkd_jax import checkpointing
from pagkd_jax import experiment
from pagkd_jax.data import class_groups
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
