"""What the experiment scripts (scripts/ablations.py, scripts/transfer_headroom.py) share: presets named as on
train.py's command line, and train.py / eval.py runs with their output in a log file."""

import importlib.metadata
import importlib.util
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_preset(spec: str):
  """`get_config(arg)` of a preset named as on train.py's command line: path/to/preset.py[:arg], relative to the
  repository."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("script_preset", REPO_ROOT / path)
  if module_spec is None:
    raise FileNotFoundError(f"--config={spec}: no preset file {REPO_ROOT / path}.")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def run_logged(cmd: list[str], log_path: pathlib.Path) -> float:
  """Runs `cmd` in the repository with its output appended to `log_path`; returns the wall seconds. A failure raises
  with the command, its exit code and the end of the log."""
  start = time.perf_counter()
  with open(log_path, "a") as log:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    result = subprocess.run(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
  if result.returncode:
    tail = log_path.read_text()[-3000:]
    raise RuntimeError(f"{' '.join(cmd)} failed with exit code {result.returncode}; log {log_path}:\n{tail}")
  return time.perf_counter() - start


def run_environment() -> dict:
  """What a CPU run's numbers depend on beyond its command line, for its record: the CPU model, XLA_FLAGS (e.g. an
  ISA cap or a thread count), the JAX and jaxlib versions. Training is bit-exact only when all of them match (README,
  "What is reproducible where"); the train.py / eval.py that a script starts inherit this process's environment."""
  cpu = platform.processor() or None
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
  except OSError:
    pass

  def version(package):
    try:
      return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      return None

  return {"cpu": cpu, "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS"),
          "jax": version("jax"), "jaxlib": version("jaxlib"), "python": sys.version.split()[0],
          "platform": platform.platform()}


def finished_record(record_path: pathlib.Path, train_args: list[str], label: str) -> dict | None:
  """The record (JSON) of a run that finished with `train_args`, or None when there is none yet: a rerun of a script
  skips it. A record made with other arguments raises, naming both, rather than mixing two experiments."""
  if not record_path.exists():
    return None
  record = json.loads(record_path.read_text())
  if record["train_args"] != train_args:
    raise ValueError(f"{record_path} was made with different settings ({record['train_args']}) than this command "
                     f"({train_args}); use another --root or delete {record_path.parent}.")
  print(f"[skip] {label}: finished ({record_path})", flush=True)
  return record
