"""scripts/ablations.py: the mean / std table from per-run record files against NumPy, and one tiny real run."""

import importlib.metadata
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from training_configs import REPO_ROOT, load_script

from pagkd_jax import methods


ablations = load_script("ablations")

# Test metrics per (arm, seed), as eval.py would report them.
_VALUES = {
    ("baseline", 0): (0.80, 0.70, 0.69), ("baseline", 1): (0.84, 0.66, 0.65), ("baseline", 2): (0.79, 0.71, 0.70),
    ("pro_den_paper", 0): (0.83, 0.72, 0.71), ("pro_den_paper", 1): (0.82, 0.70, 0.66),
    ("pro_den_paper", 2): (0.88, 0.75, 0.74),
    ("teacher", 0): (0.97, 0.92, 0.92), ("teacher", 1): (0.95, 0.90, 0.89), ("teacher", 2): (0.96, 0.93, 0.93),
    ("den_only", 1): (0.86, 0.74, 0.73),  # One seed only: no standard deviation.
}
# The second reference arm (stage 2 without distillation), run for two seeds only.
_CONTROL = {("no_distill", 0): (0.81, 0.69, 0.68), ("no_distill", 2): (0.85, 0.73, 0.72)}


def _write_records(root):
  for (arm, seed), values in _VALUES.items():
    d = root / f"seed{seed}" / arm
    d.mkdir(parents=True)
    record = {"arm": arm, "seed": seed, "title": arm, "train_s": 10.0 * seed + 1, "eval_s": 1.0,
              "test": dict(zip(ablations.METRICS, values))}
    (d / ablations.RUN_RECORD).write_text(json.dumps(record))


def test_aggregate_matches_numpy_mean_and_sample_std(tmp_path):
  _write_records(tmp_path)
  summary = ablations.aggregate(ablations.read_records(tmp_path))
  assert list(summary) == ["teacher", "baseline", "den_only", "pro_den_paper"]  # The runner's arm order.
  for arm in ("teacher", "baseline", "pro_den_paper"):
    for i, metric in enumerate(ablations.METRICS):
      x = np.array([_VALUES[(arm, s)][i] for s in range(3)])
      entry = summary[arm][metric]
      np.testing.assert_allclose(entry["mean"], x.sum() / 3, rtol=1e-12)
      np.testing.assert_allclose(entry["std"], np.sqrt(np.sum((x - x.mean()) ** 2) / 2), rtol=1e-12)
      assert entry["n"] == 3
  # Paired differences to the baseline, seed by seed.
  for i, metric in enumerate(ablations.METRICS):
    diff = np.array([_VALUES[("pro_den_paper", s)][i] - _VALUES[("baseline", s)][i] for s in range(3)])
    entry = summary["pro_den_paper"]["minus_baseline"][metric]
    np.testing.assert_allclose(entry["mean"], diff.mean(), rtol=1e-12)
    np.testing.assert_allclose(entry["std"], diff.std(ddof=1), rtol=1e-12)
  assert "minus_baseline" not in summary["teacher"] and "minus_baseline" not in summary["baseline"]
  # A single seed: its value, no std, and a paired difference over the one common seed.
  one = summary["den_only"]
  assert one["auc"]["mean"] == pytest.approx(0.86) and one["auc"]["std"] is None and one["seeds"] == [1]
  assert one["minus_baseline"]["auc"]["mean"] == pytest.approx(0.86 - 0.84)
  np.testing.assert_allclose(summary["baseline"]["train_s"]["mean"], np.mean([1.0, 11.0, 21.0]))


def test_markdown_table_shows_mean_plus_minus_std(tmp_path):
  _write_records(tmp_path)
  table = ablations.markdown_table(ablations.aggregate(ablations.read_records(tmp_path)))
  lines = table.strip().splitlines()
  assert len(lines) == 2 + 4
  auc = np.array([_VALUES[("pro_den_paper", s)][0] for s in range(3)])
  diff = auc - np.array([_VALUES[("baseline", s)][0] for s in range(3)])
  row = next(line for line in lines if "`pro_den_paper`" in line)
  assert f"{auc.mean():.3f} ± {auc.std(ddof=1):.3f}" in row
  assert f"{diff.mean():+.3f} ± {diff.std(ddof=1):.3f} (3)" in row
  assert "no_distill" not in lines[0]  # Only references that were run get a column.
  assert "| 0.860 |" in next(line for line in lines if "`den_only`" in line)
  assert "| training data |" in lines[0] and "| WLI + NBI, unpaired |" in row
  assert "| WLI |" in next(line for line in lines if "`baseline`" in line)


