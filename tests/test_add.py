"""ADD on pairs (stage "add", pagkd_jax/methods/add.py): the loss against NumPy before and after the warm-up, and
train.py then eval.py on real synthetic files with pairs."""

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
from pagkd_jax.distill import pagkd as pagkd_distill
from pagkd_jax.methods import add
from pagkd_jax.models import resnet
from pagkd_jax.training import optimizer
from subprocess_env import env_with_xla_flags


def _np_dense(q, k, lq, lk, ambiguous):
  """NumPy reference of one direction of the per-image dense loss (spec 8), float64."""
  b = q.shape[0]
  q, k = q.reshape(b, -1, q.shape[-1]).astype(np.float64), k.reshape(b, -1, k.shape[-1]).astype(np.float64)
  lq, lk = lq.reshape(b, -1, 1), lk.reshape(b, 1, -1)
  w = np.where((lq == -1) | (lk == -1), ambiguous, (lq == lk).astype(np.float64))
  logits = np.where(w == 0, -1e9, np.einsum("btd,bvd->btv", q, k) * w)
  a = np.exp(logits - logits.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  recon = np.einsum("btv,bvd->btd", a, k).reshape(b, -1)
  flat = q.reshape(b, -1)
  cos = (recon * flat).sum(-1) / np.sqrt(((recon ** 2).sum(-1) + 1e-12) * ((flat ** 2).sum(-1) + 1e-12))
  return np.mean(1 - cos)


def test_add_loss_is_cross_entropy_then_plus_the_weighted_dense_loss_and_logit_alignment():
  c, b, s = 3, 4, 32
  config = base_config.get_config()
  config.stage, config.model.name, config.data.image_size = "add", "tiny", s
  config.add.warmup_epochs, config.add.dense_weight, config.add.logit_weight = 1.0, 0.7, 0.4  # Warm-up: 5 steps.
  model = resnet.create_resnet("tiny", c)
  tx = optimizer.make_optimizer(config.optim, total_steps=10, steps_per_epoch=5)
  state = add.ADDProgram(frozen=()).init_state(model, tx, jax.random.key(0), config)
  teacher = model.init(jax.random.key(7), jnp.zeros((1, s, s, 3)))
  rng = np.random.default_rng(0)
  batch = {"wli": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
           "nbi": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8), "label": np.array([0, 2, 1, 2], np.int32)}

  # The pieces from the model and the region labels (tested elsewhere), then the sum in NumPy.
  x_wli = normalize_images(jnp.asarray(batch["wli"]), config.data.normalization)
  x_nbi = normalize_images(jnp.asarray(batch["nbi"]), config.data.normalization)
  (z_s, f_s), _ = model.apply({"params": state.params, "batch_stats": state.batch_stats}, x_wli, train=True,
                              mutable=["batch_stats"])
  z_t, f_t = model.apply(teacher, x_nbi, train=False)  # The teacher in inference mode.
  labels = jnp.asarray(batch["label"])
  r_s = np.asarray(pagkd_distill.region_labels(x_wli, f_s, state.params["fc"]["kernel"], labels, config.distill))
  r_t = np.asarray(pagkd_distill.region_labels(x_nbi, f_t, teacher["params"]["fc"]["kernel"], labels,
                                               config.distill))
  assert (r_s == -1).any() or (r_t == -1).any()  # Ambiguous positions, where ADD's relation value 0 matters.
  z_s, z_t = np.asarray(z_s, np.float64), np.asarray(z_t, np.float64)
  z = z_s - z_s.max(-1, keepdims=True)
  ce = -np.mean((z - np.log(np.exp(z).sum(-1, keepdims=True)))[np.arange(b), batch["label"]])
  dense = _np_dense(np.asarray(f_t), np.asarray(f_s), r_t, r_s, 0.0) + _np_dense(np.asarray(f_s), np.asarray(f_t),
                                                                                r_s, r_t, 0.0)
  cos = (z_s * z_t).sum(-1) / np.sqrt(((z_s ** 2).sum(-1) + 1e-12) * ((z_t ** 2).sum(-1) + 1e-12))
  logit = np.mean(1 - cos)
  assert dense > 0 and logit > 0

  loss_fn = jax.jit(add.make_add_loss(model, config, steps_per_epoch=5))
  loss, (terms, _) = loss_fn(state.params, state.batch_stats, jnp.int32(4), batch, teacher)  # Warm-up: CE only.
  np.testing.assert_allclose(float(loss), ce, rtol=1e-5)
  assert float(terms["loss_dense"]) == 0 and float(terms["loss_logit"]) == 0 and float(terms["distill_on"]) == 0
  loss, (terms, _) = loss_fn(state.params, state.batch_stats, jnp.int32(5), batch, teacher)
  np.testing.assert_allclose(float(terms["loss_dense"]), dense, rtol=1e-4)
  np.testing.assert_allclose(float(terms["loss_logit"]), logit, rtol=1e-4)
  np.testing.assert_allclose(float(loss), ce + 0.7 * dense + 0.4 * logit, rtol=1e-4)


@pytest.mark.slow
def test_train_py_trains_add_on_the_pairs_alone_then_eval_py_evaluates_the_student(tmp_path, repo_root):
  def run(args):
    done = subprocess.run([sys.executable, *args], cwd=repo_root, capture_output=True, text=True, timeout=1800,
                          env=env_with_xla_flags())
    assert done.returncode == 0, done.stderr[-5000:]

  workdir = tmp_path / "run"
  run(["train.py", "--config=configs/synthetic.py:smoke", "--config.stage=add", f"--workdir={workdir}",
       f"--config.data.synthetic.out={tmp_path / 'data'}", "--config.data.synthetic.paired_fraction=0.5",
       "--config.data.paired_batch_size=4", "--config.data.synthetic.lesions_per_class=10",
       "--config.data.synthetic.image_size=32", "--config.data.synthetic.images_per_lesion=2",
       "--config.data.image_size=32", "--config.data.group_size=4", "--config.data.eval_batch_size=16",
       "--config.train.num_steps=4", "--config.train.log_every_steps=1", "--config.train.eval_every_steps=4",
       "--config.train.checkpoint_every_steps=4", "--config.add.warmup_epochs=0",
       "--config.eval.bootstrap_samples=20", "--config.eval.num_cam_images=1"])
  assert os.path.isdir(workdir / "teacher" / "checkpoints" / "best")  # The NBI teacher was trained first.
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  train_rows = [r for r in rows if any(k.startswith("train/") and k != "train/epoch" for k in r)]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
  assert all("train/loss" not in r for r in train_rows)  # The pairs alone.
  assert all(r["train/paired/loss_dense"] > 0 and r["train/paired/loss_logit"] > 0 for r in train_rows)

  run(["eval.py", f"--workdir={workdir}"])
  with open(workdir / "eval" / "metrics.json") as f:
    report = json.load(f)
  assert report["stage"] == "add" and report["modality"] == "wli" and 0.0 <= report["auc"] <= 1.0
