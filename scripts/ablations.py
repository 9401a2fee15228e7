"""The paper's ablations over several seeds: trains and evaluates every arm with train.py / eval.py, then reports
test AUC, accuracy and macro F1 as mean and standard deviation over the seeds.

  python scripts/ablations.py                                    # 3 seeds, every arm, the demo budget
  python scripts/ablations.py --seeds=0 --epochs_scale=0.25      # a short version
  python scripts/ablations.py --arms=teacher,baseline,pro_den_paper --root=runs/abl_small

Per seed the NBI teacher is trained once (ROOT/seed<S>/teacher) and every student arm reuses it through
`--config.teacher.workdir`. Each run lives in ROOT/seed<S>/<arm>/ with its logs (ablation_train.log,
ablation_eval.log) and ablation_run.json (its command-line overrides, wall times, test metrics, loss curve
summary); a run whose ablation_run.json exists is skipped, so rerunning the command continues where it stopped
(train.py itself resumes an interrupted run from its latest checkpoint). The seed sets `config.seed` (weights,
data order, augmentation); the data split (`data.split_seed`) and the synthetic images stay fixed, so every arm
of every seed is tested on the same images and arm differences can be paired by seed.
At the end ROOT/ablations.json (every run and the aggregate) and ROOT/ablations.md (the table) are written.
"""

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
METRICS = ("auc", "accuracy", "f1_macro")
METRIC_NAMES = {"auc": "AUC", "accuracy": "accuracy", "f1_macro": "macro F1"}
RUN_RECORD = "ablation_run.json"


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  title: str
  stage: str  # "teacher", "baseline" or "pagkd".
  overrides: tuple[str, ...] = ()


ARMS = {a.name: a for a in (
    Arm("teacher", "NBI teacher (tested on NBI)", "teacher"),
    Arm("baseline", "WLI-only baseline", "baseline"),
    Arm("no_distill", "stage 2, both losses off (control)", "pagkd",
        ("--config.distill.use_pro=False", "--config.distill.use_den=False")),
    Arm("pro_only", "GKD-Pro only", "pagkd", ("--config.distill.use_den=False",)),
    Arm("den_only", "GKD-Den only", "pagkd", ("--config.distill.use_pro=False",)),
    Arm("pro_den_paper", "GKD-Pro + GKD-Den, paper variant (group-level)", "pagkd"),
    Arm("pro_den_release", "GKD-Pro + GKD-Den, release variant", "pagkd", ("--config.distill.variant=release",)),
    Arm("image_level", "GKD-Pro + GKD-Den, paper variant, image-level", "pagkd", ("--config.distill.level=image",)),
)}

_ROOT = flags.DEFINE_string("root", "runs/ablations", "Folder of every run and of the aggregate.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Values of config.seed.")
_ARMS = flags.DEFINE_list("arms", list(ARMS), f"Arms to run, from {list(ARMS)}.")
_CONFIG = flags.DEFINE_string("config", "configs/synthetic.py", "Preset (path[:arg]) every run starts from.")
_EPOCHS_SCALE = flags.DEFINE_float(
    "epochs_scale", 1.0, "Multiplies train.epochs, distill.warmup_epochs and optim.warmup_epochs of the preset.")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "Extra --config.KEY=VALUE for every run (repeatable).")
_ORDER = flags.DEFINE_enum("order", "seed", ["seed", "arm"],
                           "seed: every arm of seed 0, then of seed 1, ...; arm: each arm (in --arms order) over "
                           "every seed before the next arm (the teachers first), so a cut-short run leaves complete "
                           "arms.")
_AGGREGATE_ONLY = flags.DEFINE_bool("aggregate_only", False, "Train nothing; aggregate the finished runs.")


def load_preset(spec: str):
  """`get_config(arg)` of a preset named as on train.py's command line: path/to/preset.py[:arg]."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("ablation_preset", REPO_ROOT / path)
  if module_spec is None:
    raise FileNotFoundError(f"--config={spec}: no preset file {REPO_ROOT / path}.")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def epoch_overrides(config, scale: float) -> list[str]:
  """The preset's epoch counts times `scale` (nothing when scale is 1)."""
  if scale <= 0:
    raise ValueError(f"--epochs_scale must be positive; got {scale}.")
  if scale == 1.0:
    return []
  return [f"--config.train.epochs={config.train.epochs * scale:g}",
          f"--config.distill.warmup_epochs={config.distill.warmup_epochs * scale:g}",
          f"--config.optim.warmup_epochs={config.optim.warmup_epochs * scale:g}"]


def train_args(arm: Arm, seed: int, root: pathlib.Path, config_spec: str, common: list[str]) -> list[str]:
  """train.py's arguments for one run."""
  args = [f"--config={config_spec}", f"--workdir={root / f'seed{seed}' / arm.name}", f"--config.stage={arm.stage}",
          f"--config.seed={seed}", *common, *arm.overrides]
  if arm.stage == "pagkd":
    args.append(f"--config.teacher.workdir={root / f'seed{seed}' / 'teacher'}")
  return args


