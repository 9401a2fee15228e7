"""The paper's ablations and the transfer benchmark over several seeds: trains and evaluates every arm with
train.py / eval.py, then reports test AUC, accuracy and macro F1 as mean and standard deviation over the seeds,
paired differences to the baseline and to the control (stage 2 with both losses off), the pre-registered criteria
and the diagnostics.

  python scripts/ablations.py                                    # 3 seeds, the paper's ablations, the demo budget
  python scripts/ablations.py --seeds=0 --epochs_scale=0.25      # a short version
  python scripts/ablations.py --arms=teacher,baseline,pro_den_paper --root=runs/abl_small
  python scripts/ablations.py --config=configs/transfer.py --pretrain_config=configs/transfer.py:pretrain \
      --arms=transfer --seeds=0,1,2,3,4 --root=runs/transfer      # the transfer benchmark, every arm

--arms takes arm names and sets of arms ("ablations": the paper's, the default; "transfer": the transfer benchmark's,
with the negative controls, the oracle and CRCKD; "paired": the paper's comparison on data with pairs, PaGKD (all)
and the paired methods KD, FitNets, ADD with their "+ unpaired" variants). Per seed each NBI teacher is trained once (ROOT/seed<S>/teacher, and
ROOT/seed<S>/teacher_shuffled for the shuffled-label control) and every student arm reuses its teacher through
`--config.teacher.workdir`. An arm runs on --config, or on --config's file with its own preset argument (the
oracle: `configs/transfer.py:oracle`), or on the preset given by `--arm_config=ARM=PRESET`. With
--pretrain_config, one pretraining run per seed (ROOT/seed<S>/pretrain) comes first and every arm starts from it
(`--config.model.init_from`). With --shared_root the pretraining and teacher runs live in (and are reused from)
another folder, e.g. an earlier invocation's root: student arms rerun after a change to the code start from the
same backbones and teachers.

Each run lives in ROOT/seed<S>/<arm>/ with its logs (ablation_train.log, ablation_eval.log) and ablation_run.json
(its command-line overrides, wall times, test metrics, loss curve summary, diagnostics, and the environment its
numbers depend on: CPU model, XLA_FLAGS, JAX version); a run whose record exists is skipped (the pretraining's is
pretrain_run.json), so rerunning the command continues where it stopped (train.py itself resumes an interrupted
run from its latest checkpoint). The seed sets `config.seed` (weights, data order, augmentation); the data split
(`data.split_seed`) and the synthetic images stay fixed, so every arm of every seed is tested on the same images
and arm differences can be paired by seed.
At the end ROOT/ablations.json (every run, the aggregate, the criteria) and ROOT/ablations.md (the tables and one
PASS / FAIL line per criterion) are written.
"""

import dataclasses
import json
import os
import pathlib
import sys
import time

import numpy as np
from absl import app, flags

from pagkd_jax import methods
from pagkd_jax.tools.script_runs import finished_record, load_preset, run_environment, run_logged

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
METRICS = ("auc", "accuracy", "f1_macro")
METRIC_NAMES = {"auc": "AUC", "accuracy": "accuracy", "f1_macro": "macro F1"}
RUN_RECORD = "ablation_run.json"


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  title: str
  stage: str  # A stage of the methods table ("teacher", "baseline", "pagkd", "crckd", "kd", ...).
  overrides: tuple[str, ...] = ()
  teacher: str = "teacher"  # A student of the NBI teacher: the teacher arm (of the same seed) it distils from.
  preset_arg: str | None = None  # Runs on the preset file of --config with this argument (e.g. "oracle").
  negative_control: bool = False  # Distillation that a correct implementation must not let beat the control.
  preregistered: bool = True  # False: added after the criterion was committed (reported, marked exploratory).
  needs_pairs: bool = False  # Trains on the pairs of the training split (the data must have them).


