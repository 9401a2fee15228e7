"""Optax optimiser from `config.optim`: Adam with an L2 penalty added to the gradient (the release's
torch Adam `weight_decay`), optional gradient clipping and warm-up + cosine schedule."""

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


def make_optimizer(optim_config, total_steps: int, steps_per_epoch: int) -> optax.GradientTransformation:
  parts = []
  if optim_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
  if optim_config.weight_decay > 0:
    parts.append(optax.add_decayed_weights(optim_config.weight_decay))  # L2 on the gradient, before Adam.
  parts.append(optax.scale_by_adam(b1=optim_config.b1, b2=optim_config.b2))
  parts.append(optax.scale_by_learning_rate(learning_rate_schedule(optim_config, total_steps, steps_per_epoch)))
  return optax.chain(*parts)