def test_each_arm_says_what_it_trains_on():
  data = {arm: ablations.training_data(arm) for arm in ablations.ARMS}
  assert data["teacher"] == data["teacher_shuffled"] == "NBI"
  assert data["baseline"] == data["oracle"] == data["crckd"] == "WLI"
  assert data["pagkd_all"] == "D_p + D_unp"
  assert data["kd"] == data["fitnets"] == data["add"] == "D_p"
  assert data["kd_unpaired"] == data["add_unpaired"] == data["pro_den_paper"] == "WLI + NBI, unpaired"
  assert ablations.training_data("not_an_arm") == "-"


def test_paired_difference_to_the_control_uses_the_common_seeds(tmp_path):
  _write_records(tmp_path)
  for (arm, seed), values in _CONTROL.items():
    d = tmp_path / f"seed{seed}" / arm
    d.mkdir(parents=True)
    (d / ablations.RUN_RECORD).write_text(json.dumps(
        {"arm": arm, "seed": seed, "train_s": 1.0, "eval_s": 1.0, "test": dict(zip(ablations.METRICS, values))}))
  summary = ablations.aggregate(ablations.read_records(tmp_path))
  diff = np.array([_VALUES[("pro_den_paper", s)][0] - _CONTROL[("no_distill", s)][0] for s in (0, 2)])
  entry = summary["pro_den_paper"]["minus_no_distill"]["auc"]
  assert entry["n"] == 2
  np.testing.assert_allclose([entry["mean"], entry["std"]], [diff.mean(), diff.std(ddof=1)], rtol=1e-12)
  assert "minus_no_distill" not in summary["den_only"]  # Seed 1 only: no common seed with the control.
  control = summary["no_distill"]["minus_baseline"]["auc"]
  np.testing.assert_allclose(control["mean"], np.mean([0.81 - 0.80, 0.85 - 0.79]), rtol=1e-12)
  header = ablations.markdown_table(summary).splitlines()[0]
  assert "AUC - baseline (paired, seeds)" in header and "AUC - no_distill (paired, seeds)" in header


def test_bad_or_duplicate_records_are_named(tmp_path):
  _write_records(tmp_path)
  bad = tmp_path / "seed0" / "baseline" / ablations.RUN_RECORD
  bad.write_text(json.dumps({"arm": "baseline", "seed": 0, "test": {"auc": 0.8}}))
  with pytest.raises(ValueError, match=str(bad)):
    ablations.read_records(tmp_path)
  records = [{"arm": "baseline", "seed": 0, "test": dict.fromkeys(ablations.METRICS, 0.5)}] * 2
  with pytest.raises(ValueError, match="Two records for arm 'baseline', seed 0"):
    ablations.aggregate(records)


def test_epoch_scaling_and_teacher_reuse(tmp_path):
  config = ablations.load_preset("configs/synthetic.py")
  assert ablations.epoch_overrides(config, 1.0) == []
  scaled = ablations.epoch_overrides(config, 0.5)
  assert scaled == [f"--config.train.epochs={config.train.epochs / 2:g}",
                    f"--config.distill.warmup_epochs={config.distill.warmup_epochs / 2:g}",
                    f"--config.optim.warmup_epochs={config.optim.warmup_epochs / 2:g}"]
  with pytest.raises(ValueError, match="epochs_scale"):
    ablations.epoch_overrides(config, 0.0)
  args = ablations.train_args(ablations.ARMS["image_level"], 2, tmp_path, "configs/synthetic.py", ["--x=1"])
  assert f"--config.teacher.workdir={tmp_path / 'seed2' / 'teacher'}" in args
  assert "--config.distill.level=image" in args and "--config.seed=2" in args and "--config.stage=pagkd" in args
  teacher = ablations.train_args(ablations.ARMS["teacher"], 2, tmp_path, "configs/synthetic.py", [])
  assert "--config.stage=teacher" in teacher and not any("teacher.workdir" in a for a in teacher)


