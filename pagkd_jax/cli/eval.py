"""Evaluates trained workdirs on their test split and writes WORKDIR/eval/ (metrics.json, roc.png,
confusion.png, cams/).

  python eval.py --workdir=runs/synthetic
  python eval.py --workdir=runs/p0 --workdir=runs/p1 ... --out=runs/piccolo_pooled   # pooled over folds
  python eval.py --workdir=runs/synthetic --config.eval.calibrate=True   # fit a temperature on validation first

The `eval.*` values of a workdir's config.json can be overridden with --config.eval.X=... (the other values are the
run's). metrics.json also gives the expected calibration error (`ece`) and eval/reliability.png the reliability
diagram; with eval.calibrate, one temperature is fitted on the validation split and stored in
WORKDIR/calibration.json, which eval.py, predict.py and the exported model then apply.

Each workdir's config.json is checked first (pagkd_jax/config_check.py); a mistaken value exits with status 2.
"""

import os

import ml_collections
from absl import app
from absl import flags
from ml_collections import config_flags

from pagkd_jax import base_config

from pagkd_jax import config_check
from pagkd_jax import runtime
from pagkd_jax.evaluation import evaluator

_WORKDIR = flags.DEFINE_multi_string("workdir", None, "Training workdir(s); several are pooled.")
_OUT = flags.DEFINE_string("out", None, "Directory of the pooled report (default: FIRST_WORKDIR/eval_pooled).")
_WHICH = flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                           "Which checkpoint: best by validation AUC, or the latest.")
_CONFIG = config_flags.DEFINE_config_dict(
    "config", ml_collections.ConfigDict({"eval": base_config.get_config().eval}),
    "Overrides of the workdirs' eval.* values, e.g. --config.eval.calibrate=True.")
flags.mark_flag_as_required("workdir")


def eval_overrides() -> dict:
  """The --config.eval.X=... values given on the command line, {"eval.X": value}."""
  return dict(flags.FLAGS["config"].override_values)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.initialize()
  problems = []
  overrides = eval_overrides()
  for workdir in _WORKDIR.value:
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):  # A missing one is reported by the evaluation.
      config = evaluator.load_config(workdir, overrides)
      problems += [f"{path}: {p}" for p in config_check.find_problems(config, check_paths=False)]
  config_check.exit_on_problems(problems)
  evaluator.evaluate(_WORKDIR.value, _OUT.value, _WHICH.value, overrides)


def run() -> None:
  """The `pagkd-eval` command (pyproject.toml [project.scripts]) and `python eval.py`."""
  app.run(main)


if __name__ == "__main__":
  run()
