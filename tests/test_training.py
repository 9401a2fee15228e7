"""End-to-end training on real synthetic image files: logs, checkpoints, exact resume, evaluation."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagkd_jax import checkpointing
from pagkd_jax.evaluation import evaluator
from pagkd_jax.models import resnet
from pagkd_jax.training import trainer
from training_configs import tiny_synthetic_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("synthetic")


def _latest_params(workdir):
  step, state = checkpointing.read_latest_state(workdir)
  return step, state["params"]


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, data_dir):
  config = tiny_synthetic_config(data_dir, num_steps=6)
  config.train.keep_latest = 2
  uninterrupted = str(tmp_path / "uninterrupted")
  trainer.train_and_evaluate(config, uninterrupted)

  # An interrupted run: the same workdir as it was after step 3 (step 6's checkpoint never written).
  resumed = str(tmp_path / "resumed")
  shutil.copytree(uninterrupted, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "latest", "6"))
  trainer.train_and_evaluate(config, resumed)

  step_a, params_a = _latest_params(uninterrupted)
  step_b, params_b = _latest_params(resumed)
  assert step_a == step_b == 6
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # Training moved the parameters between step 3 and step 6 (the check compares real updates).
  p3 = checkpointing.read_latest_state(uninterrupted, 3)[1]["params"]
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(p3), jax.tree.leaves(params_a)))

  rows = [json.loads(line) for line in open(os.path.join(uninterrupted, "metrics.jsonl"))]
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [2, 4, 6]
  assert all(np.isfinite(r["train/loss"]) and r["perf/images_per_sec"] > 0 for r in train_rows)
  val_rows = [r for r in rows if "val/auc" in r]
  assert [r["step"] for r in val_rows] == [3, 6]


def test_train_then_evaluate_writes_every_report(tmp_path, data_dir):
  config = tiny_synthetic_config(data_dir, stage="baseline", num_steps=4)
  workdir = str(tmp_path / "baseline")
  trainer.train_and_evaluate(config, workdir)
  for name in ("config.json", "splits.csv", "metrics.jsonl"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))

  report = evaluator.evaluate([workdir])
  out = os.path.join(workdir, "eval")
  saved = json.load(open(os.path.join(out, "metrics.json")))
  for key in ("auc", "accuracy", "f1_macro", "per_class", "confusion_matrix", "ci95", "n_images"):
    assert key in saved, key
  assert saved["modality"] == "wli" and saved["stage"] == "baseline"
  assert saved["n_images"] == report["n_images"] == int(np.sum(saved["confusion_matrix"]))
  assert set(saved["per_class"]) == set(config.data.classes)
  for png in ("roc.png", "confusion.png"):
    assert os.path.getsize(os.path.join(out, png)) > 1000
  assert len(os.listdir(os.path.join(out, "cams"))) == config.eval.num_cam_images

  # Two workdirs pool into one report with the images of both.
  pooled = evaluator.evaluate([workdir, workdir], out=str(tmp_path / "pooled"))
  assert pooled["n_images"] == 2 * saved["n_images"]
  assert os.path.exists(tmp_path / "pooled" / "metrics.json")


def test_eval_without_checkpoint_says_so(tmp_path, data_dir):
  config = tiny_synthetic_config(data_dir)
  workdir = tmp_path / "empty"
  workdir.mkdir()
  (workdir / "config.json").write_text(config.to_json())
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    evaluator.evaluate([str(workdir)])


def test_checkpoint_of_another_architecture_or_class_list_is_named_before_restoring(tmp_path, data_dir):
  config = tiny_synthetic_config(data_dir, stage="baseline", num_steps=3)
  workdir = tmp_path / "run"
  trainer.train_and_evaluate(config, str(workdir))

  # eval.py on a workdir whose config.json names another architecture than its checkpoints hold.
  edited = json.loads((workdir / "config.json").read_text())
  edited["model"]["name"] = "resnet18"
  (workdir / "config.json").write_text(json.dumps(edited))
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"checkpoints/best/3/variables does not fit .* params/fc/kernel: checkpoint \(64, 3\), "
                           r"model \(512, 3\)"):
    evaluator.evaluate([str(workdir)])

  # A class list of another length: the head's shapes differ, and the message says what they are.
  model = resnet.create_resnet("tiny", 2)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"\(2 arrays differ: params/fc/bias: checkpoint \(3,\), model \(2,\); params/fc/kernel: "
                           r"checkpoint \(64, 3\), model \(64, 2\)\).*class list"):
    checkpointing.check_fits(str(workdir / "checkpoints" / "latest" / "3" / "state"), dict(abstract), "the model",
                             subtrees=("params", "batch_stats"))
