"""The transfer regime's headroom check, to run and write down before any distillation arm: for one seed, the WLI
baseline of configs/transfer.py and an oracle WLI classifier trained on ten times the WLI training lesions without
the shortcut (configs/transfer.py:oracle), both started from the seed's generic pretrained backbone
(configs/transfer.py:pretrain), tested on the same WLI test images. The regime holds transferable knowledge only
if the oracle scores at least --required (0.10) test AUC above the baseline.

  python scripts/transfer_headroom.py --seed=0                      # pretrain -> baseline, oracle -> eval
  python scripts/transfer_headroom.py --seed=0 --from_scratch       # no pretraining: both from random weights
  python scripts/transfer_headroom.py --seed=0 --smoke              # the same steps on CI-sized data (seconds)

Runs live in ROOT/seed<S>/{pretrain,baseline,oracle}/ with their logs (headroom_train.log, headroom_eval.log); a
run whose eval/metrics.json exists and whose recorded command (headroom_run.json) is this one is not run again.
The result goes to ROOT/seed<S>/headroom[_from_scratch].json and is printed: both test AUCs (with their bootstrap
95 % intervals), the difference, whether it meets the requirement, and the commands.
"""

import csv
import hashlib
import json
import os
import pathlib
import sys

from absl import app, flags

from pagkd_jax.tools import script_runs

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PRESET = "configs/transfer.py"
RUN_RECORD = "headroom_run.json"

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line; defined when run as a script only, so that importing this module (the tests, beside
  scripts/ablations.py, which has a --root too) defines no flag."""
  flags.DEFINE_string("root", "runs/transfer_headroom", "Folder of the runs and of the result.")
  flags.DEFINE_integer("seed", 0, "config.seed of every run.")
  flags.DEFINE_bool("from_scratch", False, "Start baseline and oracle from random weights instead of the seed's "
                    "pretrained backbone (no pretraining run).")
  flags.DEFINE_bool("smoke", False, "The presets' ',smoke' variants (tiny data and budget).")
  flags.DEFINE_float("required", 0.10, "Test AUC the oracle must gain over the baseline.")
  flags.DEFINE_multi_string("override", [], "Extra --config.KEY=VALUE for every run (repeatable).")
  flags.DEFINE_string("data_root", "", "Folder for the synthetic data sets (each run's in the sub-folder its preset "
                      "names); '' leaves them where the presets put them.")


def run_commands(root: pathlib.Path, seed: int, *, from_scratch: bool, smoke: bool, overrides: list[str],
                 data_root: str = "") -> dict[str, list[str]]:
  """train.py's arguments per run name ("pretrain" unless from scratch, "baseline", "oracle"), in order."""
  suffix = ",smoke" if smoke else ""
  seed_dir = root / f"seed{seed}"
  init = [] if from_scratch else [f"--config.model.init_from={seed_dir / 'pretrain'}"]
  runs = {}
  if not from_scratch:
    runs["pretrain"] = [f"--config={PRESET}:pretrain{suffix}", f"--workdir={seed_dir / 'pretrain'}"]
  runs["baseline"] = [f"--config={PRESET}" + (":smoke" if smoke else ""), "--config.stage=baseline",
                      f"--workdir={seed_dir / 'baseline'}", *init]
  runs["oracle"] = [f"--config={PRESET}:oracle{suffix}", f"--workdir={seed_dir / 'oracle'}", *init]
  if data_root:
    for args in runs.values():
      name = os.path.basename(script_runs.load_preset(args[0].removeprefix("--config=")).data.synthetic.out)
      args.append(f"--config.data.synthetic.out={pathlib.Path(data_root).resolve() / name}")
  return {name: [*args, f"--config.seed={seed}", *overrides] for name, args in runs.items()}


