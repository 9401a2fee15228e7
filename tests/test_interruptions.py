"""Training survives what shared machines do to it: kill -9 at a random step, SIGTERM, a non-finite loss, a rerun
with another config. Real train.py processes, real signals, real checkpoints."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pagkd_jax import checkpointing
from pagkd_jax.methods import classifier
from pagkd_jax.training import nonfinite
from pagkd_jax.training import trainer
from training_configs import tiny_synthetic_config

pytestmark = pytest.mark.slow

NUM_STEPS = 60


def _overrides(data_dir):
  """The smoke config shrunk to a teacher run of NUM_STEPS short steps, logging every step."""
  return [
      "--config=configs/synthetic.py:smoke", "--config.stage=teacher", f"--config.data.synthetic.out={data_dir}",
      "--config.data.synthetic.lesions_per_class=8", "--config.data.synthetic.image_size=32",
      "--config.data.synthetic.images_per_lesion=2", "--config.data.image_size=32", "--config.data.group_size=4",
      "--config.data.eval_batch_size=16", f"--config.train.num_steps={NUM_STEPS}", "--config.train.log_every_steps=1",
      "--config.train.eval_every_steps=20", "--config.train.checkpoint_every_steps=4",
      "--config.eval.bootstrap_samples=20", "--config.eval.num_cam_images=1",
  ]


def _command(workdir, data_dir):
  return [sys.executable, "train.py", f"--workdir={workdir}", *_overrides(data_dir)]


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu")


def _train(workdir, data_dir, repo_root):
  done = subprocess.run(_command(workdir, data_dir), cwd=repo_root, env=_env(), capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-4000:]
  return done


def _logged_step(workdir) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    steps = [json.loads(line)["step"] for line in f if line.endswith("\n")]
  return max(steps, default=0)


def _start_and_wait(workdir, data_dir, repo_root, step):
  """Starts train.py and returns the running process once it has logged `step`."""
  proc = subprocess.Popen(_command(workdir, data_dir), cwd=repo_root, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while _logged_step(workdir) < step:
    assert proc.poll() is None, f"train.py ended before step {step}: {proc.stderr.read()[-3000:]}"
    assert time.time() < deadline, "train.py made no progress"
    time.sleep(0.02)
  return proc


def _checkpoint(workdir, step=None):
  """(step, state) of the latest checkpoint (or of `step`), as numpy."""
  return checkpointing.read_latest_state(str(workdir), step)


def _metric_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, repo_root):
  """The reference: the same command run to the end without interruption."""
  root = tmp_path_factory.mktemp("interruptions")
  workdir = root / "uninterrupted"
  _train(workdir, root / "data", repo_root)
  return root, workdir


def test_kill_9_at_a_random_step_then_rerun_ends_exactly_like_an_uninterrupted_run(uninterrupted, repo_root):
  root, reference = uninterrupted
  kill_at = int(np.random.default_rng().integers(5, NUM_STEPS - 15))
  workdir = root / "killed"
  proc = _start_and_wait(workdir, root / "data", repo_root, kill_at)
  proc.kill()  # SIGKILL: no handler runs; a checkpoint may be half-written.
  proc.wait()
  killed_at = _logged_step(workdir)
  assert killed_at < NUM_STEPS, f"killed too late (step {killed_at})"
  where = f"killed at step {killed_at} (aimed at {kill_at})"

  # Whatever the kill interrupted, every checkpoint orbax lists restores.
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints", "latest")) as mgr:
    steps = mgr.all_steps()
  for step in steps:
    _checkpoint(workdir, step)
  resumed_from = max(steps, default=0)
  assert resumed_from <= killed_at, where

  again = _train(workdir, root / "data", repo_root)
  if resumed_from:
    assert f"Resumed from step {resumed_from}" in again.stderr
  step, state = _checkpoint(workdir)
  ref_step, ref_state = _checkpoint(reference)
  assert step == ref_step == NUM_STEPS, where
  for part in ("params", "batch_stats", "opt_state"):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, err_msg=f"{part}, {where}"), state[part],
                 ref_state[part])
  # metrics.jsonl holds every step once, with the uninterrupted run's losses.
  rows = {r["step"]: r for r in _metric_rows(workdir) if "train/loss" in r}
  ref_rows = {r["step"]: r for r in _metric_rows(reference) if "train/loss" in r}
  assert sorted(rows) == sorted(ref_rows) == list(range(1, NUM_STEPS + 1))
  assert len([r for r in _metric_rows(workdir) if "train/loss" in r]) == NUM_STEPS
  for s in rows:
    assert rows[s]["train/loss"] == pytest.approx(ref_rows[s]["train/loss"], rel=1e-6), (s, where)


def test_sigterm_saves_a_checkpoint_and_exits_then_rerun_resumes(uninterrupted, repo_root):
  root, reference = uninterrupted
  workdir = root / "terminated"
  proc = _start_and_wait(workdir, root / "data", repo_root, 6)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
  assert "Stopped by SIGTERM after step" in stderr and "Traceback" not in stderr
  stopped = int(stderr.split("Stopped by SIGTERM after step ")[1].split(";")[0])
  assert 6 <= stopped < NUM_STEPS
  step, _ = _checkpoint(workdir)
  assert step == stopped  # Saved at the step it stopped, not at the last multiple of checkpoint_every_steps.

  again = _train(workdir, root / "data", repo_root)
  assert f"Resumed from step {stopped}" in again.stderr
  _, state = _checkpoint(workdir)
  _, ref_state = _checkpoint(reference)
  jax.tree.map(np.testing.assert_array_equal, state["params"], ref_state["params"])


@dataclasses.dataclass(frozen=True)
class NaNAtStep(classifier.ClassifierProgram):
  """The teacher's program with its parameters turned to NaN just before update number `bad_step`, so that step's
  loss, gradients and new parameters are all NaN, as a diverging run's are."""

  bad_step: int = 5

  def make_update(self, model, tx, config, steps_per_epoch):
    inner = super().make_update(model, tx, config, steps_per_epoch)

    def update(state, batch):
      poison = jnp.where(state.step + 1 == self.bad_step, jnp.nan, 1.0)
      return inner(state.replace(params=jax.tree.map(lambda p: p * poison, state.params)), batch)

    return update


