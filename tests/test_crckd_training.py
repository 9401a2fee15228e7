"""CRCKD as a training method (pagkd_jax/methods/crckd.py): train.py then eval.py on real synthetic files, the
schedule of the spec in the logged weights, the banks sized and labelled from the training split, a kill -9 and rerun
equal to the uninterrupted run bitwise (banks and teacher included), and one update on 1 and 8 devices."""

import csv
import json
import os
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from pagkd_jax import checkpointing
from pagkd_jax.distill import crckd
from subprocess_env import env_with_xla_flags, run_on_host_devices

pytestmark = pytest.mark.slow

NUM_STEPS = 8
START_EPOCH = 1  # crckd.mean_teacher_start_epoch here: both parts of the schedule in a few steps.
RAMPUP_EPOCHS = 3.0


def _overrides(data_dir):
  """configs/synthetic.py:smoke shrunk to NUM_STEPS steps of the tiny model at 32 px, logging every step."""
  return [
      "--config=configs/synthetic.py:smoke", "--config.stage=crckd", f"--config.data.synthetic.out={data_dir}",
      "--config.data.synthetic.lesions_per_class=8", "--config.data.synthetic.image_size=32",
      "--config.data.synthetic.images_per_lesion=2", "--config.data.image_size=32", "--config.data.group_size=4",
      "--config.data.eval_batch_size=16", f"--config.train.num_steps={NUM_STEPS}", "--config.train.log_every_steps=1",
      "--config.train.eval_every_steps=4", "--config.train.checkpoint_every_steps=2", "--config.train.keep_latest=8",
      f"--config.crckd.mean_teacher_start_epoch={START_EPOCH}",
      f"--config.crckd.consistency_rampup_epochs={RAMPUP_EPOCHS}", "--config.crckd.num_negatives=64",
      "--config.eval.bootstrap_samples=20", "--config.eval.num_cam_images=2",
  ]


def _run(args, repo_root):
  done = subprocess.run([sys.executable, *args], cwd=repo_root, env=env_with_xla_flags(), capture_output=True,
                        text=True, timeout=3000)
  assert done.returncode == 0, done.stderr[-5000:]
  return done


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, repo_root):
  root = tmp_path_factory.mktemp("crckd")
  workdir = root / "run"
  done = _run(["train.py", f"--workdir={workdir}", *_overrides(root / "data")], repo_root)
  return root, workdir, done


def test_train_py_trains_crckd_and_eval_py_evaluates_the_student(trained, repo_root):
  root, workdir, done = trained
  config = json.load(open(workdir / "config.json"))
  assert config["stage"] == "crckd" and config["crckd"]["num_positives"] == crckd.DEFAULTS.num_positives
  # The training split has fewer than P = 20 images per class: said once, naming the classes.
  assert done.stderr.count("fewer training images than crckd.num_positives=20 in class") == 1
  rows = [r for r in _rows(workdir) if "train/loss" in r]
  assert [r["step"] for r in rows] == list(range(1, NUM_STEPS + 1))
  for r in rows:
    for term in ("loss_cls", "loss_ccd", "loss_crp", "loss_consistency"):
      assert np.isfinite(r[f"train/{term}"]) and r[f"train/{term}"] >= 0, (term, r)
    assert r["train/loss_ccd"] > 0

  # The banks: one row per training WLI image (splits.csv, in its order), labelled with its class.
  with open(workdir / "splits.csv", newline="") as f:
    train_wli = [row for row in csv.DictReader(f) if row["split"] == "train" and row["modality"] == "wli"]
  step, state = checkpointing.read_latest_state(str(workdir))
  assert step == NUM_STEPS
  classes = config["data"]["classes"]
  np.testing.assert_array_equal(state["banks"]["labels"], [classes.index(r["label"]) for r in train_wli])
  assert state["banks"]["student"].shape == state["banks"]["teacher"].shape == (len(train_wli), 128)
  assert np.all(state["banks"]["normalizers"] > 0)  # Z fixed at the first batch.
  # The teacher has the student's structure and is not the student (an average of its past).
  jax.tree.map(lambda a, b: None if a.shape == b.shape else pytest.fail("shapes"), state["teacher"]["params"],
               state["params"]["student"])
  assert not np.array_equal(state["teacher"]["params"]["fc"]["kernel"], state["params"]["student"]["fc"]["kernel"])
  assert "embed" in state["params"]["student"] and state["params"]["student"]["embed"]["kernel"].shape[1] == 128

  # The best checkpoint holds the student alone, which eval.py builds from config.json.
  best = checkpointing.read_best_variables(str(workdir), checkpointing.best_checkpoint_step(str(workdir)))
  assert set(best) == {"params", "batch_stats"} and "embed" in best["params"]
  _run(["eval.py", f"--workdir={workdir}"], repo_root)
  report = json.load(open(workdir / "eval" / "metrics.json"))
  assert report["stage"] == "crckd" and report["modality"] == "wli" and 0.0 <= report["auc"] <= 1.0
  assert sorted(os.listdir(workdir / "eval" / "cams")) == ["cam_000.png", "cam_001.png"]