def train_and_evaluate(name: str, args: list[str], workdir: pathlib.Path, evaluate: bool) -> dict:
  """Trains (and evaluates) one run unless its record shows it finished with these arguments; returns the record."""
  record_path = workdir / RUN_RECORD
  record = script_runs.finished_record(record_path, args, name)
  if record is not None:
    return record
  workdir.mkdir(parents=True, exist_ok=True)
  print(f"[run ] {name} ...", flush=True)
  record = {"name": name, "train_args": args,
            "train_s": script_runs.run_logged([sys.executable, "train.py", *args], workdir / "headroom_train.log")}
  if evaluate:
    record["eval_s"] = script_runs.run_logged([sys.executable, "eval.py", f"--workdir={workdir}"],
                                              workdir / "headroom_eval.log")
    report = json.loads((workdir / "eval" / "metrics.json").read_text())
    record["test"] = {"auc": report["auc"], "auc_ci95": (report.get("ci95") or {}).get("auc"),
                      "accuracy": report["accuracy"], "n_images": report["n_images"],
                      "modality": report["modality"], "checkpoint_step": report["checkpoint_step"]}
  record_path.write_text(json.dumps(record, indent=2))
  print(f"[done] {name}: train {record['train_s']:.0f} s"
        + (f", test AUC {record['test']['auc']:.3f}" if evaluate else ""), flush=True)
  return record


def wli_test_images(workdir: pathlib.Path) -> dict[str, str]:
  """{path relative to the run's synthetic data folder: SHA-256 of the file} of the run's WLI test images (its
  splits.csv), so runs on different data folders can be checked to be tested on the same images."""
  config = json.loads((workdir / "config.json").read_text())
  data_dir = pathlib.Path(config["data"]["synthetic"]["out"])
  with open(workdir / "splits.csv", newline="") as f:
    rows = [r for r in csv.DictReader(f) if r["split"] == "test" and r["modality"] == "wli"]
  return {pathlib.Path(r["path"]).relative_to(data_dir).as_posix():
          hashlib.sha256(pathlib.Path(r["path"]).read_bytes()).hexdigest() for r in rows}


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  root = pathlib.Path(FLAGS.root).resolve()
  seed = FLAGS.seed
  commands = run_commands(root, seed, from_scratch=FLAGS.from_scratch, smoke=FLAGS.smoke,
                          overrides=list(FLAGS.override), data_root=FLAGS.data_root)
  records = {name: train_and_evaluate(name, args, root / f"seed{seed}" / name, evaluate=name != "pretrain")
             for name, args in commands.items()}
  baseline_images = wli_test_images(root / f"seed{seed}" / "baseline")
  oracle_images = wli_test_images(root / f"seed{seed}" / "oracle")
  if baseline_images != oracle_images or not baseline_images:
    raise ValueError(f"baseline and oracle are not tested on the same WLI images ({len(baseline_images)} and "
                     f"{len(oracle_images)} test images, {len(set(baseline_images) & set(oracle_images))} shared "
                     "paths): their data sets must share the fixed evaluation lesions.")
  baseline, oracle = records["baseline"]["test"], records["oracle"]["test"]
  difference = oracle["auc"] - baseline["auc"]
  result = {
      "seed": seed, "from_scratch": FLAGS.from_scratch, "smoke": FLAGS.smoke,
      "baseline": baseline, "oracle": oracle, "difference": difference, "required": FLAGS.required,
      "met": bool(difference >= FLAGS.required), "same_wli_test_images": len(baseline_images),
      "commands": {name: "python train.py " + " ".join(args) for name, args in commands.items()},
      "wall_s": {name: r["train_s"] + r.get("eval_s", 0.0) for name, r in records.items()},
  }
  out = root / f"seed{seed}" / ("headroom_from_scratch.json" if FLAGS.from_scratch else "headroom.json")
  out.write_text(json.dumps(result, indent=2))
  print(f"WLI test AUC on the same {len(baseline_images)} images: baseline {baseline['auc']:.3f}, oracle "
        f"{oracle['auc']:.3f}, difference {difference:+.3f} (required {FLAGS.required:+.2f}): "
        f"{'met' if result['met'] else 'NOT met'} -> {os.path.relpath(out)}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
