"""Tests of the GKD-Pro prototype extractors (pagkd_jax/distill/qformer.py, spec section 4)."""

import math

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from pagkd_jax.distill import qformer

G, K, H, W, D = 3, 2, 2, 3, 16
NUM_QUERIES = 4


def _tokens(seed: int = 0, shape=(G, K, H, W, D)) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _model(variant: str, **kw) -> qformer.LRQFormer:
  heads = {"paper": 4, "release": 16}[variant]
  kw = {"num_queries": NUM_QUERIES, "num_layers": 2, "num_heads": heads, "variant": variant, "num_classes": 3,
        **kw}
  return qformer.LRQFormer(**kw)


# Jitted init/apply with the (hashable) module static: one compilation per module and shape instead
# of one per primitive, which keeps the cold run short.
_jit_init = jax.jit(lambda model, key, tokens, labels: model.init(key, tokens, labels), static_argnums=0)
_jit_apply = jax.jit(lambda model, params, tokens, labels: model.apply(params, tokens, labels), static_argnums=0)


def _labels(tokens) -> jax.Array:
  """Group g holds class g % 3 (the three class groups of a batch, in label order)."""
  return jnp.arange(tokens.shape[0]) % 3


def _init(model, tokens, seed: int = 1):
  return _jit_init(model, jax.random.key(seed), tokens, _labels(tokens))


def _apply(model, params, tokens, labels=None):
  return _jit_apply(model, params, tokens, _labels(tokens) if labels is None else labels)


# ---- NumPy references (float64, explicit loops) ------------------------------------------------


def _np(x) -> np.ndarray:
  return np.asarray(x, np.float64)


def np_dense(p, x):
  return x @ _np(p["kernel"]) + _np(p["bias"])


def np_attention(p, queries, inputs, num_heads):
  """One multi-head attention, queries (Lq, d), inputs (Lk, d), loops over heads/rows/keys."""
  d = queries.shape[-1]
  dh = d // num_heads
  q, k, v = np_dense(p["query"], queries), np_dense(p["key"], inputs), np_dense(p["value"], inputs)
  out = np.zeros((queries.shape[0], d))
  for h in range(num_heads):
    sl = slice(h * dh, (h + 1) * dh)
    for i in range(queries.shape[0]):
      logits = np.array([q[i, sl] @ k[j, sl] / math.sqrt(dh) for j in range(inputs.shape[0])])
      weights = np.exp(logits - logits.max())
      weights /= weights.sum()
      for j in range(inputs.shape[0]):
        out[i, sl] += weights[j] * v[j, sl]
  return np_dense(p["out"], out)