def test_logged_loss_weights_follow_the_spec_schedule(trained):
  """Update s (from 1) is in epoch (s - 1) // steps_per_epoch: CE + 0.1 CCD before crckd.mean_teacher_start_epoch,
  then also the ramped consistency and CRP."""
  _, workdir, _ = trained
  rows = [r for r in _rows(workdir) if "train/loss" in r]
  steps_per_epoch = round(rows[0]["step"] / rows[0]["train/epoch"])
  assert START_EPOCH * steps_per_epoch < NUM_STEPS  # The run reaches the second part.
  for r in rows:
    epoch = (r["step"] - 1) // steps_per_epoch
    expected = crckd.loss_weights(epoch, consistency_rampup_epochs=RAMPUP_EPOCHS, mean_teacher_start_epoch=START_EPOCH)
    for name in ("consistency", "ccd", "crp"):
      assert r[f"train/weight_{name}"] == pytest.approx(float(expected[name]), rel=1e-6), (r["step"], name)
    if epoch < START_EPOCH:
      assert r["train/weight_consistency"] == r["train/weight_crp"] == 0.0 and r["train/weight_ccd"] == pytest.approx(0.1)
    else:
      assert r["train/weight_crp"] == 1.0
      assert r["train/weight_consistency"] == pytest.approx(np.exp(-5 * (1 - epoch / RAMPUP_EPOCHS) ** 2), rel=1e-6)
    total = (r["train/loss_cls"] + r["train/weight_consistency"] * r["train/loss_consistency"]
             + r["train/weight_ccd"] * r["train/loss_ccd"] + r["train/weight_crp"] * r["train/loss_crp"])
    assert r["train/loss"] == pytest.approx(total, rel=1e-5)


def _logged_step(workdir) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return max((json.loads(line)["step"] for line in f if line.endswith("\n")), default=0)


def test_kill_9_then_rerun_equals_the_uninterrupted_run_bitwise_banks_and_teacher_included(trained, repo_root):
  root, reference, _ = trained
  workdir = root / "killed"
  command = [sys.executable, "train.py", f"--workdir={workdir}", *_overrides(root / "data")]
  proc = subprocess.Popen(command, cwd=repo_root, env=env_with_xla_flags(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 2400
  while _logged_step(workdir) < 3:
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() < deadline, "train.py made no progress"
    time.sleep(0.05)
  proc.kill()  # SIGKILL after step 3: the checkpoint of step 2 (or of step 4, if it got that far) is the latest.
  proc.wait()
  killed_at = _logged_step(workdir)
  assert killed_at < NUM_STEPS, f"killed too late (step {killed_at})"
  resumed_from = checkpointing.latest_checkpoint_step(str(workdir))
  again = _run(command[1:], repo_root)
  if resumed_from:
    assert f"Resumed from step {resumed_from}" in again.stderr
  step, state = checkpointing.read_latest_state(str(workdir))
  ref_step, ref_state = checkpointing.read_latest_state(str(reference))
  assert step == ref_step == NUM_STEPS
  assert set(state) == {"step", "params", "batch_stats", "opt_state", "teacher", "banks"}
  for part in ("params", "batch_stats", "opt_state", "teacher", "banks"):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, err_msg=f"{part}, killed at {killed_at}"),
                 state[part], ref_state[part])
  # The banks moved during training: the comparison is not between two initial banks.
  _, early = checkpointing.read_latest_state(str(reference), 2)
  assert not np.array_equal(early["banks"]["student"], ref_state["banks"]["student"])


