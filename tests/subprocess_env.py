"""Environment for the test suite's JAX subprocesses."""

import os
import subprocess
import sys


def env_with_xla_flags(*xla_flags: str, **variables: str) -> dict:
  """os.environ with `xla_flags` appended to its XLA_FLAGS (a cap such as --xla_cpu_max_isa=AVX2 given to pytest
  still reaches the subprocess) and `variables` set; JAX on the CPU unless `variables` says otherwise."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.update(variables)
  env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), *xla_flags]).strip()
  return env


def run_on_host_devices(script: str, repo_root, num_devices: int = 8, timeout: float = 600) -> str:
  """Runs `python -c script` on `num_devices` simulated CPU devices; asserts it succeeded and printed "OK", and
  returns its stdout."""
  env = env_with_xla_flags(f"--xla_force_host_platform_device_count={num_devices}", PYTHONPATH=str(repo_root))
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=repo_root)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "OK" in result.stdout, result.stdout[-4000:]
  return result.stdout