ARMS = {a.name: a for a in (
    Arm("teacher", "NBI teacher (tested on NBI)", "teacher"),
    Arm("teacher_shuffled", "NBI teacher trained on shuffled labels (tested on NBI)", "teacher",
        ("--config.data.shuffle_train_labels=True",)),
    Arm("baseline", "WLI-only baseline", "baseline"),
    Arm("no_distill", "stage 2, both losses off (control)", "pagkd",
        ("--config.distill.use_pro=False", "--config.distill.use_den=False")),
    Arm("pro_only", "GKD-Pro only", "pagkd", ("--config.distill.use_den=False",)),
    Arm("den_only", "GKD-Den only", "pagkd", ("--config.distill.use_pro=False",)),
    Arm("pro_den_paper", "GKD-Pro + GKD-Den, paper variant (group-level)", "pagkd"),
    Arm("pro_den_release", "GKD-Pro + GKD-Den, release variant", "pagkd", ("--config.distill.variant=release",)),
    Arm("image_level", "GKD-Pro + GKD-Den, paper variant, image-level", "pagkd", ("--config.distill.level=image",)),
    Arm("avg_pool", "paper variant, average-pool prototypes", "pagkd", ("--config.distill.prototypes=avg_pool",)),
    Arm("unmasked", "paper variant, unmasked SRCA", "pagkd", ("--config.distill.masked=False",)),
    Arm("unidirectional", "paper variant, unidirectional (NBI -> WLI)", "pagkd",
        ("--config.distill.bidirectional=False",)),
    Arm("oracle", "WLI oracle (the preset's oracle data)", "baseline", preset_arg="oracle"),
    # The comparison method that needs no NBI data (CRCKD: mean teacher, class-guided contrast, relations).
    Arm("crckd", "CRCKD (WLI only: mean teacher, CCD, CRP)", "crckd"),
    Arm("neg_shuffled_teacher", "negative control: teacher trained on shuffled labels", "pagkd",
        teacher="teacher_shuffled", negative_control=True),
    Arm("neg_permuted_groups", "negative control: teacher groups of the wrong class", "pagkd",
        ("--config.distill.teacher_class_shift=1",), negative_control=True),
    Arm("neg_random_regions", "negative control: random region labels", "pagkd",
        ("--config.distill.region_labels=random",), negative_control=True),
    # Added after the first seeds (docs/RESULTS.md, "Transfer benchmark"): a fixed shift keeps a class
    # correspondence, which the group losses can learn as well as the true one; a shift drawn per step keeps none.
    Arm("neg_shift_per_step", "negative control: teacher groups of another class drawn at every step", "pagkd",
        ("--config.distill.teacher_class_shift_per_step=True",), negative_control=True, preregistered=False),
    # The paired stream and the paired comparison methods (spec 8, 9): data with pairs (synthetic paired_fraction,
    # a manifest's pair_id); the "+ unpaired" variants train on the class-group batches and need none.
    Arm("pagkd_all", "PaGKD (all): the unpaired groups and the paired stream", "pagkd", ("--config.distill.paired=True",),
        needs_pairs=True),
    Arm("kd", "Hinton KD on the pairs", "kd", needs_pairs=True),
    Arm("kd_unpaired", "Hinton KD + unpaired", "kd", ("--config.paired_method.unpaired=True",)),
    Arm("fitnets", "FitNets on the pairs", "fitnets", needs_pairs=True),
    Arm("fitnets_unpaired", "FitNets + unpaired", "fitnets", ("--config.paired_method.unpaired=True",)),
    Arm("add", "ADD on the pairs", "add", needs_pairs=True),
    Arm("add_unpaired", "ADD + unpaired", "add", ("--config.paired_method.unpaired=True",)),
)}
_PAIRED_METHOD_ARMS = ("pagkd_all", "kd", "kd_unpaired", "fitnets", "fitnets_unpaired", "add", "add_unpaired")
# Named sets of arms for --arms: the paper's ablations (the default), and the transfer benchmark (every arm).
ARM_SETS = {
    "ablations": ("teacher", "baseline", "no_distill", "pro_only", "den_only", "pro_den_paper", "pro_den_release",
                  "image_level"),
    "transfer": tuple(a for a in ARMS if a not in _PAIRED_METHOD_ARMS),
    # The paper's comparison on data with pairs: PaGKD with and without the paired stream, the paired methods and
    # their "+ unpaired" variants, CRCKD, against the WLI baseline and the control.
    "paired": ("teacher", "baseline", "no_distill", "pro_den_paper", *_PAIRED_METHOD_ARMS, "crckd"),
}
PRETRAIN_DIR = "pretrain"
PRETRAIN_RECORD = "pretrain_run.json"

