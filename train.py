"""`python train.py ...`: the command of pagkd_jax/cli/train.py (whose docstring, the usage, is also this script's
--help); an installed package also has it as `pagkd-train`."""

from pagkd_jax.cli import train as _cli

__doc__ = _cli.__doc__  # absl's --help prints the main module's docstring.

if __name__ == "__main__":
  _cli.run()