EIGHT_DEVICES = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    assert jax.device_count() == 8, jax.devices()
    from pagkd_jax import base_config, experiment, mesh as mesh_lib
    from pagkd_jax.data import class_groups
    from pagkd_jax.methods import crckd as crckd_method
    from pagkd_jax.training import optimizer

    # As test_data_parallel.py: the two device counts sum float32 terms in different orders; the tolerances are a
    # few eps32 times the terms' count, far below what a per-device BatchNorm, a bank updated per device or a draw
    # that depends on the sharding would change.
    LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4
    config = base_config.get_config()
    config.stage = "crckd"
    config.model.name = "tiny"
    config.data.image_size = S = 16
    config.crckd.num_negatives = 16
    config.crckd.mean_teacher_start_epoch = 0  # Every term on.
    C, K, N, STEPS = 3, 8, 40, 2
    config.data.classes = ("a", "b", "c")
    model = experiment.build_model(config)
    rng = np.random.default_rng(0)
    row_labels = np.concatenate([np.full(n, c) for c, n in enumerate((10, 14, 16))])
    members = [np.flatnonzero(row_labels == c) for c in range(C)]
    batches = []
    for _ in range(STEPS):
      rows = np.stack([rng.choice(members[c], K, replace=False) for c in range(C)]).astype(np.int32)
      batches.append({"wli": rng.integers(0, 256, (C, K, S, S, 3), dtype=np.uint8),
                      "wli_view2": rng.integers(0, 256, (C, K, S, S, 3), dtype=np.uint8), "wli_row": rows,
                      "label": np.arange(C, dtype=np.int32)})
    program = crckd_method.CRCKDProgram(row_labels=tuple(int(l) for l in row_labels))
    tx = optimizer.make_optimizer(config.optim, total_steps=10, steps_per_epoch=5)

    def run(devices):
      mesh = mesh_lib.make_mesh(devices)
      rep, grp = mesh_lib.replicated(mesh), mesh_lib.group_batch_sharding(mesh)
      state = jax.jit(lambda r: program.init_state(model, tx, r, config), out_shardings=rep)(jax.random.key(0))
      keys = class_groups.group_keys(("wli",), **program.batch_options)
      shardings = {k: grp for k in keys}
      shardings["label"] = rep
      update = jax.jit(program.make_update(model, tx, config, 5), in_shardings=(rep, shardings),
                       out_shardings=(rep, rep), donate_argnums=0)
      losses = []
      for b in batches:
        batch = {k: mesh_lib.global_array(v, shardings[k], v.shape) for k, v in b.items()}
        state, m = update(state, batch)
        losses.append({k: float(v) for k, v in m.items()})
      return jax.device_get(state), losses

    s1, l1 = run(jax.devices()[:1])
    s8, l8 = run(jax.devices())
    for a, b in zip(l1, l8):
      for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=LOSS_RTOL, atol=1e-6, err_msg=k)
    # The banks: the same rows updated, to the same values (replicated, one update of the global batch's rows).
    np.testing.assert_array_equal(s1.banks.labels, s8.banks.labels)
    for side in ("student", "teacher"):
      a, b = getattr(s1.banks, side), getattr(s8.banks, side)
      np.testing.assert_allclose(b, a, rtol=0, atol=1e-4, err_msg=side)
    np.testing.assert_allclose(s8.banks.normalizers, s1.banks.normalizers, rtol=1e-5)
    # Adam moves an element whose gradient is near zero by up to a learning-rate step either way
    # (test_data_parallel.py): parameters within 2 * STEPS * lr, and so the teacher (their average) and the BatchNorm
    # statistics of the second step (computed with them) within that plus the summation-order tolerance.
    lr = config.optim.learning_rate
    for name, t1, t8 in (("params", s1.params, s8.params), ("teacher", s1.teacher, s8.teacher),
                         ("batch_stats", s1.batch_stats, s8.batch_stats)):
      for a, b in zip(jax.tree.leaves(t1), jax.tree.leaves(t8)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        bound = 2 * STEPS * lr + GRAD_RTOL * max(np.max(np.abs(a)), 1e-6)
        assert np.all(np.abs(a - b) <= bound), (name, np.max(np.abs(a - b)), bound)
    # Training moved the teacher: the comparison is not between two initialisations.
    init = jax.device_get(jax.jit(lambda r: program.init_state(model, tx, r, config))(jax.random.key(0)))
    assert not np.allclose(init.teacher["params"]["fc"]["kernel"], s8.teacher["params"]["fc"]["kernel"])
    assert not np.allclose(init.banks.student, s8.banks.student)
    print("OK", l1[-1]["loss"], l8[-1]["loss"])
""")


def test_crckd_update_on_one_and_eight_devices_agrees(repo_root):
  run_on_host_devices(EIGHT_DEVICES, repo_root, timeout=3000)
