"""Hinton KD on pairs (stage "kd", pagkd_jax/methods/hinton_kd.py): the loss against NumPy, no pairs is an error
before the teacher, and train.py then eval.py on real synthetic files with pairs."""

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
from pagkd_jax.methods import hinton_kd
from pagkd_jax.models import resnet
from pagkd_jax.training import optimizer
from pagkd_jax.training import trainer
from pagkd_jax.training.train_state import TrainState
from subprocess_env import env_with_xla_flags
from training_configs import tiny_synthetic_config


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_kd_loss_is_cross_entropy_plus_t_squared_kl_from_the_teachers_nbi_logits():
  c, b, s, t = 3, 4, 32, 4.0
  config = base_config.get_config()
  config.stage, config.model.name, config.data.image_size = "kd", "tiny", s
  model = resnet.create_resnet("tiny", c)
  tx = optimizer.make_optimizer(config.optim, total_steps=10, steps_per_epoch=5)
  state = hinton_kd.HintonKDProgram(frozen=()).init_state(model, tx, jax.random.key(0), config)
  teacher = model.init(jax.random.key(7), jnp.zeros((1, s, s, 3)))
  rng = np.random.default_rng(0)
  batch = {"wli": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
           "nbi": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8), "label": np.array([0, 2, 1, 2], np.int32)}

  x_wli = normalize_images(jnp.asarray(batch["wli"]), config.data.normalization)
  x_nbi = normalize_images(jnp.asarray(batch["nbi"]), config.data.normalization)
  (z_s, _), _ = model.apply({"params": state.params, "batch_stats": state.batch_stats}, x_wli, train=True,
                            mutable=["batch_stats"])
  z_t, _ = model.apply(teacher, x_nbi, train=False)  # The teacher in inference mode.
  z_s, z_t = np.asarray(z_s, np.float64), np.asarray(z_t, np.float64)
  ce = -np.mean(_np_log_softmax(z_s)[np.arange(b), batch["label"]])
  log_p_t, log_p_s = _np_log_softmax(z_t / t), _np_log_softmax(z_s / t)
  kd = t * t * np.mean(np.sum(np.exp(log_p_t) * (log_p_t - log_p_s), -1))
  assert kd > 0

  loss, (terms, _) = jax.jit(hinton_kd.make_kd_loss(model, config))(state.params, state.batch_stats, batch, teacher)
  np.testing.assert_allclose(float(terms["loss_cls"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(terms["loss_kd"]), kd, rtol=1e-4)
  np.testing.assert_allclose(float(loss), ce + kd, rtol=1e-4)

  # One update: the teacher gets no gradient (it is not in the state) and the student moves.
  update = jax.jit(hinton_kd.make_kd_update(model, tx, config, steps_per_epoch=5))
  new_state, metrics = update(state, batch, teacher)
  assert int(new_state.step) == 1 and float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-6)
  assert not np.array_equal(np.asarray(new_state.params["fc"]["kernel"]), np.asarray(state.params["fc"]["kernel"]))


def test_kd_without_pairs_fails_before_the_teacher_naming_the_count(tmp_path):
  config = tiny_synthetic_config(tmp_path / "data", stage="kd")  # paired_fraction 0: no pairs.
  with pytest.raises(ValueError, match=r"data.paired_batch_size=24 pairs in the training split, found 0"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "teacher")


@pytest.mark.slow
def test_train_py_trains_kd_on_the_pairs_alone_then_eval_py_evaluates_the_student(tmp_path, repo_root):
  def run(args):
    done = subprocess.run([sys.executable, *args], cwd=repo_root, capture_output=True, text=True, timeout=1800,
                          env=env_with_xla_flags())
    assert done.returncode == 0, done.stderr[-5000:]

  workdir = tmp_path / "run"
  run(["train.py", "--config=configs/synthetic.py:smoke", "--config.stage=kd", f"--workdir={workdir}",
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
  assert all("train/paired/loss_kd" in r and "train/loss" not in r for r in train_rows)  # The pairs alone.
  assert all(r["train/paired/loss_kd"] > 0 for r in train_rows)
  saved = workdir / "checkpoints" / "latest" / "4"
  assert os.path.isdir(saved / "data_iter_paired") and not os.path.exists(saved / "data_iter")

  run(["eval.py", f"--workdir={workdir}"])
  with open(workdir / "eval" / "metrics.json") as f:
    report = json.load(f)
  assert report["stage"] == "kd" and report["modality"] == "wli" and 0.0 <= report["auc"] <= 1.0


def test_the_unpaired_variant_pairs_each_wli_image_with_a_random_nbi_image_of_its_class():
  from pagkd_jax.methods import streams

  c, k = 3, 4
  config = base_config.get_config()
  seen = []
  update = jax.jit(streams.groups_as_pairs(lambda state, pairs: (state, pairs), config))
  # Image (c, j) of each modality is filled with a code: 100 * class + j, + 50 for NBI.
  codes = np.arange(c)[:, None] * 100 + np.arange(k)[None, :]
  batch = {"wli": np.broadcast_to(codes[..., None, None, None], (c, k, 2, 2, 3)).astype(np.float32),
           "nbi": np.broadcast_to(codes[..., None, None, None] + 50, (c, k, 2, 2, 3)).astype(np.float32),
           "label": np.arange(c, dtype=np.int32)}
  for step in (0, 1):
    state = TrainState(step=jnp.int32(step), params={}, batch_stats={}, opt_state=())
    _, pairs = update(state, batch)
    wli, nbi, label = (np.asarray(pairs[key]) for key in ("wli", "nbi", "label"))
    assert wli.shape == nbi.shape == (k * c, 2, 2, 3) and label.shape == (k * c,)
    wli_code, nbi_code = wli[:, 0, 0, 0].astype(int), nbi[:, 0, 0, 0].astype(int) - 50
    np.testing.assert_array_equal(wli_code // 100, label)  # The WLI images in flatten_groups order, labelled.
    np.testing.assert_array_equal(nbi_code // 100, label)  # Each partner of the same class...
    for cls in range(c):  # ...a permutation of that class's NBI images.
      assert sorted(nbi_code[label == cls] % 100) == list(range(k))
    seen.append(nbi_code)
  assert not np.array_equal(seen[0], seen[1])  # Drawn afresh at every step.


@pytest.mark.slow
def test_train_py_trains_kd_plus_unpaired_on_data_without_pairs(tmp_path, repo_root):
  done = subprocess.run(
      [sys.executable, "train.py", "--config=configs/synthetic.py:smoke", "--config.stage=kd",
       "--config.paired_method.unpaired=True", f"--workdir={tmp_path / 'run'}",
       f"--config.data.synthetic.out={tmp_path / 'data'}", "--config.data.synthetic.lesions_per_class=8",
       "--config.data.synthetic.image_size=32", "--config.data.synthetic.images_per_lesion=2",
       "--config.data.image_size=32", "--config.data.group_size=4", "--config.data.eval_batch_size=16",
       "--config.train.num_steps=3", "--config.train.log_every_steps=1", "--config.train.eval_every_steps=3",
       "--config.train.checkpoint_every_steps=3", "--config.eval.bootstrap_samples=20",
       "--config.eval.num_cam_images=1"], cwd=repo_root, capture_output=True, text=True, timeout=1800,
      env=env_with_xla_flags())
  assert done.returncode == 0, done.stderr[-5000:]
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3]  # The class-group stream, no paired one.
  assert all(r["train/loss_kd"] > 0 for r in train_rows)
  assert not any(k.startswith("train/paired/") for r in rows for k in r)
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "latest" / "3" / "data_iter")