def np_layer_norm(p, x, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * _np(p["scale"]) + _np(p["bias"])


def np_gelu(x):  # tanh approximation (flax.linen.gelu default)
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def np_paper_qformer(params, tokens, num_layers, num_heads):
  tokens = _np(tokens)
  g, k, h, w, d = tokens.shape
  out = []
  for gi in range(g):
    memory = []
    for ki in range(k):
      for pos in range(h * w):
        row, col = divmod(pos, w)
        memory.append(tokens[gi, ki, row, col] + _np(params["spatial_embedding"][pos])
                      + _np(params["image_embedding"][ki]))
    memory = np.stack(memory)
    x = _np(params["queries"])
    for layer in range(num_layers):
      p = params[f"block_{layer}"]
      y = np_layer_norm(p["norm_self"], x)
      x = x + np_attention(p["self_attention"], y, y, num_heads)
      y = np_layer_norm(p["norm_cross"], x)
      x = x + np_attention(p["cross_attention"], y, memory, num_heads)
      y = np_layer_norm(p["norm_mlp"], x)
      x = x + np_dense(p["mlp_out"], np_gelu(np_dense(p["mlp_in"], y)))
    out.append(np_layer_norm(params["final_norm"], x))
  return np.stack(out)


# The release's identity codes as published in the spec (torch 2.13 CPU, 6 digits): torch.rand after
# manual_seed(42) and manual_seed(57).
SPEC_RAND_42 = [0.882269, 0.915004, 0.382864, 0.959306, 0.390448, 0.600895, 0.256572, 0.793641, 0.940771,
                0.133186, 0.934598, 0.59358]
SPEC_RAND_57 = [0.361508, 0.656965, 0.002137, 0.412866, 0.231633, 0.423011, 0.56037, 0.825603, 0.884707,
                0.39372, 0.536308, 0.906158]


def np_release_code(rank, k):
  """Code of image k of the group of the class of rank `rank` (generate_identity of the release)."""
  if rank == 0:
    return math.sin((k + 0.1) * 0.1)
  return (SPEC_RAND_42, SPEC_RAND_57)[rank - 1][k]


def np_release_qformer(params, tokens, num_heads, labels):
  tokens = _np(tokens)
  g, k, h, w, d = tokens.shape
  out = []
  for gi in range(g):
    memory = [tokens[gi, ki, r, c] + np_release_code(int(labels[gi]), ki) for ki in range(k) for r in range(h)
              for c in range(w)]
    out.append(np_attention(params["cross_attention"], _np(params["queries"]), np.stack(memory),
                            num_heads))
  return np.stack(out)


# ---- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["paper", "release"])
def test_output_shape_and_single_shared_query_array(variant):
  model = _model(variant)
  tokens = _tokens()
  params = _init(model, tokens)
  out = _apply(model, params, tokens)
  assert out.shape == (G, NUM_QUERIES, D)
  assert out.dtype == jnp.float32
  flat = traverse_util.flatten_dict(params["params"])
  query_leaves = [path for path in flat if path[-1] == "queries"]
  assert query_leaves == [("queries",)]
  assert flat[("queries",)].shape == (NUM_QUERIES, D)
  # The same params serve any group count (WLI and NBI both call this one instance).
  other = _apply(model, params, _tokens(5, (1, K, H, W, D)))
  assert other.shape == (1, NUM_QUERIES, D)


def test_paper_variant_matches_numpy_reference():
  model = _model("paper")
  tokens = _tokens()
  params = _init(model, tokens)
  # Give the embeddings and norms non-trivial values so every term is exercised.
  p = jax.tree.map(lambda x: x, params["params"])
  rng = np.random.default_rng(0)
  for name in ("spatial_embedding", "image_embedding", "queries"):
    p[name] = jnp.asarray(rng.normal(size=p[name].shape), jnp.float32)
  p["final_norm"] = {"scale": jnp.asarray(rng.uniform(0.5, 1.5, D), jnp.float32),
                     "bias": jnp.asarray(rng.normal(size=D), jnp.float32)}
  out = _apply(model, {"params": p}, tokens)
  expected = np_paper_qformer(p, tokens, num_layers=2, num_heads=4)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)


def test_release_variant_matches_numpy_multihead_cross_attention():
  model = _model("release", num_heads=None)  # Release default: 16 heads (d = 16 -> head dim 1).
  tokens = _tokens()
  params = _init(model, tokens)
  p = dict(params["params"])
  rng = np.random.default_rng(1)
  ca = {name: {"kernel": jnp.asarray(rng.normal(size=(D, D)) / 4, jnp.float32),
               "bias": jnp.asarray(rng.normal(size=D), jnp.float32)}
        for name in ("query", "key", "value", "out")}
  p["cross_attention"] = ca
  out = _apply(model, {"params": p}, tokens)
  expected = np_release_qformer(p, tokens, num_heads=16, labels=[0, 1, 2])
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)
  # Groups in another class order get their own class's codes.
  out_perm = _apply(model, {"params": p}, tokens, jnp.asarray([2, 0, 1]))
  np.testing.assert_allclose(np.asarray(out_perm), np_release_qformer(p, tokens, 16, [2, 0, 1]), rtol=1e-4,
                             atol=1e-4)
  # With 8 heads the result differs, so the head count is really used.
  out8 = _apply(_model("release", num_heads=8), {"params": p}, tokens)
  assert not np.allclose(np.asarray(out8), expected, atol=1e-3)