def loss_curve_summary(metrics_path: pathlib.Path) -> dict:
  """From WORKDIR/metrics.jsonl: best and last validation AUC, and L_pro / L_den at the first and last logged
  steps with distillation on."""
  rows = [json.loads(line) for line in open(metrics_path)] if metrics_path.exists() else []
  val = [(r["step"], r["val/auc"]) for r in rows if r.get("val/auc") is not None]
  summary = {}
  if val:
    best = max(val, key=lambda sv: sv[1])
    summary.update({"best_val_auc": best[1], "best_step": best[0], "last_val_auc": val[-1][1]})
  on = [r for r in rows if r.get("train/distill_on", 0.0) > 0.5]
  if on:
    for key in ("train/loss_pro", "train/loss_den", "train/loss_cls"):
      if key in on[0]:
        name = key.split("/")[1]
        summary[f"{name}_first"] = on[0][key]
        summary[f"{name}_last"] = on[-1][key]
    summary["distill_first_step"] = on[0]["step"]
  return summary


def run_logged(cmd: list[str], log_path: pathlib.Path) -> float:
  """Runs `cmd` in the repository with its output in `log_path`; returns the wall seconds."""
  start = time.perf_counter()
  with open(log_path, "a") as log:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    result = subprocess.run(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
  if result.returncode:
    tail = log_path.read_text()[-3000:]
    raise RuntimeError(f"{' '.join(cmd)} failed with exit code {result.returncode}; log {log_path}:\n{tail}")
  return time.perf_counter() - start


def run_arm(arm: Arm, seed: int, root: pathlib.Path, config_spec: str, common: list[str]) -> dict:
  """Trains and evaluates one (arm, seed) unless its record exists; returns the record."""
  workdir = root / f"seed{seed}" / arm.name
  record_path = workdir / RUN_RECORD
  args = train_args(arm, seed, root, config_spec, common)
  if record_path.exists():
    record = json.loads(record_path.read_text())
    if record["train_args"] != args:
      raise ValueError(f"{record_path} was made with different settings ({record['train_args']}) than this "
                       f"command ({args}); use another --root or delete {workdir}.")
    print(f"[skip] seed {seed} {arm.name}: finished ({record_path})", flush=True)
    return record
  workdir.mkdir(parents=True, exist_ok=True)
  resumed = (workdir / "checkpoints").exists()
  print(f"[run ] seed {seed} {arm.name}{' (resuming)' if resumed else ''} ...", flush=True)
  train_s = run_logged([sys.executable, "train.py", *args], workdir / "ablation_train.log")
  eval_s = run_logged([sys.executable, "eval.py", f"--workdir={workdir}"], workdir / "ablation_eval.log")
  report = json.loads((workdir / "eval" / "metrics.json").read_text())
  record = {
      "arm": arm.name, "title": arm.title, "seed": seed, "stage": arm.stage, "train_args": args,
      "train_s": train_s, "eval_s": eval_s, "resumed": resumed,
      "test": {"n_images": report["n_images"], "modality": report["modality"],
               "checkpoint_step": report["checkpoint_step"],
               "auc_ci95": (report.get("ci95") or {}).get("auc"),
               **{m: report[m] for m in METRICS}},
      "curve": loss_curve_summary(workdir / "metrics.jsonl"),
  }
  record_path.write_text(json.dumps(record, indent=2))
  print(f"[done] seed {seed} {arm.name}: train {train_s:.0f} s, eval {eval_s:.0f} s, test AUC "
        f"{report['auc']:.3f}, accuracy {report['accuracy']:.3f}, macro F1 {report['f1_macro']:.3f}", flush=True)
  return record


def read_records(root: pathlib.Path) -> list[dict]:
  """Every ROOT/seed*/<arm>/ablation_run.json."""
  records = []
  for path in sorted(root.glob(f"seed*/*/{RUN_RECORD}")):
    try:
      record = json.loads(path.read_text())
      for key in ("arm", "seed", "test"):
        record[key]  # noqa: B018  (presence check)
      for m in METRICS:
        float(record["test"][m])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{path} is not a complete ablation run record ({type(e).__name__}: {e}).") from e
    records.append(record)
  return records


def _stats(values: list[float]) -> dict:
  """Mean and sample standard deviation (ddof 1; None for a single value)."""
  x = np.asarray(values, np.float64)
  return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else None, "n": len(x),
          "values": [float(v) for v in x]}


REFERENCE_ARMS = ("baseline", "no_distill")


