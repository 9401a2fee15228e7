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
from pagkd_jax.methods import classifier
from pagkd_jax.methods import pagkd as pagkd_method
from pagkd_jax.models import pretrained
from pagkd_jax.models import resnet
from pagkd_jax.training import optimizer
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
  scratch = trainer.initial_state(config, classifier.ClassifierProgram("wli"), model, tx, mesh)
  config.model.init_from = workdir
  for stage, program in (("baseline", classifier.ClassifierProgram("wli")),
                         ("pagkd", pagkd_method.PaGKDProgram(frozen=()))):
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


def _steps_per_epoch(config):
  data = experiment.load_split_data(config)
  return class_groups.steps_per_epoch(data.select("train", None), data.classes, "wli", config.data.group_size)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, data_dir, runs):
  """12 steps of stage 2 with GKD-Pro (average-pool prototypes, the cheapest) after a 6-step warm-up; validation at
  steps 3, 6 (warm-up), 9 and 12 (distillation on)."""
  config = tiny_synthetic_config(data_dir, stage="pagkd", num_steps=12)
  config.teacher.workdir = str(runs["teacher"])
  config.distill.use_den = False
  config.distill.prototypes = "avg_pool"
  config.distill.embed_dim = 16
  steps_per_epoch = _steps_per_epoch(config)
  config.distill.warmup_epochs = 6 / steps_per_epoch
  assert experiment.distillation_warmup_steps(config, steps_per_epoch) == 6
  workdir = tmp_path_factory.mktemp("distilled") / "run"
  result = trainer.train_and_evaluate(config, str(workdir))
  return {"workdir": workdir, "config": config, "result": result}


def test_best_checkpoint_is_chosen_after_the_warmup(distilled):
  workdir, result = distilled["workdir"], distilled["result"]
  # The warm-up the loop ran is the one the selection assumes: the steps logged at 2, 4, 6 did not distil, those
  # at 8, 10, 12 did (each row is the mean over the two steps before it).
  assert _rows(workdir, "train/distill_on") == [(2, 0.0), (4, 0.0), (6, 0.0), (8, 1.0), (10, 1.0), (12, 1.0)]
  aucs = _rows(workdir, "val/auc")
  assert [s for s, _ in aucs] == [3, 6, 9, 12]  # Validated during the warm-up too.
  eligible = [(s, a) for s, a in aucs if s > 6]
  best_step, best_auc = max(eligible, key=lambda r: (r[1], -r[0]))  # The first of the highest.
  assert result["best_step"] == best_step == checkpointing.best_checkpoint_step(str(workdir)) > 6
  assert result["best_val_auc"] == pytest.approx(best_auc)


def test_selection_rule():
  from pagkd_jax import base_config
  config = base_config.get_config()
  config.distill.warmup_epochs = 2.0  # 10 steps at 5 steps per epoch.
  student = pagkd_method.PaGKDProgram(frozen=())
  picks = lambda program=student: [s for s in range(1, 31) if trainer.selectable_as_best(config, program, s, 30, 5)]
  assert [s for s in range(1, 31) if experiment.distillation_on(config, s, 5)] == list(range(11, 31))
  assert picks() == list(range(11, 31))
  config.train.select_after_warmup = False
  assert picks() == list(range(1, 31))
  config.train.select_after_warmup = True
  config.distill.warmup_epochs = 10.0  # Longer than the run: the last step stays eligible.
  assert picks() == [30]
  config.distill.warmup_epochs = 2.0
  config.distill.use_pro = config.distill.use_den = False  # The control chooses among the distilling arms' steps.
  assert picks() == list(range(11, 31)) and not experiment.distillation_on(config, 30, 5)
  for stage, modality in (("teacher", "nbi"), ("baseline", "wli")):
    config.stage = stage
    assert picks(classifier.ClassifierProgram(modality)) == list(range(1, 31))
    assert not experiment.distillation_on(config, 30, 5)


def test_control_chooses_among_the_steps_after_the_warmup(runs):
  """The control's validation scores are the baseline's (bitwise); its best checkpoint is the first highest among
  the steps after the warm-up (and the last step), as for a distilling run."""
  config = runs["control_config"]
  spe = class_groups.steps_per_epoch(experiment.load_split_data(config).select("train", None),
                                     tuple(config.data.classes), "wli", config.data.group_size)
  warmup = experiment.distillation_warmup_steps(config, spe)
  rows = _rows(runs["baseline"], "val/auc")
  eligible = [(s, a) for s, a in rows if s > warmup or s == config.train.num_steps]
  assert len(eligible) < len(rows) or warmup == 0
  want = max(eligible, key=lambda r: (r[1], -r[0]))[0]
  assert checkpointing.best_checkpoint_step(str(runs["control"])) == want


def test_eval_records_the_step_and_whether_it_distilled(distilled, runs, caplog):
  from pagkd_jax.evaluation import evaluator
  workdir = str(distilled["workdir"])
  evaluator.evaluate([workdir])
  saved = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
  assert saved["checkpoint"] == "best" and saved["checkpoint_step"] == distilled["result"]["best_step"]
  assert saved["distillation_on"] is True and saved["distillation_warmup_steps"] == 6
  for who in ("model", "teacher"):  # Synthetic data: the region labels against the true lesions, stage by stage.
    entry = saved["region_agreement"][who]
    assert 0.0 <= entry["cam_peak_in_disc"] <= 1.0
    assert {"disc_recall", "lesion_iou"} <= set(entry["without_par"]) and "disc_recall" in entry["disc_through_par"]
  with caplog.at_level("WARNING"):
    evaluator.evaluate([str(runs["control"])])
  saved = json.load(open(os.path.join(runs["control"], "eval", "metrics.json")))
  assert saved["distillation_on"] is False
  assert "trained without distillation" in caplog.text
  # A checkpoint of the distilling run from its warm-up is named as such.
  caplog.clear()
  config = distilled["config"]
  with caplog.at_level("WARNING"):
    record = evaluator._distillation_record(workdir, config, experiment.load_split_data(config), "latest", 6)
  assert record == {"distillation_on": False, "distillation_warmup_steps": 6}
  assert "(step 6) is from the cross-entropy warm-up" in caplog.text