def test_paper_variant_is_token_permutation_invariant_without_position_embedding():
  model = _model("paper")
  tokens = _tokens()
  params = _init(model, tokens)
  p = dict(params["params"])
  rng = np.random.default_rng(2)
  p["spatial_embedding"] = jnp.zeros_like(p["spatial_embedding"])
  p["image_embedding"] = jnp.zeros_like(p["image_embedding"])
  flat = np.asarray(tokens).reshape(G, K * H * W, D)
  permuted = np.stack([flat[g, rng.permutation(K * H * W)] for g in range(G)])
  permuted = jnp.asarray(permuted.reshape(G, K, H, W, D))
  out = _apply(model, {"params": p}, tokens)
  out_perm = _apply(model, {"params": p}, permuted)
  np.testing.assert_allclose(np.asarray(out_perm), np.asarray(out), rtol=1e-5, atol=1e-5)
  # With a position embedding the same permutation changes the output.
  p["spatial_embedding"] = jnp.asarray(rng.normal(size=(H * W, D)), jnp.float32)
  p["image_embedding"] = jnp.asarray(rng.normal(size=(K, D)), jnp.float32)
  out = _apply(model, {"params": p}, tokens)
  out_perm = _apply(model, {"params": p}, permuted)
  assert np.abs(np.asarray(out_perm) - np.asarray(out)).max() > 1e-3


def test_release_variant_position_code_is_per_image():
  model = _model("release")
  tokens = _tokens()
  params = _init(model, tokens)
  out = _apply(model, params, tokens)
  # Shuffling positions within each image keeps the output (one scalar code per image)...
  rng = np.random.default_rng(3)
  t = np.asarray(tokens).reshape(G, K, H * W, D)
  shuffled = np.stack([np.stack([t[g, k, rng.permutation(H * W)] for k in range(K)])
                       for g in range(G)]).reshape(G, K, H, W, D)
  out_shuffled = _apply(model, params, jnp.asarray(shuffled))
  np.testing.assert_allclose(np.asarray(out_shuffled), np.asarray(out), rtol=1e-5, atol=1e-5)
  # ...but swapping the two images of a group changes it (each image index has its own code).
  swapped = np.asarray(tokens)[:, ::-1]
  out_swapped = _apply(model, params, jnp.asarray(swapped))
  assert np.abs(np.asarray(out_swapped) - np.asarray(out)).max() > 1e-3


@pytest.mark.parametrize("variant", ["paper", "release"])
def test_groups_are_processed_independently(variant):
  model = _model(variant)
  tokens = _tokens()
  params = _init(model, tokens)
  out = _apply(model, params, tokens)
  changed = tokens.at[1].set(_tokens(7, (K, H, W, D)))
  out_changed = _apply(model, params, changed)
  np.testing.assert_allclose(np.asarray(out_changed[0]), np.asarray(out[0]), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out_changed[2]), np.asarray(out[2]), rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(out_changed[1]) - np.asarray(out[1])).max() > 1e-3


def test_average_pool_prototypes_equal_the_mean():
  tokens = _tokens()
  model = qformer.AveragePoolPrototypes()
  params = model.init(jax.random.key(0), tokens)
  assert not jax.tree.leaves(params)
  out = np.asarray(_apply(model, params, tokens))
  assert out.shape == (G, 1, D)
  t = _np(tokens)
  for g in range(G):
    total = np.zeros(D)
    for k in range(K):
      for r in range(H):
        for c in range(W):
          total += t[g, k, r, c]
    np.testing.assert_allclose(out[g, 0], total / (K * H * W), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["paper", "release"])
def test_bfloat16_compute_is_close_to_float32(variant):
  tokens = _tokens()
  params = _init(_model(variant), tokens)
  out32 = np.asarray(_apply(_model(variant), params, tokens))
  out16 = _apply(_model(variant, dtype=jnp.bfloat16), params, tokens.astype(jnp.bfloat16))
  assert out16.dtype == jnp.bfloat16
  out16 = np.asarray(out16.astype(jnp.float32))
  # bfloat16 keeps ~3 significant digits: a few percent relative error overall, not more.
  rel = np.linalg.norm(out16 - out32) / np.linalg.norm(out32)
  assert rel < 3e-2, rel
  assert np.abs(out16 - out32).max() < 0.15 * np.abs(out32).max()