def aggregate(records: list[dict], reference_arms=REFERENCE_ARMS) -> dict:
  """Per arm and metric: mean, sample std (ddof 1) and n over seeds; for every WLI arm also the paired
  difference to each reference arm over the seeds both have ("minus_<reference>"). Arms are ordered as in ARMS
  (unknown ones last)."""
  by_arm: dict[str, dict[int, dict]] = {}
  for r in records:
    seeds = by_arm.setdefault(r["arm"], {})
    if r["seed"] in seeds:
      raise ValueError(f"Two records for arm {r['arm']!r}, seed {r['seed']}.")
    seeds[r["seed"]] = r
  order = [a for a in ARMS if a in by_arm] + sorted(a for a in by_arm if a not in ARMS)
  result = {}
  for arm in order:
    seeds = by_arm[arm]
    runs = [seeds[s] for s in sorted(seeds)]
    entry = {"title": runs[0].get("title", arm), "seeds": sorted(seeds),
             **{m: _stats([r["test"][m] for r in runs]) for m in METRICS},
             "train_s": _stats([r["train_s"] for r in runs]) if all("train_s" in r for r in runs) else None}
    for reference in reference_arms:
      ref = by_arm.get(reference)
      if ref is None or arm in (reference, "teacher"):
        continue
      common = sorted(set(seeds) & set(ref))
      if common:
        entry[f"minus_{reference}"] = {
            m: _stats([seeds[s]["test"][m] - ref[s]["test"][m] for s in common]) for m in METRICS}
    result[arm] = entry
  return result


def _fmt(stats: dict | None, digits: int = 3, signed: bool = False) -> str:
  if stats is None:
    return "-"
  sign = "+" if signed else ""
  mean = f"{stats['mean']:{sign}.{digits}f}"
  return mean if stats["std"] is None else f"{mean} ± {stats['std']:.{digits}f}"


def markdown_table(summary: dict, reference_arms=REFERENCE_ARMS) -> str:
  """One row per arm: mean ± std over seeds of each metric, and the AUC difference to each reference arm that
  was run, paired by seed (with the number of common seeds)."""
  refs = [r for r in reference_arms if r in summary]
  head = (["arm", "seeds"] + [f"test {METRIC_NAMES[m]}" for m in METRICS]
          + [f"AUC - {r} (paired, seeds)" for r in refs] + ["train s / run"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for arm, entry in summary.items():
    row = [f"{entry['title']} (`{arm}`)", str(len(entry["seeds"]))] + [_fmt(entry[m]) for m in METRICS]
    for r in refs:
      diff = entry.get(f"minus_{r}")
      row.append(f"{_fmt(diff['auc'], signed=True)} ({diff['auc']['n']})" if diff else "-")
    row.append(f"{entry['train_s']['mean']:.0f}" if entry.get("train_s") else "-")
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def write_outputs(root: pathlib.Path, records: list[dict], settings: dict) -> dict:
  summary = aggregate(records)
  table = markdown_table(summary)
  result = {"benchmark": "ablations", "settings": settings, "summary": summary, "runs": records}
  (root / "ablations.json").write_text(json.dumps(result, indent=2))
  (root / "ablations.md").write_text(
      f"Mean ± sample standard deviation (ddof 1) over seeds; the teacher is tested on NBI, every other arm on "
      f"WLI.\n\n{table}")
  print(f"\n{table}\nwrote {root / 'ablations.json'} and {root / 'ablations.md'}", flush=True)
  return result


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  unknown = [a for a in _ARMS.value if a not in ARMS]
  if unknown:
    raise app.UsageError(f"Unknown arms {unknown}; choose from {list(ARMS)}.")
  root = pathlib.Path(_ROOT.value).resolve()
  root.mkdir(parents=True, exist_ok=True)
  seeds = [int(s) for s in _SEEDS.value]
  arms = [ARMS[a] for a in _ARMS.value]
  if any(a.stage == "pagkd" for a in arms) and ARMS["teacher"] not in arms:
    arms.insert(0, ARMS["teacher"])  # Every student arm needs its seed's teacher.
  arms.sort(key=lambda a: a.name != "teacher")
  common = epoch_overrides(load_preset(_CONFIG.value), _EPOCHS_SCALE.value) + list(_OVERRIDE.value)
  start = time.perf_counter()
  if not _AGGREGATE_ONLY.value:
    if _ORDER.value == "seed":
      plan = [(arm, seed) for seed in seeds for arm in arms]
    else:
      plan = [(arm, seed) for arm in arms for seed in seeds]
    for arm, seed in plan:
      run_arm(arm, seed, root, _CONFIG.value, common)
  settings = {"config": _CONFIG.value, "seeds": seeds, "arms": [a.name for a in arms],
              "epochs_scale": _EPOCHS_SCALE.value, "overrides": common, "order": _ORDER.value,
              "command": " ".join([os.path.relpath(sys.argv[0], REPO_ROOT)] + sys.argv[1:]),
              "wall_s_this_invocation": time.perf_counter() - start,
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "python": sys.version.split()[0], "loadavg_end": list(os.getloadavg())}}
  records = [r for r in read_records(root) if r["seed"] in seeds and r["arm"] in {a.name for a in arms}]
  write_outputs(root, records, settings)
  total = sum(r["train_s"] + r["eval_s"] for r in records)
  print(f"train + eval wall time of the reported runs: {total:.0f} s ({total / 60:.1f} min); this invocation "
        f"{settings['wall_s_this_invocation']:.0f} s", flush=True)


if __name__ == "__main__":
  app.run(main)
