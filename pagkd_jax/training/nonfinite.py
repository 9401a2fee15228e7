"""Non-finite losses: stop with the step and the term named, or skip the update (`config.train.on_nonfinite`).

"stop" (default): the loop checks every step's metrics before it logs, evaluates or saves, so a broken state is
never checkpointed and the last good checkpoint stays the latest. "skip": the update function itself keeps the
previous parameters, BatchNorm statistics and optimiser state for a step whose loss terms or gradient norm are not
finite (the step counter and the data still advance) and reports it as `skipped`.
"""

import math
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

MODES = ("stop", "skip")


class NonFiniteLossError(FloatingPointError):
  """A training step produced a NaN or infinite loss term (or gradient norm)."""


def nonfinite_terms(metrics: Mapping[str, float]) -> list[str]:
  """Names of the metrics of one step that are NaN or infinite, loss terms first."""
  bad = [k for k, v in metrics.items() if k != "skipped" and not math.isfinite(float(v))]
  return sorted(bad, key=lambda k: (not k.startswith("loss"), k))


def check_finite(steps: Sequence[int], metrics: Sequence[Mapping[str, float]], workdir: str) -> None:
  """Raises NonFiniteLossError naming the first step with a non-finite term and every such term of it."""
  for step, m in zip(steps, metrics):
    if bad := nonfinite_terms(m):
      terms = ", ".join(f"{k}={float(m[k])}" for k in bad)
      raise NonFiniteLossError(
          f"Non-finite loss at step {step}: {terms}. Training stopped without saving this state; the latest "
          f"checkpoint in {workdir} is the last good one. Lower the learning rate, enable gradient clipping "
          f"(config.optim.grad_clip_norm), or set config.train.on_nonfinite='skip' to skip such steps.")


def skip_nonfinite(update: Callable) -> Callable:
  """Wraps update(state, batch, *frozen) -> (state, metrics): a step with a non-finite metric changes nothing but
  the step counter. metrics gains "skipped" (1.0 for a skipped step)."""

  def guarded(state, batch, *frozen):
    new_state, metrics = update(state, batch, *frozen)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(metrics)]))
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state.replace(step=new_state.step))
    return kept, {**metrics, "skipped": 1.0 - finite.astype(jnp.float32)}

  return guarded