def test_arm_sets_teachers_presets_and_pretraining(tmp_path):
  names = lambda arms: [a.name for a in arms]
  assert names(ablations.resolve_arms(["ablations"])) == list(ablations.ARM_SETS["ablations"])
  assert names(ablations.resolve_arms(["pro_only"])) == ["teacher", "pro_only"]
  assert names(ablations.resolve_arms(["crckd"])) == ["crckd"]  # WLI only: no NBI teacher.
  crckd = ablations.train_args(ablations.ARMS["crckd"], 1, tmp_path, "configs/transfer.py", [])
  assert "--config.stage=crckd" in crckd and not any("teacher.workdir" in a for a in crckd)
  assert all(a.stage in methods.METHODS for a in ablations.ARMS.values())  # Every arm trains a known method.
  arms = names(ablations.resolve_arms(["neg_shuffled_teacher", "baseline", "baseline"]))
  assert arms == ["teacher_shuffled", "neg_shuffled_teacher", "baseline"]  # Its own teacher; no duplicates.
  transfer = names(ablations.resolve_arms(["transfer"]))
  paired_only = {name for name, arm in ablations.ARMS.items() if arm.needs_pairs}
  assert paired_only == {"pagkd_all", "kd", "fitnets", "add"}
  assert set(transfer) == set(ablations.ARMS) - {"pagkd_all", "kd", "kd_unpaired", "fitnets", "fitnets_unpaired",
                                                  "add", "add_unpaired"}
  assert transfer[:2] == ["teacher", "teacher_shuffled"]
  assert not paired_only & set(transfer)  # The transfer regime has no pairs.
  assert paired_only <= set(ablations.ARM_SETS["paired"])
  for name in ("kd", "fitnets_unpaired", "add", "pagkd_all"):  # Students of the seed's NBI teacher.
    assert names(ablations.resolve_arms([name])) == ["teacher", name]
    args = ablations.train_args(ablations.ARMS[name], 1, tmp_path, "configs/synthetic.py:paired", [])
    assert f"--config.teacher.workdir={tmp_path / 'seed1' / 'teacher'}" in args, name
  assert "--config.paired_method.unpaired=True" in ablations.ARMS["kd_unpaired"].overrides
  with pytest.raises(ValueError, match="Unknown arm 'nope'"):
    ablations.resolve_arms(["pro_only", "nope"])

  arms = ablations.resolve_arms(["baseline", "oracle"])
  presets = ablations.arm_presets(arms, "configs/transfer.py", [])
  assert presets == {"baseline": "configs/transfer.py", "oracle": "configs/transfer.py:oracle"}
  presets = ablations.arm_presets(arms, "configs/transfer.py:smoke", [])
  assert presets == {"baseline": "configs/transfer.py:smoke", "oracle": "configs/transfer.py:oracle,smoke"}
  assert ablations.load_preset(presets["oracle"]).stage == "baseline"  # The preset accepts the combination.
  presets = ablations.arm_presets(arms, "configs/transfer.py", ["baseline=configs/synthetic.py:smoke"])
  assert presets == {"baseline": "configs/synthetic.py:smoke", "oracle": "configs/transfer.py:oracle"}
  for bad in ("baseline", "nope=configs/x.py", "baseline="):
    with pytest.raises(ValueError, match="--arm_config"):
      ablations.arm_presets(arms, "configs/transfer.py", [bad])

  pretrain = tmp_path / "seed1" / "pretrain"
  args = ablations.train_args(ablations.ARMS["neg_shuffled_teacher"], 1, tmp_path, "configs/transfer.py", [],
                              init_from=pretrain)
  assert f"--config.teacher.workdir={tmp_path / 'seed1' / 'teacher_shuffled'}" in args
  assert args[-1] == f"--config.model.init_from={pretrain}"
  teacher = ablations.train_args(ablations.ARMS["teacher_shuffled"], 1, tmp_path, "configs/transfer.py", [],
                                 init_from=pretrain)
  assert "--config.data.shuffle_train_labels=True" in teacher and "--config.stage=teacher" in teacher
  assert not any("init_from" in a for a in ablations.train_args(ablations.ARMS["baseline"], 1, tmp_path, "c.py", []))
  assert ablations.pretrain_args(1, tmp_path, "configs/transfer.py:pretrain", ["--x=1"]) == [
      "--config=configs/transfer.py:pretrain", f"--workdir={pretrain}", "--config.seed=1", "--x=1"]
  for arm in ("neg_permuted_groups", "neg_random_regions", "neg_shuffled_teacher", "neg_shift_per_step"):
    assert ablations.ARMS[arm].negative_control and ablations.ARMS[arm].stage == "pagkd"
  assert [a.name for a in ablations.ARMS.values() if not a.preregistered] == ["neg_shift_per_step"]


