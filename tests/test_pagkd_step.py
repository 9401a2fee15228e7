"""Stage-2 update: gradients reach what they should (and never the teacher), warm-up, ablations, 1 vs 8 devices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagkd_jax import base_config
from pagkd_jax.distill import pagkd, srca
from pagkd_jax.methods import pagkd as pagkd_method
from pagkd_jax.models import resnet
from pagkd_jax.training import optimizer
from subprocess_env import run_on_host_devices

C, K, S = 3, 4, 24


def _setup(group_size=K, **distill):
  config = base_config.get_config()
  config.stage = "pagkd"
  config.model.name = "tiny"
  config.data.image_size = S
  config.data.group_size = group_size
  config.distill.warmup_epochs = 0.0
  config.distill.embed_dim = 16
  config.distill.num_queries = 4
  config.distill.qformer_heads = 4
  for k, v in distill.items():
    config.distill[k] = v
  model = resnet.create_resnet("tiny", C)
  tx = optimizer.make_optimizer(config.optim, total_steps=10, steps_per_epoch=5)
  program = pagkd_method.PaGKDProgram(frozen=())
  state = program.init_state(model, tx, jax.random.key(0), config)
  teacher = model.init(jax.random.key(7), jnp.zeros((1, S, S, 3)))
  # A teacher with non-trivial running statistics, as a trained one has.
  teacher = {"params": teacher["params"],
             "batch_stats": jax.tree.map(lambda x: x + 0.1, teacher["batch_stats"])}
  rng = np.random.default_rng(0)
  batch = {"wli": rng.integers(0, 256, (C, group_size, S, S, 3), dtype=np.uint8),
           "nbi": rng.integers(0, 256, (C, group_size, S, S, 3), dtype=np.uint8),
           "label": np.arange(C, dtype=np.int32)}
  return config, model, tx, state, teacher, batch


def _grads(config, model, state, teacher, batch, step=0):
  heads = pagkd_method.make_heads(config, C)
  loss_fn = pagkd_method.make_pagkd_loss(model, heads, config, steps_per_epoch=5)
  f = lambda params, teacher: loss_fn(params, state.batch_stats, jnp.int32(step), batch, teacher)[0]
  return jax.jit(jax.grad(f, argnums=(0, 1)))(state.params, teacher), jax.jit(loss_fn)


def _norm(tree):
  return float(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree)) ** 0.5)


def test_gradients_reach_student_queries_and_teacher_embedding_but_never_the_teacher():
  config, model, _, state, teacher, batch = _setup()
  (g_params, g_teacher), _ = _grads(config, model, state, teacher, batch)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g_teacher))  # Exactly zero.
  heads = g_params["heads"]
  assert _norm(g_params["student"]["conv1"]) > 0
  assert _norm(g_params["student"]["layer4_0"]) > 0
  assert _norm(heads["prototypes"]["queries"]) > 0
  assert _norm(heads["teacher_embed"]) > 0 and _norm(heads["student_embed"]) > 0
  assert _norm(heads["srca"]) > 0
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(g_params))


def test_warmup_is_cross_entropy_only():
  config, model, _, state, teacher, batch = _setup(warmup_epochs=1.0)  # 5 steps of warm-up.
  (g_params, _), loss_fn = _grads(config, model, state, teacher, batch, step=0)
  assert _norm(g_params["heads"]) == 0
  _, (terms, _) = loss_fn(state.params, state.batch_stats, jnp.int32(0), batch, teacher)
  assert float(terms["loss_pro"]) == 0 and float(terms["loss_den"]) == 0 and float(terms["distill_on"]) == 0
  loss, (terms, _) = loss_fn(state.params, state.batch_stats, jnp.int32(5), batch, teacher)
  assert float(terms["distill_on"]) == 1 and float(terms["loss_pro"]) > 0 and float(terms["loss_den"]) > 0
  np.testing.assert_allclose(float(loss), float(terms["loss_cls"] + terms["loss_pro"] + terms["loss_den"]),
                             rtol=1e-5)


def _heads_adam_state(opt_state):
  """The heads' L2 + Adam state inside the optimiser's gate (moments and step count)."""
  return jax.tree.leaves(opt_state[0].inner_states["gated"].inner_state.inner_state)


def _equal_trees(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("use_losses", [True, False], ids=["pagkd", "no_distillation"])
def test_heads_and_their_adam_state_stay_untouched_until_distillation(use_losses):
  """As torch's Adam with parameters that get no gradient: the warm-up neither decays nor advances the heads."""
  config, model, _, state, teacher, batch = _setup(warmup_epochs=1.0, use_pro=use_losses, use_den=use_losses)
  tx = optimizer.make_optimizer(config.optim, total_steps=10, steps_per_epoch=5,
                                gated_params=pagkd_method.PaGKDProgram.gated_params)
  state = state.replace(opt_state=tx.init(state.params))
  update = jax.jit(pagkd_method.make_pagkd_update(model, pagkd_method.make_heads(config, C), tx, config, 5))
  warm = state
  for _ in range(2):  # Steps 0 and 1 of the 5 warm-up steps.
    warm, _ = update(warm, batch, teacher)
  assert _equal_trees(warm.params["heads"], state.params["heads"])
  assert _equal_trees(_heads_adam_state(warm.opt_state), _heads_adam_state(state.opt_state))
  assert not _equal_trees(warm.params["student"], state.params["student"])
  on, _ = update(warm.replace(step=jnp.int32(5)), batch, teacher)  # First step with distillation.
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(on.params["heads"]),
                                                    jax.tree.leaves(warm.params["heads"]))]
  if use_losses:
    assert all(moved)
    assert int(on.opt_state[0].inner_states["gated"].inner_state.inner_state[-1].count) == 1
  else:  # Both losses off: the heads never get a gradient, so they never move.
    assert not any(moved)
  # An optimiser without the gate would move the heads during the warm-up (L2 decay through Adam).
  plain = optimizer.make_optimizer(config.optim, total_steps=10, steps_per_epoch=5)
  plain_update = jax.jit(pagkd_method.make_pagkd_update(model, pagkd_method.make_heads(config, C), plain, config, 5))
  moved_plain, _ = plain_update(state.replace(opt_state=plain.init(state.params)), batch, teacher)
  assert not _equal_trees(moved_plain.params["heads"], state.params["heads"])


