"""Command-line tools that prepare inputs for training (e.g. `python -m pagkd_jax.tools.import_weights`)."""