# Test AUC per seed of the arms the criteria read.
_CRITERIA_AUC = {"no_distill": (0.70, 0.74, 0.69, 0.72), "pro_den_paper": (0.76, 0.79, 0.75, 0.80),
                 "neg_permuted_groups": (0.71, 0.73, 0.70, 0.74), "neg_random_regions": (0.75, 0.78, 0.72, 0.75)}


def _criteria_records(arms=_CRITERIA_AUC):
  return [{"arm": arm, "seed": s, "train_s": 1.0, "eval_s": 1.0, "test": {"auc": auc, "accuracy": 0.5, "f1_macro": 0.5}}
          for arm, values in arms.items() for s, auc in enumerate(values)]


def test_criteria_from_the_paired_differences_to_the_control():
  results = ablations.criteria(ablations.aggregate(_criteria_records()))
  assert [c["arm"] for c in results] == ["pro_den_paper", "neg_permuted_groups", "neg_random_regions"]
  control = np.array(_CRITERIA_AUC["no_distill"])
  for c in results:
    diff = np.array(_CRITERIA_AUC[c["arm"]]) - control
    np.testing.assert_allclose([c["mean"], c["std"]], [diff.mean(), diff.std(ddof=1)], rtol=1e-12)
    assert c["n"] == 4
  paper, permuted, random_regions = results
  assert paper["bound"] == pytest.approx(2 * paper["std"]) and paper["pass"] is True  # 0.0625 > 2 * 0.0126.
  assert permuted["pass"] is True  # Mean 0.0075 <= std 0.0150.
  assert random_regions["pass"] is False  # Mean 0.0375 > std 0.0171: a control that helps.
  lines = ablations.criteria_lines(results).splitlines()
  assert lines[0].startswith("- **PASS** PaGKD (paper) minus control > 2 x std")
  assert f"mean difference {paper['mean']:+.4f}, std {paper['std']:.4f}, bound {2 * paper['std']:.4f}, 4 seeds" \
      in lines[0]
  assert lines[2].startswith("- **FAIL** negative control <= control + 1 std") and "neg_random_regions" in lines[2]
  # Without the control nothing can be judged; one seed gives no std.
  teachers = _criteria_records({"teacher_shuffled": (0.6, 0.5, 0.55, 0.5)}) + _criteria_records()
  assert "minus_no_distill" not in ablations.aggregate(teachers)["teacher_shuffled"]  # NBI: no paired difference.
  alone = ablations.criteria(ablations.aggregate(_criteria_records({"pro_den_paper": (0.8,)})))
  assert alone == [{**alone[0], "pass": None, "n": 0}]
  assert "NOT EVALUABLE" in ablations.criteria_lines(alone)
  one_seed = {a: v[:1] for a, v in _CRITERIA_AUC.items()}
  assert all(c["pass"] is None for c in ablations.criteria(ablations.aggregate(_criteria_records(one_seed))))
  # A control added after the pre-registration is judged by the same rule, and its line says so.
  added = ablations.criteria(ablations.aggregate(_criteria_records(
      {**_CRITERIA_AUC, "neg_shift_per_step": (0.68, 0.75, 0.66, 0.71)})))
  assert [c["arm"] for c in added][-1] == "neg_shift_per_step" and added[-1]["pass"] is True
  assert added[-1]["criterion"].startswith("added after the pre-registration: negative control")
  assert not any(c["criterion"].startswith("added") for c in added[:-1])


