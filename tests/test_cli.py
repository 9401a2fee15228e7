"""train.py and eval.py as a user runs them: real processes, real files, command-line overrides."""

import json
import os
import subprocess
import sys


def _run(args, repo_root, env=None):
  result = subprocess.run([sys.executable, *args], cwd=repo_root, capture_output=True, text=True, timeout=1200,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})))
  assert result.returncode == 0, result.stderr[-5000:]
  return result


def test_two_stage_training_then_evaluation_from_the_command_line(tmp_path, repo_root):
  workdir = tmp_path / "run"
  overrides = [
      f"--config.data.synthetic.out={tmp_path / 'data'}",
      "--config.data.synthetic.lesions_per_class=8", "--config.data.synthetic.image_size=32",
      "--config.data.synthetic.images_per_lesion=2", "--config.data.image_size=32", "--config.data.group_size=4",
      "--config.data.eval_batch_size=16", "--config.train.num_steps=4", "--config.train.log_every_steps=2",
      "--config.train.eval_every_steps=2", "--config.train.checkpoint_every_steps=2",
      "--config.distill.warmup_epochs=0", "--config.distill.lambda_pro=0.5",
      "--config.distill.thresholds=(0.8, 0.2)", "--config.eval.bootstrap_samples=20",
      "--config.eval.num_cam_images=2",
  ]
  train = _run(["train.py", "--config=configs/synthetic.py:smoke", f"--workdir={workdir}", *overrides], repo_root)
  assert "img/s" in train.stderr and "ETA" in train.stderr  # The console progress line.

  config = json.load(open(workdir / "config.json"))
  assert config["stage"] == "pagkd" and config["distill"]["lambda_pro"] == 0.5
  assert config["distill"]["thresholds"] == [0.8, 0.2]
  teacher_config = json.load(open(workdir / "teacher" / "config.json"))
  assert teacher_config["stage"] == "teacher"

  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  distill_rows = [r for r in rows if "train/loss_pro" in r]
  assert distill_rows and all(r["train/loss_pro"] > 0 and r["train/loss_den"] > 0 for r in distill_rows)
  for d in (workdir, workdir / "teacher"):
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(d / "tensorboard"))

  _run(["eval.py", f"--workdir={workdir}"], repo_root)
  report = json.load(open(workdir / "eval" / "metrics.json"))
  assert report["stage"] == "pagkd" and report["modality"] == "wli"
  assert 0.0 <= report["auc"] <= 1.0 and report["ci95"]["auc"][0] <= report["ci95"]["auc"][1]
  assert sorted(os.listdir(workdir / "eval" / "cams")) == ["cam_000.png", "cam_001.png"]

  # A second run of the same command finds both stages finished and trains nothing more.
  again = _run(["train.py", "--config=configs/synthetic.py:smoke", f"--workdir={workdir}", *overrides], repo_root)
  assert "Resumed from step 4" in again.stderr
  assert len([json.loads(line) for line in open(workdir / "metrics.jsonl")]) == len(rows)