def test_release_heads_have_the_releases_initialisation():
  """Student embedding kaiming-normal (fan-out, ReLU gain), teacher side torch's default conv init."""
  config, *_ = _setup(variant="release", embed_dim=64)
  feats = jnp.zeros((C, 2, 2, 2, 512))
  regions = jnp.zeros((C, 2, 2, 2), jnp.int8)
  init = lambda cfg: pagkd_method.make_heads(cfg, C).init(jax.random.key(0), feats, feats, jnp.arange(C), regions,
                                                         regions)["params"]
  heads = init(config)
  student = np.asarray(heads["student_embed"]["kernel"], np.float64)  # (F, d) = torch's (d, F, 1, 1).T
  std = math.sqrt(2.0 / 64)  # kaiming_normal_(mode="fan_out", nonlinearity="relu"): fan_out = d * 1 * 1.
  assert student.std() == pytest.approx(std, rel=0.03) and abs(student.mean()) < 0.01 * std
  assert np.abs(student).max() > 3.5 * std  # A normal's tail, not a (bounded) uniform.
  teacher = np.asarray(heads["teacher_embed"]["kernel"], np.float64)
  bound = 1.0 / math.sqrt(512)  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  assert np.abs(teacher).max() <= bound and np.abs(teacher).max() > 0.99 * bound
  assert teacher.std() == pytest.approx(bound / math.sqrt(3), rel=0.03)
  assert np.asarray(heads["prototypes"]["queries"]).std() == pytest.approx(1.0, rel=0.25)
  config.distill.variant = "paper"  # The paper variant keeps Flax's default (LeCun normal, fan-in).
  paper = np.asarray(init(config)["student_embed"]["kernel"], np.float64)
  assert paper.std() == pytest.approx(1.0 / math.sqrt(512), rel=0.05)


