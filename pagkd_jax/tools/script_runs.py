"""What the experiment scripts (scripts/ablations.py, scripts/transfer_headroom.py) share: presets named as on
train.py's command line, and train.py / eval.py runs with their output in a log file."""

import importlib.util
import json
import pathlib
import subprocess
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