@pytest.mark.parametrize("variant", ["paper", "release"])
def test_gradients_reach_queries_and_tokens(variant):
  model = _model(variant)
  tokens = _tokens()
  params = _init(model, tokens)
  target = jax.random.normal(jax.random.key(9), (G, NUM_QUERIES, D))

  def loss(p, t):
    return jnp.sum((model.apply(p, t, _labels(t)) - target) ** 2)

  grad_p, grad_t = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, tokens)
  for leaf in jax.tree.leaves(grad_p) + [grad_t]:
    assert np.all(np.isfinite(np.asarray(leaf)))
  assert np.abs(np.asarray(grad_p["params"]["queries"])).max() > 1e-6
  assert np.abs(np.asarray(grad_t)).max() > 1e-6
  for g in range(G):  # every group's tokens get a gradient
    assert np.abs(np.asarray(grad_t[g])).max() > 1e-7


def test_factory_builds_both_kinds_and_rejects_unknown():
  kw = {"num_queries": NUM_QUERIES, "num_layers": 1, "num_heads": 4, "variant": "paper"}
  qf = qformer.make_prototype_extractor("qformer", **kw)
  assert isinstance(qf, qformer.LRQFormer) and qf.num_layers == 1
  avg = qformer.make_prototype_extractor("avg_pool", **kw)
  assert isinstance(avg, qformer.AveragePoolPrototypes)
  tokens = _tokens()
  assert _apply(avg, avg.init(jax.random.key(0), tokens), tokens).shape == (G, 1, D)
  # Inside a parent module, as the distillation heads call it (same kwargs for both kinds).
  class Parent(nn.Module):
    kind: str

    @nn.compact
    def __call__(self, t):
      return qformer.make_prototype_extractor(self.kind, **kw, dtype=jnp.float32,
                                              name="prototypes")(t)

  for kind, shape in (("qformer", (G, NUM_QUERIES, D)), ("avg_pool", (G, 1, D))):
    variables = Parent(kind).init(jax.random.key(0), tokens)
    assert Parent(kind).apply(variables, tokens).shape == shape
    if kind == "qformer":
      assert set(variables["params"]) == {"prototypes"}
  with pytest.raises(ValueError, match="'attention_pool'"):
    qformer.make_prototype_extractor("attention_pool")
  with pytest.raises(TypeError, match="bogus"):
    qformer.make_prototype_extractor("avg_pool", bogus=1)


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match=r"\(G, K, h, w, d\).*\(3, 4, 16\)"):
    _model("paper").init(jax.random.key(0), jnp.zeros((3, 4, 16)))
  with pytest.raises(ValueError, match="num_heads=5"):
    _model("paper", num_heads=5).init(jax.random.key(0), _tokens())
  with pytest.raises(ValueError, match="'decoder'"):
    qformer.LRQFormer(variant="decoder").init(jax.random.key(0), _tokens())
  with pytest.raises(ValueError, match=r"\(G, K, h, w, d\)"):
    qformer.AveragePoolPrototypes().init(jax.random.key(0), jnp.zeros((2, 3, 4)))


# ---- release identity codes and initialisation ---------------------------------------------------


def test_release_identity_codes_are_the_releases():
  codes = qformer.release_identity_codes(3, 12)
  assert codes.shape == (3, 12) and codes.dtype == np.float32
  for rank in range(3):
    for k in range(12):
      assert codes[rank, k] == pytest.approx(np_release_code(rank, k), abs=1e-6)
  np.testing.assert_array_equal(qformer.release_identity_codes(2, 5), codes[:2, :5])  # Prefixes.
  assert qformer.release_identity_codes(3, 32).shape == (3, 32)


def test_release_identity_codes_equal_torch_rand_bitwise():
  torch = pytest.importorskip("torch")
  codes = qformer.release_identity_codes(3, 32)
  rank0 = torch.tensor([math.sin((k + 0.1) * 0.1) for k in range(32)])  # As the release builds it.
  np.testing.assert_array_equal(codes[0], rank0.numpy())
  for rank, seed in ((1, 42), (2, 57)):
    torch.manual_seed(seed)
    np.testing.assert_array_equal(codes[rank], torch.rand(32).numpy())
    for n in (1, 8, 13):  # The release draws torch.rand(N_c): a prefix of the stored values.
      torch.manual_seed(seed)
      np.testing.assert_array_equal(codes[rank, :n], torch.rand(n).numpy())