def test_release_dense_loss_is_a_sum_over_classes_of_per_class_means_at_both_levels():
  """Image level: C * K groups of one; a class's term is the mean over its K groups. K identical copies of each
  class's pair then give the group level's value with K = 1."""
  config, *_ = _setup(variant="release", use_pro=False)
  rng = np.random.default_rng(1)
  f_s, f_t = (jnp.asarray(rng.normal(size=(C, 1, 3, 3, 16)), jnp.float32) for _ in range(2))
  r_s, r_t = (jnp.asarray(rng.integers(-1, 2, size=(C, 1, 3, 3)), jnp.int8) for _ in range(2))
  heads = pagkd_method.make_heads(config, C)
  params = heads.init(jax.random.key(0), f_s, f_t, jnp.arange(C), r_s, r_t)
  per_class = heads.apply(params, f_s, f_t, jnp.arange(C), r_s, r_t)["loss_den"]
  copies = lambda x: jnp.repeat(x, K, axis=0)
  image_level = heads.apply(params, copies(f_s), copies(f_t), jnp.repeat(jnp.arange(C), K), copies(r_s),
                            copies(r_t))["loss_den"]
  np.testing.assert_allclose(float(image_level), float(per_class), rtol=1e-6)
  srca_sum = srca.SRCA(variant="release").apply({}, f_s @ params["params"]["student_embed"]["kernel"],
                                               f_t @ params["params"]["teacher_embed"]["kernel"], r_s, r_t)[0]
  np.testing.assert_allclose(float(per_class), float(srca_sum), rtol=1e-6)


@pytest.mark.parametrize("variant", ["paper", "release"])
def test_total_loss_weights_the_terms(variant):
  config, model, _, state, teacher, batch = _setup(variant=variant, lambda_den=0.5)
  _, loss_fn = _grads(config, model, state, teacher, batch)
  loss, (terms, _) = loss_fn(state.params, state.batch_stats, jnp.int32(0), batch, teacher)
  lambda_pro = 1.0 if variant == "paper" else 1e-3
  expected = terms["loss_cls"] + lambda_pro * terms["loss_pro"] + 0.5 * terms["loss_den"]
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
  if variant == "release":
    assert "prototype_classifier" in state.params["heads"]
    np.testing.assert_allclose(float(terms["loss_pro"]),
                               float(terms["pro/contrastive"] + terms["pro/classification"]), rtol=1e-6)


def test_switches_remove_their_parts():
  config, model, _, state, teacher, batch = _setup(use_pro=False, bidirectional=False, prototypes="avg_pool")
  assert "prototypes" not in state.params["heads"]
  _, loss_fn = _grads(config, model, state, teacher, batch)
  _, (terms, _) = loss_fn(state.params, state.batch_stats, jnp.int32(0), batch, teacher)
  assert float(terms["loss_pro"]) == 0 and "den/loss/wli_to_nbi" not in terms and "den/loss/nbi_to_wli" in terms
  config, *_ = _setup(use_den=False)
  state = pagkd_method.PaGKDProgram(frozen=()).init_state(model, optimizer.make_optimizer(config.optim, 10, 5),
                                                        jax.random.key(0), config)
  assert "srca" not in state.params["heads"]


def test_pair_images_permutes_within_each_class():
  x = np.arange(C * K).reshape(C, K)
  paired = np.asarray(pagkd.pair_images(jnp.asarray(x), jax.random.key(3)))
  for c in range(C):
    assert sorted(paired[c]) == sorted(x[c])  # Same-class partners, each used once.
  assert not np.array_equal(paired, x) or K == 1