_ROOT = flags.DEFINE_string("root", "runs/ablations", "Folder of every run and of the aggregate.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Values of config.seed.")
_ARMS = flags.DEFINE_list("arms", ["ablations"], f"Arms to run, from {list(ARMS)}, or a set: {list(ARM_SETS)}.")
_CONFIG = flags.DEFINE_string("config", "configs/synthetic.py", "Preset (path[:arg]) every run starts from.")
_ARM_CONFIG = flags.DEFINE_multi_string(
    "arm_config", [], "ARM=PRESET: the preset (path[:arg]) of one arm instead of --config (repeatable). An arm with a "
    "preset argument (oracle) runs on --config's file with that argument unless named here.")
_PRETRAIN_CONFIG = flags.DEFINE_string(
    "pretrain_config", "", "Preset (path[:arg]) of a pretraining run per seed (ROOT/seed<S>/pretrain) whose weights "
    "every arm starts from (--config.model.init_from); empty: no pretraining.")
_PRETRAIN_OVERRIDE = flags.DEFINE_multi_string(
    "pretrain_override", [], "Extra --config.KEY=VALUE for the pretraining runs only, after --override (repeatable).")
_EPOCHS_SCALE = flags.DEFINE_float(
    "epochs_scale", 1.0, "Multiplies train.epochs, distill.warmup_epochs and optim.warmup_epochs of the preset.")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "Extra --config.KEY=VALUE for every run (repeatable).")
_ORDER = flags.DEFINE_enum("order", "seed", ["seed", "arm"],
                           "seed: every arm of seed 0, then of seed 1, ...; arm: each arm (in --arms order) over "
                           "every seed before the next arm (the teachers first), so a cut-short run leaves complete "
                           "arms.")
_AGGREGATE_ONLY = flags.DEFINE_bool("aggregate_only", False, "Train nothing; aggregate the finished runs.")
_SHARED_ROOT = flags.DEFINE_string(
    "shared_root", "", "Folder of the pretraining and teacher runs (trained there if missing), e.g. an earlier "
    "invocation's --root: a rerun of student arms after a change to the code starts from the same backbones and "
    "teachers, and its table lists them. Empty: --root.")


def resolve_arms(names: list[str]) -> list[Arm]:
  """The arms named (sets expanded, duplicates dropped) plus the teachers they need, teachers first."""
  wanted = []
  for name in names:
    for arm in ARM_SETS.get(name, (name,)):
      if arm not in ARMS:
        raise ValueError(f"Unknown arm {arm!r}; choose from {list(ARMS)} or a set {list(ARM_SETS)}.")
      if arm not in wanted:
        wanted.append(arm)
  for name in list(wanted):
    if distils_from_teacher(ARMS[name]) and ARMS[name].teacher not in wanted:
      wanted.append(ARMS[name].teacher)  # Every student arm needs its seed's teacher.
  arms = [ARMS[a] for a in wanted]
  arms.sort(key=lambda a: a.stage != "teacher")
  return arms


def arm_presets(arms: list[Arm], config_spec: str, arm_config: list[str]) -> dict[str, str]:
  """{arm name: preset spec}: --arm_config, else --config's file with the arm's preset argument put before
  --config's own (configs/transfer.py:smoke -> configs/transfer.py:oracle,smoke), else --config."""
  named = {}
  for entry in arm_config:
    arm, sep, preset = entry.partition("=")
    if not sep or arm not in ARMS or not preset:
      raise ValueError(f"--arm_config={entry!r}: expected ARM=PRESET with ARM one of {list(ARMS)}.")
    named[arm] = preset
  path, _, arg = config_spec.partition(":")
  with_arg = lambda a: f"{path}:{a.preset_arg}{',' + arg if arg else ''}"
  return {a.name: named.get(a.name) or (with_arg(a) if a.preset_arg else config_spec) for a in arms}


