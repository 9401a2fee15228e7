"""The command-line tools: train.py, eval.py and predict.py at the repository root run them, and an installed
package has them as the commands pagkd-train, pagkd-eval and pagkd-predict (pyproject.toml)."""