def test_image_level_equals_heads_on_explicit_pairs():
  """The image-level ablation = the heads applied to C*K groups of one (WLI image, paired NBI image)."""
  config, model, _, state, teacher, batch = _setup(level="image")
  heads = pagkd_method.make_heads(config, C)
  loss_fn = pagkd_method.make_pagkd_loss(model, heads, config, steps_per_epoch=5)
  _, (terms, _) = loss_fn(state.params, state.batch_stats, jnp.int32(2), batch, teacher)

  # The same computation written out by hand, image by image.
  from pagkd_jax.data.normalization import normalize_images
  norm = lambda x: normalize_images(jnp.asarray(x).reshape((C * K, S, S, 3)), "imagenet")
  student = {"params": state.params["student"], "batch_stats": state.batch_stats["student"]}
  (_, s_feat), _ = model.apply(student, norm(batch["wli"]), train=True, mutable=["batch_stats"])
  _, t_feat = model.apply(teacher, norm(batch["nbi"]), train=False)
  labels = np.repeat(np.arange(C), K)  # Class-major order of the reshape above.
  r_wli = pagkd.region_labels(norm(batch["wli"]), s_feat, state.params["student"]["fc"]["kernel"], labels,
                              config.distill)
  r_nbi = pagkd.region_labels(norm(batch["nbi"]), t_feat, teacher["params"]["fc"]["kernel"], labels,
                              config.distill)
  rng = jax.random.fold_in(jax.random.key(config.seed + 1), 2)
  perm = np.asarray(pagkd.pair_images(jnp.arange(C * K).reshape(C, K), rng)).reshape(-1)
  groups = lambda a: a.reshape((C * K, 1) + a.shape[1:])
  expected = heads.apply({"params": state.params["heads"]}, groups(s_feat), groups(t_feat[perm]),
                         jnp.asarray(labels), groups(r_wli), groups(r_nbi[perm]))
  np.testing.assert_allclose(float(terms["loss_pro"]), float(expected["loss_pro"]), rtol=1e-4)
  np.testing.assert_allclose(float(terms["loss_den"]), float(expected["loss_den"]), rtol=1e-4)


SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np, sys
sys.path.insert(0, "tests")
assert jax.device_count() == 8
import test_pagkd_step as t
from pagkd_jax import mesh as mesh_lib
from pagkd_jax.methods import pagkd as pagkd_method

import optax
# Plain SGD: parameter displacements are then lr times the summed gradients (Adam's normalisation would blow float
# noise in near-zero gradients up to a full learning-rate step; test_data_parallel.py bounds that separately).
# The device counts sum in different orders: a few eps32 * sqrt(terms) of each array's scale. Measured: at most
# 8e-6 of an array's largest displacement (AVX2 and AVX-512); 1e-4 leaves room for other CPUs and is far below a
# real bug (per-device BatchNorm statistics, an unreduced gradient: 6% to 600% of the scale in
# test_data_parallel.py).
DISPLACEMENT_RTOL = 1e-4
LOSS_RTOL = 1e-5  # Means of a few dozen float32 terms: a few eps32 (1.2e-7) times their number.
EPS32 = float(np.finfo(np.float32).eps)
LR, STEPS = 0.05, 2
config, model, _, state0, teacher, batch = t._setup(group_size=8)
tx = optax.sgd(LR)
state0 = state0.replace(opt_state=tx.init(state0.params))
def run(devices):
  mesh = mesh_lib.make_mesh(devices)
  rep, grp = mesh_lib.replicated(mesh), mesh_lib.group_batch_sharding(mesh)
  update = jax.jit(pagkd_method.make_pagkd_update(model, pagkd_method.make_heads(config, t.C), tx, config, 5),
                   in_shardings=(rep, {"wli": grp, "nbi": grp, "label": rep}, rep), out_shardings=(rep, rep),
                   donate_argnums=0)
  state = jax.device_put(jax.tree.map(jnp.copy, state0), rep)
  b = {k: mesh_lib.global_array(v, grp if k != "label" else rep, v.shape) for k, v in batch.items()}
  losses = []
  for _ in range(STEPS):
    state, m = update(state, b, jax.device_put(teacher, rep))
    shard_shapes = {s.data.shape for s in b["wli"].addressable_shards}
    losses.append([float(m[k]) for k in ("loss", "loss_pro", "loss_den")])
  return jax.device_get(state.params), np.array(losses), shard_shapes
