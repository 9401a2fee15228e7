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

The command lives in pagkd_jax/cli/eval.py; an installed package also has it as `pagkd-eval`.
"""

from pagkd_jax.cli import eval as _cli

if __name__ == "__main__":
  _cli.run()