def test_diagnostics_from_metrics_and_report(tmp_path):
  rows = [{"step": 1, "train/distill_on": 0.0, "train/diag/grad_cls_layer4": 9.0},
          {"step": 2, "train/distill_on": 1.0, "train/diag/grad_cls_layer4": 1.0, "train/diag/grad_pro_layer4": 0.5,
           "train/diag/token_norm_wli": 2.0},
          {"step": 3, "train/distill_on": 1.0, "train/diag/grad_cls_layer4": 3.0, "train/diag/grad_pro_layer4": 0.25,
           "train/diag/token_norm_wli": None},
          {"step": 3, "val/auc": 0.7}]
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  report = {"region_agreement": {"model": {"lesion_iou": 0.4, "disc_recall": 0.5, "false_lesion_fraction": None},
                                 "teacher": {"lesion_iou": 0.6, "disc_recall": 0.7, "false_lesion_fraction": 0.1,
                                             "cam_peak_in_disc": 0.9, "without_par": {"disc_recall": 0.8},
                                             "disc_through_par": {"disc_recall": 0.3}}},
            "shortcut": {"cast_auc": 0.62, "cast_following": None, "n_images": 9}}
  diag = ablations.diagnostics_summary(path, report)
  assert diag == {"grad_cls_layer4": 2.0, "grad_pro_layer4": 0.375, "token_norm_wli": 2.0,
                  "region/model_lesion_iou": 0.4, "region/model_disc_recall": 0.5, "region/teacher_lesion_iou": 0.6,
                  "region/teacher_disc_recall": 0.7, "region/teacher_false_lesion_fraction": 0.1,
                  "region/teacher_cam_peak_in_disc": 0.9, "region/teacher_without_par_disc_recall": 0.8,
                  "region/teacher_disc_through_par_disc_recall": 0.3, "shortcut/cast_auc": 0.62}
  assert ablations.diagnostics_summary(tmp_path / "missing.jsonl", {}) == {}
  records = _criteria_records({"pro_den_paper": (0.8, 0.7)})
  records[0]["diagnostics"] = {"grad_pro_layer4": 0.5, "region/model_lesion_iou": 0.2,
                               "region/teacher_disc_through_par_disc_recall": 0.3, "shortcut/cast_auc": 0.6}
  records[1]["diagnostics"] = {"grad_pro_layer4": 0.3}
  entry = ablations.aggregate(records)["pro_den_paper"]["diagnostics"]
  np.testing.assert_allclose([entry["grad_pro_layer4"]["mean"], entry["grad_pro_layer4"]["std"]],
                             [0.4, np.std([0.5, 0.3], ddof=1)], rtol=1e-12)
  assert entry["region/model_lesion_iou"]["n"] == 1
  table = ablations.diagnostics_table(ablations.aggregate(records))
  assert "grad_pro_layer4" in table.splitlines()[0] and "0.4000 ± 0.1414" in table
  assert "region/teacher_disc_through_par_disc_recall" in table.splitlines()[0]
  assert "shortcut/cast_auc" in table.splitlines()[0]
  assert ablations.diagnostics_table(ablations.aggregate(_criteria_records())) == ""


