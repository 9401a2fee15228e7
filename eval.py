"""Evaluates trained workdirs on their test split and writes WORKDIR/eval/ (metrics.json, roc.png,
confusion.png, cams/).

  python eval.py --workdir=runs/synthetic
  python eval.py --workdir=runs/p0 --workdir=runs/p1 ... --out=runs/piccolo_pooled   # pooled over folds
"""

from absl import app
from absl import flags

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
  evaluator.evaluate(_WORKDIR.value, _OUT.value, _WHICH.value)


if __name__ == "__main__":
  app.run(main)
