"""Multi-host training for real: two train.py processes on 127.0.0.1 joined by jax.distributed (CPU collectives),
one CPU device each, against one process with two devices (PaGKD's two stages, and CRCKD). Then the checkpoints are evaluated on other device
counts than they were written with."""

import json
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from pagkd_jax import checkpointing
from subprocess_env import env_with_xla_flags

pytestmark = [pytest.mark.slow, pytest.mark.numerics]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int):
  return env_with_xla_flags(f"--xla_force_host_platform_device_count={devices}")


def _train_args(workdir, data_dir, *extra):
  """Both stages (teacher, then the PaGKD student with distillation from step 1) of the smoke config, shrunk;
  `extra` overrides after them (another stage)."""
  return [
      sys.executable, "train.py", "--config=configs/synthetic.py:smoke", f"--workdir={workdir}",
      f"--config.data.synthetic.out={data_dir}", "--config.data.synthetic.lesions_per_class=8",
      "--config.data.synthetic.image_size=32", "--config.data.synthetic.images_per_lesion=2",
      "--config.data.image_size=32", "--config.data.group_size=4", "--config.data.eval_batch_size=16",
      "--config.train.num_steps=4", "--config.train.log_every_steps=2", "--config.train.eval_every_steps=2",
      "--config.train.checkpoint_every_steps=2", "--config.distill.warmup_epochs=0",
      "--config.distill.thresholds=(0.8, 0.2)", "--config.eval.bootstrap_samples=20",
      "--config.eval.num_cam_images=2", *extra,
  ]


# CRCKD with every loss on from the first step: the EMA teacher and both memory banks cross the processes too.
CRCKD = ("--config.stage=crckd", "--config.crckd.mean_teacher_start_epoch=0", "--config.crckd.num_negatives=32")


def _errors(stderr: str) -> str:
  """The informative end of a failed process's stderr (without the extension-module list of a fatal error)."""
  lines = [line for line in stderr.splitlines() if not line.startswith("Extension modules:")]
  return "\n".join(lines[-80:])[-6000:]


def _one_and_two_processes(root, data_dir, repo_root, *extra) -> None:
  """The same run in ROOT/one_process (one process, two devices) and ROOT/two_processes (two, one device each)."""
  one = subprocess.run(_train_args(root / "one_process", data_dir, *extra), cwd=repo_root, env=_env(2),
                       capture_output=True, text=True, timeout=900)
  assert one.returncode == 0, one.stderr[-4000:]
  assert "steps on 2 devices" in one.stderr

  port = _free_port()
  procs = [subprocess.Popen(_train_args(root / "two_processes", data_dir, *extra) + [
      f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=repo_root, env=_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
  errs = [p.communicate(timeout=900)[1] for p in procs]
  for i, (p, err) in enumerate(zip(procs, errs)):
    assert p.returncode == 0, f"process {i}: {_errors(err)}"
  assert "Process 1 of 2; 1 local and 2 global devices" in errs[1]
  assert "steps on 2 devices" in errs[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, repo_root):
  root = tmp_path_factory.mktemp("multiprocess")
  _one_and_two_processes(root, root / "data", repo_root)
  return root


@pytest.fixture(scope="module")
def crckd_runs(tmp_path_factory, runs, repo_root):
  root = tmp_path_factory.mktemp("multiprocess_crckd")
  _one_and_two_processes(root, runs / "data", repo_root, *CRCKD)
  return root


@pytest.mark.parametrize("stage_dir", ["teacher", "."])
def test_two_processes_end_with_the_parameters_of_one_process_with_two_devices(runs, stage_dir):
  step_1, one = checkpointing.read_latest_state(runs / "one_process" / stage_dir)
  step_2, two = checkpointing.read_latest_state(runs / "two_processes" / stage_dir)
  assert step_1 == step_2 == 4
  # Both runs execute the same per-device program on the same shards, and the one sum that crosses the process
  # boundary has two terms (a + b == b + a in floating point): the results agree bit for bit (measured so under
  # AVX-512 and AVX2), so any difference is a real one (a wrong reduction, a shard read twice).
  for part in ("params", "batch_stats"):
    jax.tree.map(np.testing.assert_array_equal, two[part], one[part])
  # Only process 0 writes the logs, once per step.
  rows = [json.loads(line) for line in open(runs / "two_processes" / stage_dir / "metrics.jsonl")]
  assert [r["step"] for r in rows if "train/loss" in r] == [2, 4]


def test_crckd_in_two_processes_ends_as_in_one_process_with_two_devices(crckd_runs):
  """CRCKD's state beyond the model: the EMA teacher and the memory banks, whose rows of a global batch are gathered
  from both processes and updated once, must end as in one process (bit for bit, as above)."""
  step_1, one = checkpointing.read_latest_state(crckd_runs / "one_process")
  step_2, two = checkpointing.read_latest_state(crckd_runs / "two_processes")
  assert step_1 == step_2 == 4
  assert {"teacher", "banks"} <= set(one)
  for part in ("params", "batch_stats", "teacher", "banks"):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, err_msg=part), two[part], one[part])
  rows = [json.loads(line) for line in open(crckd_runs / "two_processes" / "metrics.jsonl")]
  assert [r["step"] for r in rows if "train/loss" in r] == [2, 4]
  assert all(r["train/loss_ccd"] > 0 and r["train/loss_crp"] >= 0 for r in rows if "train/loss" in r)


def test_checkpoints_evaluate_on_another_number_of_devices(runs, repo_root):
  """Written by 2 devices (in one process, or in two), evaluated by 1 and by 3: restored onto the new layout."""
  reports = {}
  for workdir, devices in ((runs / "one_process", 1), (runs / "two_processes", 1), (runs / "one_process", 3)):
    done = subprocess.run([sys.executable, "eval.py", f"--workdir={workdir}"], cwd=repo_root,
                          env=_env(devices), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    reports[(workdir.name, devices)] = json.load(open(workdir / "eval" / "metrics.json"))
  a, b, c = reports[("one_process", 1)], reports[("two_processes", 1)], reports[("one_process", 3)]
  assert 0.0 <= a["auc"] <= 1.0 and a["n_images"] == c["n_images"]
  # Other device counts batch the same per-image inference differently: the scores may move by float32 rounding,
  # but AUC and accuracy change only when two scores swap order (an AUC step is 1 / (positives * negatives) ~ 1e-3
  # here), so the reports agree exactly up to the float64 rounding of the AUC's sums.
  assert a["auc"] == pytest.approx(b["auc"], abs=1e-6) and a["accuracy"] == b["accuracy"]
  assert a["auc"] == pytest.approx(c["auc"], abs=1e-6) and a["accuracy"] == c["accuracy"]
