"""`python predict.py ...`: the command of pagkd_jax/cli/predict.py (whose docstring, the usage, is also this script's
--help); an installed package also has it as `pagkd-predict`."""

from pagkd_jax.cli import predict as _cli

__doc__ = _cli.__doc__  # absl's --help prints the main module's docstring.

if __name__ == "__main__":
  _cli.run()
