"""Evaluates trained workdirs on their test split and writes WORKDIR/eval/ (metrics.json, roc.png,
confusion.png, cams/).

  python eval.py --workdir=runs/synthetic
  python eval.py --workdir=runs/p0 --workdir=runs/p1 ... --out=runs/piccolo_pooled   # pooled over folds

Each workdir's config.json is checked first (pagkd_jax/config_check.py); a mistaken value exits with status 2.
"""

import os

from absl import app
from absl import flags

from pagkd_jax import config_check
from pagkd_jax import runtime
from pagkd_jax.evaluation import evaluator

_WORKDIR = flags.DEFINE_multi_string("workdir", None, "Training workdir(s); several are pooled.")
_OUT = flags.DEFINE_string("out", None, "Directory of the pooled report (default: FIRST_WORKDIR/eval_pooled).")
_WHICH = flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                           "Which checkpoint: best by validation AUC, or the latest.")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.initialize()
  problems = []
  for workdir in _WORKDIR.value:
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):  # A missing one is reported by the evaluation.
      problems += [f"{path}: {p}" for p in config_check.find_problems(evaluator.load_config(workdir),
                                                                        check_paths=False)]
  config_check.exit_on_problems(problems)
  evaluator.evaluate(_WORKDIR.value, _OUT.value, _WHICH.value)


if __name__ == "__main__":
  app.run(main)
