"""The update function on 1 and on 8 (fake CPU) devices gives the same parameters."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    assert jax.device_count() == 8, jax.devices()
    from pagkd_jax import base_config, mesh as mesh_lib
    from pagkd_jax.models import resnet
    from pagkd_jax.training import classifier_step, optimizer
    from pagkd_jax.training.train_state import create_train_state

    config = base_config.get_config()
    config.optim.learning_rate = 1e-2
    C, K, S = 3, 8, 16
    model = resnet.create_resnet("tiny", C)
    tx = optimizer.make_optimizer(config.optim, total_steps=10, steps_per_epoch=5)
    rng = np.random.default_rng(0)
    batches = [{"wli": rng.integers(0, 256, (C, K, S, S, 3), dtype=np.uint8), "label": np.arange(C, dtype=np.int32)}
               for _ in range(3)]

    def run(devices):
      mesh = mesh_lib.make_mesh(devices)
      rep, grp = mesh_lib.replicated(mesh), mesh_lib.group_batch_sharding(mesh)
      state = jax.jit(lambda r: create_train_state(model.init(r, jnp.zeros((1, S, S, 3))), tx),
                      out_shardings=rep)(jax.random.key(0))
      update = jax.jit(classifier_step.make_classifier_update(model, tx, modality="wli", normalization="imagenet"),
                       in_shardings=(rep, {"wli": grp, "label": rep}), out_shardings=(rep, rep), donate_argnums=0)
      losses = []
      for b in batches:
        batch = {"wli": mesh_lib.global_array(b["wli"], grp, b["wli"].shape),
                 "label": mesh_lib.global_array(b["label"], rep, b["label"].shape)}
        state, m = update(state, batch)
        losses.append(float(m["loss"]))
      # Each device really held K / D images of every class.
      shard_shapes = {s.data.shape for s in batch["wli"].addressable_shards}
      return jax.device_get(state), losses, shard_shapes

    s1, l1, shapes1 = run(jax.devices()[:1])
    s8, l8, shapes8 = run(jax.devices())
    assert shapes1 == {(C, K, S, S, 3)} and shapes8 == {(C, 1, S, S, 3)}, (shapes1, shapes8)
    np.testing.assert_allclose(l1, l8, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.batch_stats), jax.tree.leaves(s8.batch_stats)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # The parameters moved: the comparison is not between two untouched initialisations.
    init = model.init(jax.random.key(0), jnp.zeros((1, S, S, 3)))["params"]
    assert not np.allclose(jax.tree.leaves(init)[0], jax.tree.leaves(s8.params)[0])
    print("OK", l1)
""")


def test_update_on_one_and_eight_devices_agree(repo_root):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(repo_root))
  result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                          cwd=repo_root)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "OK" in result.stdout
