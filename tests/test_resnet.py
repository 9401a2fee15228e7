"""ResNet presets: shapes, parameter counts (torchvision's), precision handling, train/eval BatchNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagkd_jax.models import resnet


def _param_count(name, num_classes, size=64):
  model = resnet.create_resnet(name, num_classes)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  return sum(x.size for x in jax.tree.leaves(variables["params"])), variables


@pytest.mark.parametrize("name,expected", [("resnet50", 25_557_032), ("resnet18", 11_689_512)])
def test_parameter_counts_match_torchvision(name, expected):
  count, variables = _param_count(name, 1000)
  assert count == expected
  # torchvision names, so imported weights map one to one.
  assert {"conv1", "bn1", "layer1_0", "layer4_0", "fc"} <= set(variables["params"])


def test_resnet50_output_shapes_at_448():
  model = resnet.create_resnet("resnet50", 3)
  (logits, features) = jax.eval_shape(
      lambda: model.apply(model.init(jax.random.key(0), jnp.zeros((1, 448, 448, 3))), jnp.zeros((2, 448, 448, 3))))
  assert logits.shape == (2, 3) and features.shape == (2, 14, 14, 2048)
  assert resnet.feature_stride("resnet50") == 32


def test_tiny_forward_train_and_eval():
  model = resnet.create_resnet("tiny", 3)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  (logits, features), updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert logits.shape == (4, 3) and features.shape == (4, 4, 4, 64)
  assert resnet.feature_stride("tiny") == 8
  # Training mode updates the running statistics; inference mode uses them and changes nothing.
  before = jax.tree.leaves(variables["batch_stats"])
  after = jax.tree.leaves(updates["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))
  logits_eval, _ = model.apply(variables, x, train=False)
  assert np.all(np.isfinite(logits_eval))


@pytest.mark.numerics
def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = resnet.create_resnet("tiny", 3, dtype="bfloat16")
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(variables["batch_stats"]))
  logits, features = model.apply(variables, x)
  assert features.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  ref_logits, _ = resnet.create_resnet("tiny", 3).apply(variables, x)
  # bfloat16 rounds activations to 8 significant bits (relative error <= 2^-8) in each of the preset's 10 layers:
  # at most ~10 * 2^-8 = 4% of the logits' scale (measured 0.25%, the same under AVX2 and AVX-512).
  np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=10 * 2.0**-8 * np.max(np.abs(ref_logits)))


def test_logits_are_the_linear_head_on_pooled_features():
  model = resnet.create_resnet("tiny", 3)
  x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  logits, features = model.apply(variables, x)
  fc = variables["params"]["fc"]
  pooled = np.asarray(features).mean(axis=(1, 2))
  np.testing.assert_allclose(logits, pooled @ np.asarray(fc["kernel"]) + np.asarray(fc["bias"]), rtol=1e-5,
                             atol=1e-5)


def test_unknown_preset_is_named():
  with pytest.raises(ValueError, match="resnet51"):
    resnet.create_resnet("resnet51", 3)