def epoch_overrides(config, scale: float) -> list[str]:
  """The preset's epoch counts times `scale` (nothing when scale is 1)."""
  if scale <= 0:
    raise ValueError(f"--epochs_scale must be positive; got {scale}.")
  if scale == 1.0:
    return []
  return [f"--config.train.epochs={config.train.epochs * scale:g}",
          f"--config.distill.warmup_epochs={config.distill.warmup_epochs * scale:g}",
          f"--config.optim.warmup_epochs={config.optim.warmup_epochs * scale:g}"]


def distils_from_teacher(arm: Arm) -> bool:
  """Whether the arm's method trains a WLI student from the seed's NBI teacher (PaGKD, KD, FitNets, ADD)."""
  method = methods.get(arm.stage)
  return method.modality == "wli" and "nbi" in method.data_modalities


def training_data(arm_name: str) -> str:
  """What an arm trains on, for the tables: "NBI" / "WLI" (one modality), "D_p" (the training split's pairs alone),
  "D_p + D_unp" (the pairs, then class groups of the unpaired WLI images and all NBI images), or "WLI + NBI,
  unpaired" (class groups of every training image; a pair's two images are not used as a pair)."""
  arm = ARMS.get(arm_name)
  if arm is None:
    return "-"
  method = methods.get(arm.stage)
  if not distils_from_teacher(arm):
    return method.modality.upper()
  if arm.needs_pairs:
    return "D_p + D_unp" if arm.stage == "pagkd" else "D_p"
  return "WLI + NBI, unpaired"


def train_args(arm: Arm, seed: int, root: pathlib.Path, config_spec: str, common: list[str],
               init_from: pathlib.Path | None = None, teacher_root: pathlib.Path | None = None) -> list[str]:
  """train.py's arguments for one run (`init_from`: the seed's pretraining workdir, or None; `teacher_root`: where
  the seed's teachers are, `root` by default)."""
  args = [f"--config={config_spec}", f"--workdir={root / f'seed{seed}' / arm.name}", f"--config.stage={arm.stage}",
          f"--config.seed={seed}", *common, *arm.overrides]
  if distils_from_teacher(arm):
    args.append(f"--config.teacher.workdir={(teacher_root or root) / f'seed{seed}' / arm.teacher}")
  if init_from is not None:
    args.append(f"--config.model.init_from={init_from}")
  return args


def pretrain_args(seed: int, root: pathlib.Path, pretrain_spec: str, common: list[str]) -> list[str]:
  """train.py's arguments for the pretraining run of one seed (its stage is the preset's)."""
  return [f"--config={pretrain_spec}", f"--workdir={root / f'seed{seed}' / PRETRAIN_DIR}", f"--config.seed={seed}",
          *common]


def run_pretrain(seed: int, root: pathlib.Path, pretrain_spec: str, common: list[str]) -> pathlib.Path:
  """Trains the seed's pretraining run unless its record exists; returns its workdir."""
  workdir = root / f"seed{seed}" / PRETRAIN_DIR
  record_path = workdir / PRETRAIN_RECORD
  args = pretrain_args(seed, root, pretrain_spec, common)
  if finished_record(record_path, args, f"seed {seed} pretrain") is not None:
    return workdir
  workdir.mkdir(parents=True, exist_ok=True)
  print(f"[run ] seed {seed} pretrain ...", flush=True)
  train_s = run_logged([sys.executable, "train.py", *args], workdir / "ablation_train.log")
  record_path.write_text(json.dumps({"seed": seed, "train_args": args, "train_s": train_s}, indent=2))
  print(f"[done] seed {seed} pretrain: train {train_s:.0f} s", flush=True)
  return workdir


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


DIAGNOSTICS = ("grad_cls_layer4", "grad_pro_layer4", "grad_den_layer4", "token_norm_wli", "token_norm_nbi")
REGION_METRICS = ("lesion_iou", "disc_recall", "false_lesion_fraction")
REGION_STAGES = ("without_par", "disc_through_par")
REGION_DIAGNOSTICS = (*REGION_METRICS, "cam_peak_in_disc", *(f"{stage}_disc_recall" for stage in REGION_STAGES))
SHORTCUT_DIAGNOSTICS = ("cast_auc", "cast_following")  # eval.py's "shortcut" (pagkd_jax/evaluation/shortcut.py).


