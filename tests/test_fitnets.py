"""FitNets on pairs (stage "fitnets", pagkd_jax/methods/fitnets.py): the loss against NumPy, the regressor trained
with the student, and train.py then eval.py on real synthetic files with pairs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagkd_jax import base_config
from pagkd_jax.data.normalization import normalize_images
from pagkd_jax.methods import fitnets
from pagkd_jax.models import resnet
from pagkd_jax.training import optimizer
from subprocess_env import env_with_xla_flags


def test_fitnets_loss_is_cross_entropy_plus_weight_times_the_mse_of_the_regressed_student_map():
  c, b, s = 3, 4, 32
  config = base_config.get_config()
  config.stage, config.model.name, config.data.image_size = "fitnets", "tiny", s
  config.fitnets.weight = 0.3
  model = resnet.create_resnet("tiny", c)
  tx = optimizer.make_optimizer(config.optim, total_steps=10, steps_per_epoch=5)
  state = fitnets.FitNetsProgram(frozen=()).init_state(model, tx, jax.random.key(0), config)
  teacher = model.init(jax.random.key(7), jnp.zeros((1, s, s, 3)))
  rng = np.random.default_rng(0)
  batch = {"wli": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
           "nbi": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8), "label": np.array([0, 2, 1, 2], np.int32)}
  # A non-zero bias, so the test sees it added.
  state = state.replace(params={**state.params, "regressor": {
      "kernel": state.params["regressor"]["kernel"], "bias": jnp.linspace(-1.0, 1.0, state.params["regressor"][
          "bias"].shape[0])}})

  x_wli = normalize_images(jnp.asarray(batch["wli"]), config.data.normalization)
  x_nbi = normalize_images(jnp.asarray(batch["nbi"]), config.data.normalization)
  (z_s, f_s), _ = model.apply({"params": state.params["student"], "batch_stats": state.batch_stats["student"]},
                              x_wli, train=True, mutable=["batch_stats"])
  _, f_t = model.apply(teacher, x_nbi, train=False)  # The teacher in inference mode.
  z_s, f_s, f_t = (np.asarray(a, np.float64) for a in (z_s, f_s, f_t))
  w = np.asarray(state.params["regressor"]["kernel"], np.float64)
  bias = np.asarray(state.params["regressor"]["bias"], np.float64)
  z = z_s - z_s.max(-1, keepdims=True)
  ce = -np.mean((z - np.log(np.exp(z).sum(-1, keepdims=True)))[np.arange(b), batch["label"]])
  hint = np.mean((np.einsum("bhwc,ct->bhwt", f_s, w) + bias - f_t) ** 2)
  assert f_s.shape == f_t.shape and w.shape == (f_s.shape[-1],) * 2 and hint > 0

  loss, (terms, _) = jax.jit(fitnets.make_fitnets_loss(model, config))(state.params, state.batch_stats, batch,
                                                                       teacher)
  np.testing.assert_allclose(float(terms["loss_cls"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(terms["loss_hint"]), hint, rtol=1e-4)
  np.testing.assert_allclose(float(loss), ce + 0.3 * hint, rtol=1e-4)

  # One update trains the student and the regressor.
  new_state, _ = jax.jit(fitnets.make_fitnets_update(model, tx, config, steps_per_epoch=5))(state, batch, teacher)
  for part in ("student", "regressor"):
    before, after = jax.tree.leaves(state.params[part]), jax.tree.leaves(new_state.params[part])
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(before, after)), part


@pytest.mark.slow
def test_train_py_trains_fitnets_on_the_pairs_alone_then_eval_py_evaluates_the_student(tmp_path, repo_root):
  def run(args):
    done = subprocess.run([sys.executable, *args], cwd=repo_root, capture_output=True, text=True, timeout=1800,
                          env=env_with_xla_flags())
    assert done.returncode == 0, done.stderr[-5000:]

  workdir = tmp_path / "run"
  run(["train.py", "--config=configs/synthetic.py:smoke", "--config.stage=fitnets", f"--workdir={workdir}",
       f"--config.data.synthetic.out={tmp_path / 'data'}", "--config.data.synthetic.paired_fraction=0.5",
       "--config.data.paired_batch_size=4", "--config.data.synthetic.lesions_per_class=10",
       "--config.data.synthetic.image_size=32", "--config.data.synthetic.images_per_lesion=2",
       "--config.data.image_size=32", "--config.data.group_size=4", "--config.data.eval_batch_size=16",
       "--config.train.num_steps=4", "--config.train.log_every_steps=1", "--config.train.eval_every_steps=4",
       "--config.train.checkpoint_every_steps=4", "--config.eval.bootstrap_samples=20",
       "--config.eval.num_cam_images=1"])
  assert os.path.isdir(workdir / "teacher" / "checkpoints" / "best")  # The NBI teacher was trained first.
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  train_rows = [r for r in rows if any(k.startswith("train/") and k != "train/epoch" for k in r)]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
  assert all(r["train/paired/loss_hint"] > 0 and "train/loss" not in r for r in train_rows)  # The pairs alone.

  run(["eval.py", f"--workdir={workdir}"])  # The best checkpoint holds the student alone, a plain classifier.
  with open(workdir / "eval" / "metrics.json") as f:
    report = json.load(f)
  assert report["stage"] == "fitnets" and report["modality"] == "wli" and 0.0 <= report["auc"] <= 1.0
