"""The update function on 1 and on 8 (fake CPU) devices computes the same gradients, BatchNorm statistics and
Adam steps, to tolerances derived from float32 arithmetic (the two device counts sum in different orders)."""

import textwrap

import pytest

from subprocess_env import run_on_host_devices

pytestmark = pytest.mark.numerics

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    assert jax.device_count() == 8, jax.devices()
    from pagkd_jax import base_config, mesh as mesh_lib
    from pagkd_jax.models import resnet
    from pagkd_jax.methods import classifier
    from pagkd_jax.training import optimizer
    from pagkd_jax.training.train_state import create_train_state

    # The two device counts sum the batch's float32 contributions in different orders (and each instruction set in
    # other vector widths): a few eps32 * sqrt(terms) of the terms' scale. Measured: at most 9e-6 of an array's
    # largest |gradient| (AVX-512, AVX2); 1e-4 leaves room for other CPUs and stays far below the bugs it must
    # catch: per-device BatchNorm statistics move some array's gradient by 6% to 250% of its scale, a gradient
    # not summed over the devices by 600%.
    GRAD_RTOL = 1e-4
    # BatchNorm running statistics are such sums too (the mean and variance over N * H * W values): measured 2e-6.
    STATS_RTOL = 1e-4
    # The loss is a mean of C * K = 24 cross-entropies: a few eps32 (1.2e-7) times 24.
    LOSS_RTOL = 1e-5
    EPS32 = float(np.finfo(np.float32).eps)

    config = base_config.get_config()
    config.optim.learning_rate = LR = 1e-2
    C, K, S, STEPS = 3, 8, 16, 3
    model = resnet.create_resnet("tiny", C)


    def recording_gradients(tx):
      \"\"\"`tx` that also keeps the gradient it was given in its state (to compare the two runs' gradients).\"\"\"
      def init(params):
        return tx.init(params), jax.tree.map(jnp.zeros_like, params)
      def update(grads, state, params=None):
        updates, inner = tx.update(grads, state[0], params)
        return updates, (inner, grads)
      return optax.GradientTransformation(init, update)


    tx = recording_gradients(optimizer.make_optimizer(config.optim, total_steps=10, steps_per_epoch=5))
    rng = np.random.default_rng(0)
    batches = [{"wli": rng.integers(0, 256, (C, K, S, S, 3), dtype=np.uint8), "label": np.arange(C, dtype=np.int32)}
               for _ in range(STEPS)]

    def run(devices):
      mesh = mesh_lib.make_mesh(devices)
      rep, grp = mesh_lib.replicated(mesh), mesh_lib.group_batch_sharding(mesh)
      state = jax.jit(lambda r: create_train_state(model.init(r, jnp.zeros((1, S, S, 3))), tx),
                      out_shardings=rep)(jax.random.key(0))
      update = jax.jit(classifier.make_classifier_update(model, tx, modality="wli", normalization="imagenet"),
                       in_shardings=(rep, {"wli": grp, "label": rep}), out_shardings=(rep, rep), donate_argnums=0)
      losses, grads = [], []
      for b in batches:
        batch = {"wli": mesh_lib.global_array(b["wli"], grp, b["wli"].shape),
                 "label": mesh_lib.global_array(b["label"], rep, b["label"].shape)}
        state, m = update(state, batch)
        losses.append(float(m["loss"]))
        grads.append(jax.tree.leaves(jax.device_get(state.opt_state[1])))
      # Each device really held K / D images of every class.
      shard_shapes = {s.data.shape for s in batch["wli"].addressable_shards}
      return jax.device_get(state), losses, grads, shard_shapes

    s1, l1, g1, shapes1 = run(jax.devices()[:1])
    s8, l8, g8, shapes8 = run(jax.devices())
    assert shapes1 == {(C, K, S, S, 3)} and shapes8 == {(C, 1, S, S, 3)}, (shapes1, shapes8)
    np.testing.assert_allclose(l1, l8, rtol=LOSS_RTOL)

    def scaled_difference(a, b):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      return np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30)

    # The gradients of every step: what the data-parallel reduction computes.
    worst_grad = max(scaled_difference(a, b) for t in range(STEPS) for a, b in zip(g1[t], g8[t]))
    for t in range(STEPS):
      for a, b in zip(g1[t], g8[t]):
        np.testing.assert_allclose(b, a, rtol=0, atol=GRAD_RTOL * np.max(np.abs(a)), err_msg=f"gradient, step {t}")
    worst_stats = max(scaled_difference(a, b) for a, b in zip(jax.tree.leaves(s1.batch_stats),
                                                              jax.tree.leaves(s8.batch_stats)))
    for a, b in zip(jax.tree.leaves(s1.batch_stats), jax.tree.leaves(s8.batch_stats)):
      np.testing.assert_allclose(b, a, rtol=0, atol=STATS_RTOL * np.max(np.abs(a)))

    # The Adam steps. Adam moves an element by lr * u, u = m / sqrt(v) (bias-corrected moments of its gradients
    # g_1..g_t), so |u| <= sqrt(t), and a change d of the gradients moves u by at most sqrt(t) (1 + sqrt(t)) d / G,
    # G = max_s |g_s|: elements with large gradients agree closely, elements whose gradient is within d of zero
    # may differ by up to a learning-rate step. Bound per element, d = GRAD_RTOL * scale of the array at step t,
    # plus the rounding of p + lr * u in both runs (one eps32 * |p| per step each).
    worst_param, n_elements, n_loose = 0.0, 0, 0
    for i, (a, b) in enumerate(zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params))):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      bound = 2 * STEPS * EPS32 * np.abs(a)
      largest = np.zeros_like(a)
      for t in range(1, STEPS + 1):
        grad = np.asarray(g1[t - 1][i], np.float64)
        largest = np.maximum(largest, np.abs(grad))
        d = GRAD_RTOL * np.max(np.abs(grad))
        bound += LR * np.minimum(2 * np.sqrt(t), np.sqrt(t) * (1 + np.sqrt(t)) * d / np.maximum(largest, 1e-30))
      assert np.all(np.abs(a - b) <= bound), (i, np.max(np.abs(a - b) - bound))
      worst_param = max(worst_param, np.max(np.abs(a - b) / bound))
      n_elements += a.size
      n_loose += np.sum(bound > 0.1 * LR)
    # The learning-rate allowance is the exception (near-zero gradients: 6% of the elements here), not the rule.
    assert n_loose < 0.1 * n_elements, (n_loose, n_elements)
    # The parameters moved: the comparison is not between two untouched initialisations.
    init = model.init(jax.random.key(0), jnp.zeros((1, S, S, 3)))["params"]
    assert not np.allclose(jax.tree.leaves(init)[0], jax.tree.leaves(s8.params)[0])
    print(f"max |difference| / scale: gradients {worst_grad:.2e}, batch statistics {worst_stats:.2e}; "
          f"max |parameter difference| / bound {worst_param:.2e}; {n_loose} of {n_elements} elements "
          f"allowed more than 0.1 of a learning-rate step; losses {l1}")
    print("OK")
""")


def test_update_on_one_and_eight_devices_agree(repo_root):
  stdout = run_on_host_devices(SCRIPT, repo_root, timeout=600)
  print(stdout)
