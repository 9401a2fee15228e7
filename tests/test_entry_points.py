"""The console commands of pyproject.toml ([project.scripts]) run the same code as the scripts at the root."""

import subprocess
import sys
import tomllib

from subprocess_env import env_with_xla_flags
from training_configs import REPO_ROOT


def _scripts() -> dict:
  with open(REPO_ROOT / "pyproject.toml", "rb") as f:
    return tomllib.load(f)["project"]["scripts"]


def test_each_console_command_names_the_run_function_its_script_calls():
  scripts = _scripts()
  assert set(scripts) == {"pagkd-train", "pagkd-eval", "pagkd-predict"}
  for command, target in scripts.items():
    module, function = target.split(":")
    name = command.removeprefix("pagkd-")
    assert (module, function) == (f"pagkd_jax.cli.{name}", "run")
    assert f"from pagkd_jax.cli import {name} as _cli" in (REPO_ROOT / f"{name}.py").read_text()


def test_a_console_command_runs_as_an_installed_one_would():
  """What pip's generated `pagkd-predict` does: import the target and call it with the command line in sys.argv."""
  code = ("import sys; from pagkd_jax.cli.predict import run; sys.argv = ['pagkd-predict', '--workdir=/nonexistent']; "
          "run()")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env=env_with_xla_flags(PYTHONPATH=str(REPO_ROOT)))
  assert result.returncode == 1 and "Give --input" in result.stderr, result.stderr[-2000:]
  result = subprocess.run([sys.executable, "-m", "pagkd_jax.cli.train", "--helpfull"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=env_with_xla_flags(PYTHONPATH=str(REPO_ROOT)))
  shown = result.stdout + result.stderr
  assert "Trains a PaGKD stage" in shown and "--workdir" in shown, shown[-2000:]  # absl's --helpfull exits with 1.
