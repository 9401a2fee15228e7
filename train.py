"""Trains a PaGKD stage.

  python train.py --config=configs/synthetic.py --workdir=runs/synthetic
  python train.py --config=configs/piccolo.py --config.data.manifest=/data/piccolo/manifest.csv --workdir=runs/p0

Rerunning the same command with the same workdir resumes from its latest checkpoint.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from pagkd_jax import runtime
from pagkd_jax.training import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Configuration file (configs/<name>.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.initialize()
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