def _nan_config(data_dir, **train):
  config = tiny_synthetic_config(data_dir, num_steps=8)
  config.train.log_every_steps = 2
  config.train.checkpoint_every_steps = 3
  config.train.eval_every_steps = 100
  for k, v in train.items():
    config.train[k] = v
  return config


def test_nonfinite_loss_stops_naming_step_and_term_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  with pytest.raises(nonfinite.NonFiniteLossError, match=r"Non-finite loss at step 5: loss=nan, loss_cls=nan"):
    trainer.run_stage(_nan_config(tmp_path / "data"), workdir, NaNAtStep("nbi", bad_step=5))
  step, state = _checkpoint(workdir)
  assert step == 3  # The broken state of step 5 (or 6) was never saved.
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))
  assert max(r["step"] for r in _metric_rows(workdir)) <= 4


def test_nonfinite_steps_can_be_skipped(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  config = _nan_config(tmp_path / "data", on_nonfinite="skip", checkpoint_every_steps=1, keep_latest=10)
  trainer.run_stage(config, workdir, NaNAtStep("nbi", bad_step=5))
  assert "Skipped step 5: non-finite loss, loss_cls" in caplog.text
  states = {s: _checkpoint(workdir, s)[1] for s in (4, 5, 6, 8)}
  assert int(states[5]["step"]) == 5
  for part in ("params", "batch_stats", "opt_state"):  # Step 5 changed nothing but the counter...
    jax.tree.map(np.testing.assert_array_equal, states[5][part], states[4][part])
  assert not np.array_equal(states[6]["params"]["fc"]["kernel"], states[5]["params"]["fc"]["kernel"])  # ...6 did.
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(states[8]["params"]))
  rows = [r for r in _metric_rows(workdir) if "train/skipped_steps" in r]
  assert sum(r["train/skipped_steps"] for r in rows) == 1
  assert all(r["train/loss"] is not None for r in rows)  # Means over the steps that were not skipped.


def test_resuming_with_another_config_is_refused_by_name(tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_synthetic_config(tmp_path / "data", num_steps=3)
  trainer.train_and_evaluate(config, workdir)
  changed = tiny_synthetic_config(tmp_path / "data", num_steps=3)
  changed.model.name = "resnet18"
  changed.optim.learning_rate = 0.5
  with pytest.raises(ValueError, match=r"another configuration \(model.name: 'tiny' -> 'resnet18'; "
                                       r"optim.learning_rate: 0.003 -> 0.5\)"):
    trainer.train_and_evaluate(changed, workdir)
  longer = tiny_synthetic_config(tmp_path / "data", num_steps=5)  # Training longer is a resume.
  trainer.train_and_evaluate(longer, workdir)
  assert _checkpoint(workdir)[0] == 5
