"""Optax optimiser from `config.optim`: Adam with an L2 penalty added to the gradient (the release's
torch Adam `weight_decay`), optional gradient clipping and warm-up + cosine schedule."""

from typing import Sequence

import optax

SCHEDULES = ("constant", "warmup_cosine")  # The values of optim.schedule.


def learning_rate_schedule(optim_config, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
  lr = optim_config.learning_rate
  if optim_config.schedule == "constant":
    return optax.constant_schedule(lr)
  if optim_config.schedule == "warmup_cosine":
    warmup = int(round(optim_config.warmup_epochs * steps_per_epoch))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=max(warmup, 1),
                                              decay_steps=max(total_steps, warmup + 1))
  raise ValueError(f"Unknown optim.schedule {optim_config.schedule!r}; expected one of {SCHEDULES}.")


def _gated_on(count, gated_on):
  del count  # The gate follows the caller's flag, not the number of calls (skipped steps, resumed runs).
  return gated_on


def _group_labels(params, gated: tuple[str, ...]) -> dict:
  missing = [name for name in gated if name not in params]
  if missing:
    raise ValueError(f"make_optimizer: gated_params {missing} are not top-level parameter groups; the parameters "
                     f"have {sorted(params)}.")
  return {name: "gated" if name in gated else "always" for name in params}


def make_optimizer(optim_config, total_steps: int, steps_per_epoch: int,
                   gated_params: Sequence[str] = ()) -> optax.GradientTransformationExtraArgs:
  """clip -> L2 on the gradient -> Adam -> learning rate, from `config.optim`.

  `gated_params`: top-level parameter groups (e.g. ("heads",)) that are updated only when the caller passes
  `tx.update(grads, state, params, gated_on=True)`; with `gated_on=False` their updates are zero and their L2 and
  Adam state (moments and step count) stay bitwise unchanged. This is what torch's Adam does with a parameter that
  gets no gradient in a step (no decay, no moment update, and its step count only starts with its first
  gradient, so its first real update has the first-step bias correction). Clipping (over all gradients) and the
  learning-rate schedule stay global, as in torch. Without `gated_params` the chain has no per-group state.
  """
  parts = []
  if optim_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
  per_parameter = []
  if optim_config.weight_decay > 0:
    per_parameter.append(optax.add_decayed_weights(optim_config.weight_decay))  # L2 on the gradient, before Adam.
  per_parameter.append(optax.scale_by_adam(b1=optim_config.b1, b2=optim_config.b2))
  if gated_params:
    gated = tuple(gated_params)
    per_group = optax.chain(*per_parameter)
    parts.append(optax.multi_transform(
        {"always": per_group,
         "gated": optax.transforms.conditionally_mask(per_group, _gated_on, forward_extra_args=True)},
        lambda params: _group_labels(params, gated)))
  else:
    parts.extend(per_parameter)
  parts.append(optax.scale_by_learning_rate(learning_rate_schedule(optim_config, total_steps, steps_per_epoch)))
  return optax.chain(*parts)