def diagnostics_summary(metrics_path: pathlib.Path, report: dict) -> dict:
  """The run's diagnostics: the mean of each train/diag/* value over the logged steps with distillation on (the
  gradient norms, token norms), the test-time region agreement with the true lesions of eval.py's report
  ("region/<model|teacher>_<metric>") and how much the predictions follow the synthetic shortcut
  ("shortcut/<metric>")."""
  rows = [json.loads(line) for line in open(metrics_path)] if metrics_path.exists() else []
  on = [r for r in rows if r.get("train/distill_on", 0.0) > 0.5]
  result = {}
  for name in DIAGNOSTICS:
    values = [r[f"train/diag/{name}"] for r in on if r.get(f"train/diag/{name}") is not None]
    if values:
      result[name] = float(np.mean(values))
  for who, entry in (report.get("region_agreement") or {}).items():
    for metric in REGION_METRICS:
      if entry.get(metric) is not None:
        result[f"region/{who}_{metric}"] = float(entry[metric])
    if entry.get("cam_peak_in_disc") is not None:
      result[f"region/{who}_cam_peak_in_disc"] = float(entry["cam_peak_in_disc"])
    for stage in REGION_STAGES:  # Where the labels lose the lesion (region_agreement.py).
      if (entry.get(stage) or {}).get("disc_recall") is not None:
        result[f"region/{who}_{stage}_disc_recall"] = float(entry[stage]["disc_recall"])
  for metric in SHORTCUT_DIAGNOSTICS:
    if (report.get("shortcut") or {}).get(metric) is not None:
      result[f"shortcut/{metric}"] = float(report["shortcut"][metric])
  return result


