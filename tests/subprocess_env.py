"""Environment for the test suite's JAX subprocesses."""

import os


def env_with_xla_flags(*xla_flags: str, **variables: str) -> dict:
  """os.environ with `xla_flags` appended to its XLA_FLAGS (a cap such as --xla_cpu_max_isa=AVX2 given to pytest
  still reaches the subprocess) and `variables` set; JAX on the CPU unless `variables` says otherwise."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.update(variables)
  env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), *xla_flags]).strip()
  return env