def test_release_codes_depend_on_the_class_not_on_the_modality():
  model = _model("release")
  tokens = _tokens()
  params = _init(model, tokens)
  out = np.asarray(_apply(model, params, tokens, jnp.asarray([0, 1, 2])))
  # The same tokens under another class get that class's codes (so a different output)...
  relabelled = np.asarray(_apply(model, params, tokens, jnp.asarray([1, 1, 1])))
  np.testing.assert_array_equal(relabelled[1], out[1])
  assert np.abs(relabelled[0] - out[0]).max() > 1e-4
  # ...and WLI and NBI groups of a class (two calls of one module with the same labels) get the same codes:
  # equal tokens give equal prototypes.
  wli, nbi = _apply(model, params, tokens), _apply(model, params, tokens)
  np.testing.assert_array_equal(np.asarray(wli), np.asarray(nbi))


def test_release_code_errors_name_the_value():
  with pytest.raises(ValueError, match="at most 3 classes.*got 4 classes"):
    qformer.release_identity_codes(4, 8)
  with pytest.raises(ValueError, match="at most 32 images.*group size 33"):
    qformer.release_identity_codes(3, 33)
  tokens = _tokens(0, (4, 33, 1, 1, D))
  with pytest.raises(ValueError, match="group size 33"):
    _model("release").init(jax.random.key(0), tokens, jnp.arange(4) % 3)
  with pytest.raises(ValueError, match="got 4 classes"):
    _model("release", num_classes=4).init(jax.random.key(0), _tokens(), jnp.arange(G))
  with pytest.raises(ValueError, match="group labels"):
    _model("release").init(jax.random.key(0), _tokens())


def _uniform_bound_checks(x, bound):
  """x looks like U(-bound, bound): inside the bound, reaching close to it, with its mean and std."""
  x = np.asarray(x, np.float64).ravel()
  assert np.abs(x).max() <= bound
  assert np.abs(x).max() > 0.95 * bound
  assert abs(x.mean()) < 5 * bound / math.sqrt(3 * x.size)
  assert x.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_release_attention_has_torch_multihead_attention_init():
  d = 64
  tokens = _tokens(0, (1, 2, 4, 4, d))
  release = qformer.LRQFormer(num_queries=12, variant="release", num_classes=3)
  p = release.init(jax.random.key(3), tokens, jnp.asarray([0]))["params"]
  assert p["queries"].shape == (12, d)
  assert np.asarray(p["queries"]).std() == pytest.approx(1.0, rel=0.15)  # torch.randn.
  ca = p["cross_attention"]
  # torch: xavier_uniform_ on the stacked (3d, d) in_proj_weight, out_proj = nn.Linear default, biases zero.
  in_proj = np.concatenate([np.asarray(ca[n]["kernel"]) for n in ("query", "key", "value")], axis=1)
  _uniform_bound_checks(in_proj, math.sqrt(6.0 / (d + 3 * d)))
  _uniform_bound_checks(ca["out"]["kernel"], 1.0 / math.sqrt(d))
  for name in ("query", "key", "value", "out"):
    np.testing.assert_array_equal(np.asarray(ca[name]["bias"]), 0.0)
  # The paper variant keeps its own initialisation (Xavier per d x d kernel, queries N(0, 0.02^2)).
  paper = qformer.LRQFormer(num_queries=12, num_layers=1, num_heads=8).init(jax.random.key(3), tokens)["params"]
  kernel = np.asarray(paper["block_0"]["cross_attention"]["query"]["kernel"])
  assert np.abs(kernel).max() > math.sqrt(6.0 / (4 * d))  # Beyond the release's bound: sqrt(6 / 2d).
  assert np.asarray(paper["queries"]).std() == pytest.approx(0.02, rel=0.15)