def run_arm(arm: Arm, seed: int, root: pathlib.Path, config_spec: str, common: list[str],
            init_from: pathlib.Path | None = None, teacher_root: pathlib.Path | None = None) -> dict:
  """Trains and evaluates one (arm, seed) unless its record exists; returns the record."""
  workdir = root / f"seed{seed}" / arm.name
  record_path = workdir / RUN_RECORD
  args = train_args(arm, seed, root, config_spec, common, init_from, teacher_root)
  record = finished_record(record_path, args, f"seed {seed} {arm.name}")
  if record is not None:
    return record
  workdir.mkdir(parents=True, exist_ok=True)
  resumed = (workdir / "checkpoints").exists()
  print(f"[run ] seed {seed} {arm.name}{' (resuming)' if resumed else ''} ...", flush=True)
  train_s = run_logged([sys.executable, "train.py", *args], workdir / "ablation_train.log")
  eval_s = run_logged([sys.executable, "eval.py", f"--workdir={workdir}"], workdir / "ablation_eval.log")
  report = json.loads((workdir / "eval" / "metrics.json").read_text())
  record = {
      "arm": arm.name, "title": arm.title, "seed": seed, "stage": arm.stage, "train_args": args,
      "train_s": train_s, "eval_s": eval_s, "resumed": resumed, "environment": run_environment(),
      "test": {"n_images": report["n_images"], "modality": report["modality"],
               "checkpoint_step": report["checkpoint_step"],
               "auc_ci95": (report.get("ci95") or {}).get("auc"),
               **{m: report[m] for m in METRICS}},
      "curve": loss_curve_summary(workdir / "metrics.jsonl"),
      "diagnostics": diagnostics_summary(workdir / "metrics.jsonl", report),
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
  difference to each reference arm over the seeds both have ("minus_<reference>"), and the same statistics of
  each diagnostic over the seeds that have it. Arms are ordered as in ARMS (unknown ones last)."""
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
    names = sorted({k for r in runs for k in r.get("diagnostics", {})})
    entry["diagnostics"] = {k: _stats([r["diagnostics"][k] for r in runs if k in r.get("diagnostics", {})])
                            for k in names}
    for reference in reference_arms:
      ref = by_arm.get(reference)
      if ref is None or arm == reference or runs[0].get("stage", getattr(ARMS.get(arm), "stage", None)) == "teacher":
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
  head = (["arm", "training data", "seeds"] + [f"test {METRIC_NAMES[m]}" for m in METRICS]
          + [f"AUC - {r} (paired, seeds)" for r in refs] + ["train s / run"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for arm, entry in summary.items():
    row = ([f"{entry['title']} (`{arm}`)", training_data(arm), str(len(entry["seeds"]))]
           + [_fmt(entry[m]) for m in METRICS])
    for r in refs:
      diff = entry.get(f"minus_{r}")
      row.append(f"{_fmt(diff['auc'], signed=True)} ({diff['auc']['n']})" if diff else "-")
    row.append(f"{entry['train_s']['mean']:.0f}" if entry.get("train_s") else "-")
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


PAPER_ARM, CONTROL_ARM = "pro_den_paper", "no_distill"


def criteria(summary: dict, metric: str = "auc") -> list[dict]:
  """The pre-registered criteria on test `metric`, from the paired differences to the control (seed by seed):
  (1) PaGKD (paper) minus control > 2 x the sample std of those differences; (2) for every negative control that
  was run, its mean difference to the control <= 1 x the sample std of its paired differences. "pass" is None
  when an arm or the control is missing or fewer than two seeds are paired."""
  out = []

  def paired(arm):
    diff = summary.get(arm, {}).get(f"minus_{CONTROL_ARM}")
    return diff[metric] if diff else None

  d = paired(PAPER_ARM)
  ok = d is not None and d["std"] is not None
  out.append({"criterion": f"PaGKD (paper) minus control > 2 x std of the paired differences over seeds "
                           f"({PAPER_ARM} - {CONTROL_ARM}, test {METRIC_NAMES[metric]})",
              "arm": PAPER_ARM, "mean": d["mean"] if d else None, "std": d["std"] if d else None,
              "n": d["n"] if d else 0, "bound": 2 * d["std"] if ok else None,
              "pass": bool(d["mean"] > 2 * d["std"]) if ok else None})
  for arm in (a.name for a in ARMS.values() if a.negative_control):
    if arm not in summary:
      continue
    d = paired(arm)
    ok = d is not None and d["std"] is not None
    added = "" if ARMS[arm].preregistered else "added after the pre-registration: "
    out.append({"criterion": f"{added}negative control <= control + 1 std of the paired differences ({arm} - "
                             f"{CONTROL_ARM}, test {METRIC_NAMES[metric]})",
                "arm": arm, "mean": d["mean"] if d else None, "std": d["std"] if d else None,
                "n": d["n"] if d else 0, "bound": d["std"] if ok else None,
                "pass": bool(d["mean"] <= d["std"]) if ok else None})
  return out


def criteria_lines(results: list[dict]) -> str:
  """One line per criterion: PASS / FAIL / NOT EVALUABLE with the mean paired difference, its std and bound."""
  lines = []
  for c in results:
    verdict = {True: "PASS", False: "FAIL", None: "NOT EVALUABLE"}[c["pass"]]
    if c["pass"] is None:
      numbers = f"{c['n']} paired seed(s); needs the arm, the control and at least 2 common seeds"
    else:
      numbers = f"mean difference {c['mean']:+.4f}, std {c['std']:.4f}, bound {c['bound']:.4f}, {c['n']} seeds"
    lines.append(f"- **{verdict}** {c['criterion']}: {numbers}")
  return "\n".join(lines) + "\n"


def diagnostics_table(summary: dict) -> str:
  """Mean ± std over seeds of each diagnostic that some arm has (gradient norms at layer4 and token norms over the
  distillation steps, region agreement with the true lesions and shortcut reliance on the test images); empty
  without any."""
  names = [n for n in DIAGNOSTICS + tuple(f"region/{w}_{m}" for w in ("model", "teacher") for m in REGION_DIAGNOSTICS)
           + tuple(f"shortcut/{m}" for m in SHORTCUT_DIAGNOSTICS)
           if any(n in e.get("diagnostics", {}) for e in summary.values())]
  if not names:
    return ""
  lines = ["| arm | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
  for arm, entry in summary.items():
    diag = entry.get("diagnostics", {})
    lines.append(f"| `{arm}` | " + " | ".join(_fmt(diag.get(n), digits=4) for n in names) + " |")
  return "\n".join(lines) + "\n"


def write_outputs(root: pathlib.Path, records: list[dict], settings: dict) -> dict:
  summary = aggregate(records)
  table = markdown_table(summary)
  checks = criteria(summary)
  diag = diagnostics_table(summary)
  result = {"benchmark": "ablations", "settings": settings, "summary": summary, "criteria": checks, "runs": records}
  (root / "ablations.json").write_text(json.dumps(result, indent=2))
  text = (f"Mean ± sample standard deviation (ddof 1) over seeds; the teachers are tested on NBI, every other arm on "
          f"WLI.\n\n{table}\nPre-registered criteria (paired by seed):\n\n{criteria_lines(checks)}")
  if diag:
    text += f"\nDiagnostics (mean ± std over seeds):\n\n{diag}"
  (root / "ablations.md").write_text(text)
  print(f"\n{text}\nwrote {root / 'ablations.json'} and {root / 'ablations.md'}", flush=True)
  return result


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    arms = resolve_arms(_ARMS.value)
    presets = arm_presets(arms, _CONFIG.value, _ARM_CONFIG.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  root = pathlib.Path(_ROOT.value).resolve()
  root.mkdir(parents=True, exist_ok=True)
  shared = pathlib.Path(_SHARED_ROOT.value).resolve() if _SHARED_ROOT.value else root
  seeds = [int(s) for s in _SEEDS.value]
  common = {spec: epoch_overrides(load_preset(spec), _EPOCHS_SCALE.value) + list(_OVERRIDE.value)
            for spec in sorted(set(presets.values()))}
  pretrain_common = None
  if _PRETRAIN_CONFIG.value:
    pretrain_common = (epoch_overrides(load_preset(_PRETRAIN_CONFIG.value), _EPOCHS_SCALE.value)
                       + list(_OVERRIDE.value) + list(_PRETRAIN_OVERRIDE.value))
  start = time.perf_counter()
  if not _AGGREGATE_ONLY.value:
    if _ORDER.value == "seed":
      plan = [(arm, seed) for seed in seeds for arm in arms]
    else:
      plan = [(arm, seed) for arm in arms for seed in seeds]
    init_from = {}
    for arm, seed in plan:
      if pretrain_common is not None and seed not in init_from:
        init_from[seed] = run_pretrain(seed, shared, _PRETRAIN_CONFIG.value, pretrain_common)
      run_arm(arm, seed, shared if arm.stage == "teacher" else root, presets[arm.name], common[presets[arm.name]],
              init_from.get(seed), teacher_root=shared)
  settings = {"config": _CONFIG.value, "arm_presets": presets, "pretrain_config": _PRETRAIN_CONFIG.value,
              "pretrain_overrides": pretrain_common, "seeds": seeds, "arms": [a.name for a in arms],
              "epochs_scale": _EPOCHS_SCALE.value, "overrides": common, "order": _ORDER.value,
              "shared_root": str(shared) if shared != root else None,
              "command": " ".join([os.path.relpath(sys.argv[0], REPO_ROOT)] + sys.argv[1:]),
              "wall_s_this_invocation": time.perf_counter() - start,
              "machine": {**run_environment(), "loadavg_end": list(os.getloadavg())}}
  records = read_records(root)
  if shared != root:
    records += [r for r in read_records(shared) if r.get("stage") == "teacher"]
  records = [r for r in records if r["seed"] in seeds and r["arm"] in {a.name for a in arms}]
  write_outputs(root, records, settings)
  total = sum(r["train_s"] + r["eval_s"] for r in records)
  print(f"train + eval wall time of the reported runs: {total:.0f} s ({total / 60:.1f} min); this invocation "
        f"{settings['wall_s_this_invocation']:.0f} s", flush=True)


if __name__ == "__main__":
  app.run(main)
