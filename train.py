"""Trains a PaGKD stage.

  python train.py --config=configs/synthetic.py --workdir=runs/synthetic
  python train.py --config=configs/piccolo.py --config.data.manifest=/data/piccolo/manifest.csv --workdir=runs/p0

The config is checked first (pagkd_jax/config_check.py): a mistaken value stops the run with exit status 2 and
every problem listed, before anything is written. Rerunning the same command with the same workdir resumes from its
latest checkpoint. SIGTERM (cloud preemption) saves a checkpoint and exits with status 143; a non-finite loss stops
with status 1 and the step and term named.
Multi-host: add --coordinator_address=HOST0:PORT --num_processes=N --process_id=I on every host (or --distributed
under Slurm / Open MPI), with the same --workdir on a shared file system.

The command lives in pagkd_jax/cli/train.py; an installed package also has it as `pagkd-train`.
"""

from pagkd_jax.cli import train as _cli

if __name__ == "__main__":
  _cli.run()