p1, l1, s1 = run(jax.devices()[:1])
p8, l8, s8 = run(jax.devices())
assert s1 == {(t.C, 8, t.S, t.S, 3)} and s8 == {(t.C, 1, t.S, t.S, 3)}, (s1, s8)
moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(state0.params), jax.tree.leaves(p8))]
assert sum(moved) > len(moved) // 2
np.testing.assert_allclose(l8, l1, rtol=LOSS_RTOL)
worst = 0.0
leaves = [[np.asarray(x, np.float64) for x in jax.tree.leaves(p)] for p in (state0.params, p1, p8)]
largest = max(np.max(np.abs(a - p0)) for p0, a in zip(leaves[0], leaves[1]))
for p0, a, b in zip(*leaves):
  # An array whose gradient vanishes mathematically (a bias that a softmax or a normalisation cancels) holds only
  # the rounding noise of terms as large as the other arrays' gradients: its scale is taken as at least 1% of the
  # largest displacement of any array.
  scale = max(np.max(np.abs(a - p0)), 1e-2 * largest)
  # Each run rounds p + displacement once per step: eps32 * |p| per run and step on top of the summation noise.
  bound = DISPLACEMENT_RTOL * scale + 2 * STEPS * EPS32 * np.maximum(np.abs(a), np.abs(p0))
  assert np.all(np.abs(b - a) <= bound), (a.shape, np.max(np.abs(b - a)), scale)
  worst = max(worst, np.max(np.abs(b - a)) / scale)
assert np.all(l1[:, 1:] > 0)
print(f"max |parameter difference| / largest displacement: {worst:.2e}")
print("OK", l1.tolist())
"""


@pytest.mark.numerics
def test_pagkd_step_on_one_and_eight_devices_agree(repo_root):
  stdout = run_on_host_devices(SCRIPT, repo_root, timeout=900)
  print(stdout)


def test_resnet50_pagkd_step_smoke():
  """The paper's backbone through one full distillation step, at a CPU-sized resolution."""
  config = base_config.get_config()
  config.data.image_size = 64
  config.data.group_size = 2
  config.data.classes = ("a", "b")
  config.distill.warmup_epochs = 0.0
  model = resnet.create_resnet("resnet50", 2)
  tx = optimizer.make_optimizer(config.optim, total_steps=10, steps_per_epoch=5)
  program = pagkd_method.PaGKDProgram(frozen=())
  state = jax.jit(lambda r: program.init_state(model, tx, r, config))(jax.random.key(0))
  teacher = jax.jit(lambda r: model.init(r, jnp.zeros((1, 64, 64, 3))))(jax.random.key(1))
  rng = np.random.default_rng(0)
  batch = {m: rng.integers(0, 256, (2, 2, 64, 64, 3), dtype=np.uint8) for m in ("wli", "nbi")}
  batch["label"] = np.arange(2, dtype=np.int32)
  update = jax.jit(pagkd_method.make_pagkd_update(model, pagkd_method.make_heads(config, 2), tx, config, 5))
  before = np.asarray(state.params["student"]["layer4_0"]["conv2"]["kernel"])
  state, metrics = update(state, batch, teacher)
  assert state.params["heads"]["student_embed"]["kernel"].shape == (2048, 128)
  assert all(np.isfinite(float(metrics[k])) for k in ("loss", "loss_cls", "loss_pro", "loss_den"))
  assert float(metrics["loss_pro"]) > 0 and float(metrics["loss_den"]) > 0
  assert not np.allclose(before, state.params["student"]["layer4_0"]["conv2"]["kernel"])