def test_runner_trains_teacher_once_reuses_it_and_skips_finished_runs(tmp_path):
  """A real two-run ablation (the seed's teacher, then one student arm) in seconds, then a rerun that trains
  nothing."""
  root = tmp_path / "runs"
  overrides = [
      f"--config.data.synthetic.out={tmp_path / 'data'}", "--config.data.synthetic.lesions_per_class=8",
      "--config.data.synthetic.image_size=32", "--config.data.synthetic.images_per_lesion=2",
      "--config.data.image_size=32", "--config.data.group_size=4", "--config.data.eval_batch_size=16",
      "--config.train.num_steps=3", "--config.train.log_every_steps=1", "--config.train.eval_every_steps=3",
      "--config.train.checkpoint_every_steps=3", "--config.distill.warmup_epochs=0",
      "--config.eval.bootstrap_samples=10", "--config.eval.num_cam_images=1", "--config.train.log_grad_norms=True",
  ]
  cmd = [sys.executable, "scripts/ablations.py", f"--root={root}", "--seeds=0", "--arms=pro_only",
         "--config=configs/synthetic.py:smoke", *[f"--override={o}" for o in overrides]]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  first = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  assert "[run ] seed 0 teacher" in first.stdout and "[run ] seed 0 pro_only" in first.stdout

  student = json.loads((root / "seed0" / "pro_only" / ablations.RUN_RECORD).read_text())
  assert f"--config.teacher.workdir={root / 'seed0' / 'teacher'}" in student["train_args"]
  assert "--config.distill.use_den=False" in student["train_args"]
  assert not (root / "seed0" / "pro_only" / "teacher").exists()  # No second teacher inside the student's run.
  config = json.loads((root / "seed0" / "pro_only" / "config.json").read_text())
  assert config["distill"]["use_den"] is False and config["distill"]["use_pro"] is True
  report = json.loads((root / "seed0" / "pro_only" / "eval" / "metrics.json").read_text())
  assert student["test"]["auc"] == report["auc"] and student["test"]["modality"] == "wli"
  # What the numbers depend on beyond the command line: the CPU, XLA_FLAGS, the JAX version (README).
  assert student["environment"]["xla_flags"] == env.get("XLA_FLAGS")
  assert student["environment"]["jax"] == importlib.metadata.version("jax") and student["environment"]["cpu"]
  assert student["curve"]["loss_pro_first"] > 0  # Distillation ran (warm-up 0) and was logged.
  diag = student["diagnostics"]  # Gradient and token norms while distilling; region agreement at test time.
  assert diag["grad_pro_layer4"] > 0 and diag["token_norm_wli"] > 0 and diag["token_norm_nbi"] > 0
  assert "grad_den_layer4" not in diag or diag["grad_den_layer4"] == 0
  assert set(report["region_agreement"]) == {"model", "teacher"}
  assert report["region_agreement"]["teacher"]["n_images"] > 0
  assert report["region_agreement"]["model"]["n_images"] == report["n_images"]
  assert diag["region/model_lesion_iou"] == report["region_agreement"]["model"]["lesion_iou"]

  result = json.loads((root / "ablations.json").read_text())
  assert set(result["summary"]) == {"teacher", "pro_only"}
  assert result["settings"]["machine"]["xla_flags"] == env.get("XLA_FLAGS")
  assert [c["pass"] for c in result["criteria"]] == [None]  # No control, no PaGKD (paper) arm: not evaluable.
  assert result["summary"]["pro_only"]["auc"]["mean"] == report["auc"]
  assert "`pro_only`" in (root / "ablations.md").read_text()

  again = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "[run ]" not in again.stdout and again.stdout.count("[skip]") == 2

  # A rerun of the student arm in another root, sharing the first root's teacher: only the student trains.
  rerun_root = tmp_path / "rerun"
  shared = [c if not c.startswith("--root=") else f"--root={rerun_root}" for c in cmd] + [f"--shared_root={root}"]
  rerun = subprocess.run(shared, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
  assert "[skip] seed 0 teacher" in rerun.stdout and "[run ] seed 0 pro_only" in rerun.stdout
  assert not (rerun_root / "seed0" / "teacher").exists()
  student = json.loads((rerun_root / "seed0" / "pro_only" / ablations.RUN_RECORD).read_text())
  assert f"--config.teacher.workdir={root / 'seed0' / 'teacher'}" in student["train_args"]
  result = json.loads((rerun_root / "ablations.json").read_text())
  assert set(result["summary"]) == {"teacher", "pro_only"} and result["settings"]["shared_root"] == str(root)

  # The region-label stages of the student and its teacher; with the run's own resampling they are eval.py's.
  stages_json = tmp_path / "stages.json"
  out = subprocess.run([sys.executable, "scripts/region_label_stages.py", f"--workdir={root / 'seed0' / 'pro_only'}",
                        f"--out={stages_json}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  stages = json.loads(stages_json.read_text())[str(root / "seed0" / "pro_only")]
  assert set(stages) == {"model", "teacher"} and set(stages["model"]) == {"release", "area"}
  for who in ("model", "teacher"):
    expected = {k: v for k, v in report["region_agreement"][who].items() if k not in ("modality", "workdir")}
    assert stages[who][config["distill"]["par_resampling"]] == expected, who
  assert "PAR area" in out.stdout and "PAR release" in out.stdout
