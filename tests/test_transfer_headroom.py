"""scripts/transfer_headroom.py: its commands, and one real CI-sized run (generic pretraining, then baseline and
oracle from it on the same test images, the JSON against eval.py's reports)."""

import json
import os
import subprocess
import sys

import pytest

from training_configs import REPO_ROOT, load_script


headroom = load_script("transfer_headroom")


def test_commands_share_the_pretrained_start(tmp_path):
  runs = headroom.run_commands(tmp_path, 3, from_scratch=False, smoke=False, overrides=["--config.x=1"])
  assert list(runs) == ["pretrain", "baseline", "oracle"]
  assert runs["pretrain"][0] == "--config=configs/transfer.py:pretrain"
  assert runs["baseline"][:2] == ["--config=configs/transfer.py", "--config.stage=baseline"]
  assert runs["oracle"][0] == "--config=configs/transfer.py:oracle"
  init = f"--config.model.init_from={tmp_path / 'seed3' / 'pretrain'}"
  for name in ("baseline", "oracle"):
    assert init in runs[name] and f"--workdir={tmp_path / 'seed3' / name}" in runs[name]
  assert all(args[-2:] == ["--config.seed=3", "--config.x=1"] for args in runs.values())
  scratch = headroom.run_commands(tmp_path, 0, from_scratch=True, smoke=True, overrides=[])
  assert list(scratch) == ["baseline", "oracle"]
  assert scratch["baseline"][0] == "--config=configs/transfer.py:smoke"
  assert scratch["oracle"][0] == "--config=configs/transfer.py:oracle,smoke"
  assert not any("init_from" in a for args in scratch.values() for a in args)
  placed = headroom.run_commands(tmp_path, 0, from_scratch=False, smoke=True, overrides=[], data_root=str(tmp_path))
  outs = [a.split("=", 1)[1] for args in placed.values() for a in args if a.startswith("--config.data.synthetic.out")]
  assert len(set(outs)) == 3 and all(os.path.dirname(o) == str(tmp_path) for o in outs)


def _run(args, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
                        env=env)


def test_smoke_headroom_run_from_the_pretrained_backbone(tmp_path):
  """The whole check on CI-sized data: the generic pretraining, baseline and oracle started from it, both tested on
  the same WLI images; a rerun trains nothing."""
  root = tmp_path / "runs"
  args = ["scripts/transfer_headroom.py", f"--root={root}", f"--data_root={tmp_path / 'data'}", "--seed=1", "--smoke"]
  result = _run(args, tmp_path)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  report = json.loads((root / "seed1" / "headroom.json").read_text())
  pretrain = json.loads((root / "seed1" / "pretrain" / "config.json").read_text())
  assert pretrain["stage"] == "baseline" and len(pretrain["data"]["classes"]) == 10
  assert pretrain["data"]["synthetic"]["task"] == "generic" and pretrain["seed"] == 1
  for name in ("baseline", "oracle"):
    metrics = json.loads((root / "seed1" / name / "eval" / "metrics.json").read_text())
    assert report[name]["auc"] == metrics["auc"] and metrics["modality"] == "wli"
    assert metrics["n_images"] == 3 * 3  # 3 classes x 3 test lesions x 1 view.
    config = json.loads((root / "seed1" / name / "config.json").read_text())
    assert config["stage"] == "baseline" and config["seed"] == 1
    assert config["model"]["init_from"] == str(root / "seed1" / "pretrain")
    assert "Backbone initialised from" in (root / "seed1" / name / "headroom_train.log").read_text()
  assert report["difference"] == pytest.approx(report["oracle"]["auc"] - report["baseline"]["auc"])
  assert report["met"] == (report["difference"] >= 0.10) and report["same_wli_test_images"] == 9
  assert report["from_scratch"] is False and set(report["commands"]) == {"pretrain", "baseline", "oracle"}
  oracle_config = json.loads((root / "seed1" / "oracle" / "config.json").read_text())
  assert oracle_config["data"]["synthetic"]["wli_lesions_per_class"] == 20
  again = _run(args, tmp_path)
  assert again.returncode == 0 and again.stdout.count("[skip]") == 3 and "[run ]" not in again.stdout
