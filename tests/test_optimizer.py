"""The optimiser (pagkd_jax/training/optimizer.py): Adam + L2 as torch's, and gated parameter groups that behave
like torch parameters without a gradient (no decay, no moment update, a step count of their own)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pagkd_jax import base_config
from pagkd_jax.training import optimizer

LR, WD = 1e-2, 1e-2  # A visible weight decay, so an update driven by decay alone would show.
HELD_STEPS, STEPS = 3, 7


def _optim_config(**kw):
  config = base_config.get_config().optim
  config.learning_rate, config.weight_decay = LR, WD
  for k, v in kw.items():
    config[k] = v
  return config


def _params():
  rng = np.random.default_rng(0)
  return {"student": {"w": rng.normal(size=(3, 2)).astype(np.float32)},
          "heads": {"q": rng.normal(size=(4,)).astype(np.float32), "e": rng.normal(size=(2, 2)).astype(np.float32)}}


def _grads(step):
  rng = np.random.default_rng(100 + step)
  return jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), _params())


def np_adam(params, grads_per_step, trained_per_step, lr=LR, wd=WD, b1=0.9, b2=0.999, eps=1e-8):
  """torch.optim.Adam(weight_decay=wd), one parameter at a time, float64: a parameter whose gradient is None in a
  step (trained False) is skipped entirely; its step count t starts at its first gradient."""
  out = {}
  for group in params:
    for name, p0 in params[group].items():
      p = np.asarray(p0, np.float64).copy()
      m, v, t = np.zeros_like(p), np.zeros_like(p), 0
      for grads, trained in zip(grads_per_step, trained_per_step):
        if not trained[group]:
          continue
        g = np.asarray(grads[group][name], np.float64) + wd * p
        t += 1
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
      out.setdefault(group, {})[name] = p
  return out


def _run(tx, steps=STEPS, held_steps=HELD_STEPS):
  params = _params()
  state = tx.init(params)
  update = jax.jit(lambda g, s, p, on: tx.update(g, s, p, gated_on=on))
  history = [(params, state)]
  for step in range(steps):
    updates, state = update(_grads(step), state, params, step >= held_steps)
    params = optax.apply_updates(params, updates)
    history.append((params, state))
  return history


def _heads_state(state):
  """The heads' L2 and Adam state (moments, step count) inside the gate of the "gated" group."""
  gate = state[0].inner_states["gated"].inner_state
  adam = gate.inner_state[-1]
  assert isinstance(adam, optax.ScaleByAdamState)
  return jax.tree.leaves(gate.inner_state)


def test_gated_heads_follow_torch_adam_semantics_numpy_reference():
  tx = optimizer.make_optimizer(_optim_config(), total_steps=10, steps_per_epoch=5, gated_params=("heads",))
  history = _run(tx)
  trained = [{"student": True, "heads": step >= HELD_STEPS} for step in range(STEPS)]
  for n in range(1, STEPS + 1):
    want = np_adam(_params(), [_grads(s) for s in range(n)], trained[:n])
    got = history[n][0]
    for group in want:
      for name in want[group]:
        np.testing.assert_allclose(np.asarray(got[group][name]), want[group][name], rtol=2e-5, atol=1e-7)


def test_gated_heads_and_their_state_are_bitwise_unchanged_while_held():
  tx = optimizer.make_optimizer(_optim_config(), total_steps=10, steps_per_epoch=5, gated_params=("heads",))
  history = _run(tx)
  params0, state0 = history[0]
  for params, state in history[1:HELD_STEPS + 1]:
    for a, b in zip(jax.tree.leaves(params0["heads"]), jax.tree.leaves(params["heads"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(_heads_state(state0), _heads_state(state)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(params["student"]["w"]), params0["student"]["w"])
  state_first = history[HELD_STEPS + 1][1]
  assert int(state_first[0].inner_states["gated"].inner_state.inner_state[-1].count) == 1  # Its own step count.
  assert int(state_first[0].inner_states["always"].inner_state[-1].count) == HELD_STEPS + 1
  # The first real update of the heads is torch's first Adam step: lr * g / (|g| + eps) per entry, g with L2.
  params_held, params_first = history[HELD_STEPS][0], history[HELD_STEPS + 1][0]
  for name in ("q", "e"):
    p = np.asarray(params_held["heads"][name], np.float64)
    g = np.asarray(_grads(HELD_STEPS)["heads"][name], np.float64) + WD * p
    np.testing.assert_allclose(np.asarray(params_first["heads"][name]), p - LR * g / (np.abs(g) + 1e-8),
                               rtol=1e-5, atol=1e-7)
  # Without the gate the same zero-gradient steps would move the heads (L2 decay through Adam).
  ungated = optimizer.make_optimizer(_optim_config(), total_steps=10, steps_per_epoch=5)
  zero_heads = jax.tree.map(jnp.zeros_like, params0["heads"])
  updates, _ = ungated.update({"student": _grads(0)["student"], "heads": zero_heads}, ungated.init(params0), params0)
  assert all(np.abs(np.asarray(u)).max() > 0 for u in jax.tree.leaves(updates["heads"]))


def test_gated_heads_match_torch_adam():
  torch = pytest.importorskip("torch")
  tx = optimizer.make_optimizer(_optim_config(), total_steps=10, steps_per_epoch=5, gated_params=("heads",))
  history = _run(tx)
  params = _params()
  tensors = {(g, n): torch.tensor(p, dtype=torch.float64, requires_grad=True)
             for g in params for n, p in params[g].items()}
  adam = torch.optim.Adam(list(tensors.values()), lr=LR, weight_decay=WD)
  for step in range(STEPS):
    adam.zero_grad(set_to_none=True)
    grads = _grads(step)
    for (group, name), tensor in tensors.items():
      if group == "student" or step >= HELD_STEPS:  # The heads get no gradient (None) while held.
        tensor.grad = torch.tensor(grads[group][name], dtype=torch.float64)
    adam.step()
    for (group, name), tensor in tensors.items():
      np.testing.assert_allclose(np.asarray(history[step + 1][0][group][name]), tensor.detach().numpy(),
                                 rtol=2e-5, atol=1e-7)


def test_gate_keeps_global_clipping_and_schedule():
  """Gated on at every step, the gated optimiser computes exactly the ungated one's updates."""
  config = _optim_config(grad_clip_norm=0.5, schedule="warmup_cosine", warmup_epochs=1.0)
  gated = optimizer.make_optimizer(config, total_steps=10, steps_per_epoch=2, gated_params=("heads",))
  plain = optimizer.make_optimizer(config, total_steps=10, steps_per_epoch=2)
  params = _params()
  s_gated, s_plain = gated.init(params), plain.init(params)
  for step in range(4):
    u_gated, s_gated = gated.update(_grads(step), s_gated, params, gated_on=True)
    u_plain, s_plain = plain.update(_grads(step), s_plain, params)
    for a, b in zip(jax.tree.leaves(u_gated), jax.tree.leaves(u_plain)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
    params = optax.apply_updates(params, u_plain)


def test_gated_params_must_exist():
  tx = optimizer.make_optimizer(_optim_config(), total_steps=10, steps_per_epoch=5, gated_params=("heeds",))
  with pytest.raises(ValueError, match=r"\['heeds'\].*\['heads', 'student'\]"):
    tx.init(_params())
