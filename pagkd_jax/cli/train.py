"""Trains a PaGKD stage.

  python train.py --config=configs/synthetic.py --workdir=runs/synthetic
  python train.py --config=configs/piccolo.py --config.data.manifest=/data/piccolo/manifest.csv --workdir=runs/p0

The config is checked first (pagkd_jax/config_check.py): a mistaken value stops the run with exit status 2 and
every problem listed, before anything is written. Rerunning the same command with the same workdir resumes from its
latest checkpoint. SIGTERM (cloud preemption) saves a checkpoint and exits with status 143; a non-finite loss stops
with status 1 and the step and term named.
Multi-host: add --coordinator_address=HOST0:PORT --num_processes=N --process_id=I on every host (or --distributed
under Slurm / Open MPI), with the same --workdir on a shared file system.
"""

import signal
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from pagkd_jax import base_config
from pagkd_jax import config_check
from pagkd_jax import runtime
from pagkd_jax.training import preemption
from pagkd_jax.training import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Configuration file (configs/<name>.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.initialize()
  config = base_config.from_command_line(_CONFIG.value)  # --config.data.classes=a,b,c -> ("a", "b", "c").
  config_check.exit_on_problems(config_check.find_problems(
      config, devices=jax.device_count(), processes=jax.process_count()))
  try:
    trainer.train_and_evaluate(config, _WORKDIR.value)
  except preemption.Preempted as e:
    logging.warning("%s", e)
    sys.exit(128 + signal.SIGTERM)


def run() -> None:
  """The `pagkd-train` command (pyproject.toml [project.scripts]) and `python train.py`."""
  app.run(main)


if __name__ == "__main__":
  run()
