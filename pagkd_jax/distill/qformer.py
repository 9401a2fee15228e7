"""Prototype extractors of GKD-Pro (spec section 4): the LR-QFormer and its average-pool ablation.

Both map the group tokens of G groups, `(G, K, h, w, d)` (K images per group, each a layer4 map
projected to d channels), to a prototype set per group, `(G, N_q, d)`. The same module instance
(the same params) is applied to WLI and to NBI tokens, so the lesion queries are shared by all
classes and both modalities.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

VARIANTS = ("paper", "release")
EXTRACTOR_KINDS = ("qformer", "avg_pool")

# Per-variant default number of heads when `LRQFormer.num_heads` is None.
DEFAULT_HEADS = {"paper": 8, "release": 16}

# The release's per-image identity codes of class ranks 1 and 2: the first values of torch's CPU generator,
# `torch.manual_seed(42); torch.rand(32)` and the same with seed 57 (float32, torch 2.13; torch.rand(n) is a prefix
# of torch.rand(32) for every n <= 32). Rank 0 uses sin((k + 0.1) * 0.1) instead.
_RELEASE_RAND_SEED_42 = (
    0.8822692632675171, 0.9150039553642273, 0.38286375999450684, 0.9593056440353394, 0.3904482126235962,
    0.600895345211029, 0.2565724849700928, 0.7936413288116455, 0.9407714605331421, 0.13318592309951782,
    0.9345980882644653, 0.5935796499252319, 0.8694044351577759, 0.5677152872085571, 0.7410940527915955,
    0.42940449714660645, 0.8854429125785828, 0.5739044547080994, 0.2665800452232361, 0.6274491548538208,
    0.26963168382644653, 0.4413635730743408, 0.2969208359718323, 0.831685483455658, 0.10531491041183472,
    0.26949483156204224, 0.3588126301765442, 0.19936376810073853, 0.5471915602684021, 0.006160438060760498,
    0.951554536819458, 0.07526588439941406)
_RELEASE_RAND_SEED_57 = (
    0.361508309841156, 0.6569646596908569, 0.002136528491973877, 0.4128659963607788, 0.23163312673568726,
    0.42301130294799805, 0.560369610786438, 0.8256030082702637, 0.884706974029541, 0.39371973276138306,
    0.5363077521324158, 0.9061580300331116, 0.6174567341804504, 0.6103177070617676, 0.04770725965499878,
    0.507382869720459, 0.6552324891090393, 0.06090128421783447, 0.7199400067329407, 0.523902952671051,
    0.381811261177063, 0.11332225799560547, 0.023384153842926025, 0.2577937841415405, 0.6515390872955322,
    0.3780520558357239, 0.03546673059463501, 0.3173173666000366, 0.8233062028884888, 0.2626732587814331,
    0.5563353896141052, 0.7730164527893066)
RELEASE_MAX_CLASSES = 3  # The release defines codes for three class ranks (and crashes on a fourth).
RELEASE_MAX_GROUP_SIZE = len(_RELEASE_RAND_SEED_42)


def release_identity_codes(num_classes: int, group_size: int) -> np.ndarray:
  """The release LR-QFormer's per-image codes (spec 4): `(num_classes, group_size)` float32.

  Row c is the code of the class of rank c (its label index), entry k the scalar added to every token of image k
  of that class's group, the same for the WLI and the NBI group: rank 0: sin((k + 0.1) * 0.1); rank 1: the first
  values of torch's `rand` after `manual_seed(42)`; rank 2: the same after `manual_seed(57)`.
  """
  if not 1 <= num_classes <= RELEASE_MAX_CLASSES:
    raise ValueError(
        f"The release variant's LR-QFormer has identity codes for at most {RELEASE_MAX_CLASSES} classes (the "
        f"release crashes on more); got {num_classes} classes. Use distill.variant='paper' or "
        f"distill.prototypes='avg_pool' for more classes.")
  if not 1 <= group_size <= RELEASE_MAX_GROUP_SIZE:
    raise ValueError(
        f"The release variant's identity codes are stored for groups of at most {RELEASE_MAX_GROUP_SIZE} images; "
        f"got group size {group_size} (data.group_size, or 1 at the image level).")
  rank0 = [math.sin((k + 0.1) * 0.1) for k in range(group_size)]
  rows = (rank0, _RELEASE_RAND_SEED_42[:group_size], _RELEASE_RAND_SEED_57[:group_size])
  return np.asarray(rows[:num_classes], np.float32)


def symmetric_uniform(bound: float) -> nn.initializers.Initializer:
  """Initialiser drawing U(-bound, bound), as torch's `nn.init.uniform_(w, -bound, bound)`."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _check_tokens(tokens: jax.Array, who: str) -> None:
  if tokens.ndim != 5:
    raise ValueError(
        f"{who} expects group tokens of shape (G, K, h, w, d); got shape {tuple(tokens.shape)}.")


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention with q/k/v/output projections (with bias).

  `(..., L_q, d) x (..., L_k, d) -> (..., L_q, d)`. Logits are scaled by 1/sqrt(d / num_heads);
  the softmax is computed in float32 whatever the compute dtype. Projection kernels use
  Xavier-uniform initialisation (each d x d kernel on its own) and zero biases; with `torch_init`, the
  initialisation of torch's `nn.MultiheadAttention` instead: q/k/v kernels Xavier-uniform over torch's stacked
  (3d, d) input projection, i.e. U(-b, b) with b = sqrt(6 / (d + 3d)), the output kernel torch's default Linear
  init U(-1/sqrt(d), 1/sqrt(d)), all biases zero.

  Attributes:
    num_heads: number of heads; must divide d.
    torch_init: torch's initialisation (the release variant) instead of per-kernel Xavier.
    dtype: compute dtype (params stay `param_dtype`).
    param_dtype: parameter dtype.
  """

  num_heads: int
  torch_init: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, queries: jax.Array, inputs: jax.Array) -> jax.Array:
    """queries `(..., L_q, d)`, inputs (keys = values) `(..., L_k, d)` -> `(..., L_q, d)`."""
    d = queries.shape[-1]
    if inputs.shape[-1] != d:
      raise ValueError(
          f"MultiHeadAttention: query width {d} != key/value width {inputs.shape[-1]}.")
    if self.num_heads <= 0 or d % self.num_heads:
      raise ValueError(f"MultiHeadAttention: num_heads={self.num_heads} must divide d={d}.")
    head_dim = d // self.num_heads

    def dense(name: str) -> nn.Dense:
      kernel_init = nn.initializers.xavier_uniform()
      if self.torch_init:
        kernel_init = symmetric_uniform(1.0 / math.sqrt(d) if name == "out" else math.sqrt(6.0 / (4 * d)))
      return nn.Dense(d, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=kernel_init, bias_init=nn.initializers.zeros, name=name)

    def split_heads(x: jax.Array) -> jax.Array:
      return x.reshape(*x.shape[:-1], self.num_heads, head_dim)

    q = split_heads(dense("query")(queries))  # (..., L_q, H, dh)
    k = split_heads(dense("key")(inputs))  # (..., L_k, H, dh)
    v = split_heads(dense("value")(inputs))  # (..., L_k, H, dh)
    q = q / jnp.sqrt(jnp.asarray(head_dim, q.dtype))
    logits = jnp.einsum("...qhc,...khc->...hqk", q, k)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    attended = jnp.einsum("...hqk,...khc->...qhc", weights, v)
    attended = attended.reshape(*attended.shape[:-2], d)
    return dense("out")(attended)


class QueryDecoderBlock(nn.Module):
  """Pre-LayerNorm transformer decoder block for the lesion queries (spec 4, paper variant).

  x <- x + SelfAttn(LN(x)); x <- x + CrossAttn(LN(x), memory); x <- x + MLP(LN(x)).
  `(G, N_q, d) x (G, L, d) -> (G, N_q, d)`.
  """

  num_heads: int
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, memory: jax.Array) -> jax.Array:
    d = x.shape[-1]
    norm = lambda name: nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    attention = lambda name: MultiHeadAttention(
        self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    h = norm("norm_self")(x)
    x = x + attention("self_attention")(h, h)
    h = norm("norm_cross")(x)
    x = x + attention("cross_attention")(h, memory)
    h = norm("norm_mlp")(x)
    h = nn.Dense(self.mlp_ratio * d, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="mlp_in")(h)
    h = nn.gelu(h)
    h = nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp_out")(h)
    return x + h


class LRQFormer(nn.Module):
  """Lesion-representation Q-Former (spec 4): `(G, K, h, w, d) -> (G, N_q, d)`.

  One learnable query set `queries (N_q, d)` is shared by every group and both modalities.

  * variant "paper": tokens + E_pos, where E_pos = learned spatial embedding `(h*w, d)` + learned
    image-index embedding `(K, d)` (shapes fixed by the input seen at init); T = `num_layers`
    pre-LN decoder blocks (self-attention, cross-attention to the tokens, MLP, residuals); a final
    LayerNorm. Queries start from N(0, 0.02^2).
  * variant "release": every token of image k of a group of class c gets the scalar code
    `release_identity_codes(num_classes, K)[c, k]` added to every channel (the same for WLI and NBI); one
    multi-head cross-attention from the queries to the tokens (q/k/v/out projections with bias, torch's
    `nn.MultiheadAttention` initialisation); no self-attention, MLP, LayerNorm or residual. Queries start from
    N(0, 1) (torch.randn in the release).

  Attributes:
    num_queries: N_q.
    num_layers: T, number of decoder blocks (paper variant only).
    num_heads: attention heads; None picks the variant's default (paper 8, release 16).
    mlp_ratio: MLP hidden width / d (paper variant only).
    variant: "paper" or "release".
    num_classes: C, the number of identity-code rows (release variant only; at most 3).
    dtype: compute dtype (softmaxes in float32; params float32). The output has this dtype.
  """

  num_queries: int = 12
  num_layers: int = 2
  num_heads: int | None = None
  mlp_ratio: int = 4
  variant: str = "paper"
  num_classes: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, labels: jax.Array | None = None) -> jax.Array:
    """tokens `(G, K, h, w, d)`, labels `(G,)` int class of each group (release variant) -> `(G, N_q, d)`."""
    if self.variant not in VARIANTS:
      raise ValueError(f"LRQFormer: unknown variant {self.variant!r}; expected one of {VARIANTS}.")
    _check_tokens(tokens, "LRQFormer")
    g, k, h, w, d = tokens.shape
    if self.variant == "release":
      if self.num_classes is None or labels is None:
        raise ValueError("LRQFormer(variant='release') needs num_classes and the (G,) group labels: its identity "
                         "codes depend on the class.")
      if jnp.shape(labels) != (g,):
        raise ValueError(f"LRQFormer: labels must have shape (G,) = ({g},); got {tuple(jnp.shape(labels))}.")
      codes = jnp.asarray(release_identity_codes(self.num_classes, k))
    num_heads = DEFAULT_HEADS[self.variant] if self.num_heads is None else self.num_heads
    if num_heads <= 0 or d % num_heads:
      raise ValueError(f"LRQFormer: num_heads={num_heads} must divide the token width d={d}.")
    tokens = tokens.astype(self.dtype).reshape(g, k, h * w, d)

    query_std = 0.02 if self.variant == "paper" else 1.0
    queries = self.param("queries", nn.initializers.normal(stddev=query_std),
                         (self.num_queries, d), jnp.float32)
    x = jnp.broadcast_to(queries.astype(self.dtype), (g, self.num_queries, d))

    if self.variant == "release":
      image_code = codes[jnp.asarray(labels, jnp.int32)].astype(self.dtype)[:, :, None, None]  # (G, K, 1, 1)
      memory = (tokens + image_code).reshape(g, k * h * w, d)
      return MultiHeadAttention(num_heads, torch_init=True, dtype=self.dtype, name="cross_attention")(x, memory)

    embed_init = nn.initializers.normal(stddev=0.02)
    spatial = self.param("spatial_embedding", embed_init, (h * w, d), jnp.float32)
    image = self.param("image_embedding", embed_init, (k, d), jnp.float32)
    pos = (spatial[None, :, :] + image[:, None, :]).astype(self.dtype)  # (K, h*w, d)
    memory = (tokens + pos[None]).reshape(g, k * h * w, d)
    for layer in range(self.num_layers):
      x = QueryDecoderBlock(num_heads, self.mlp_ratio, dtype=self.dtype,
                            name=f"block_{layer}")(x, memory)
    return nn.LayerNorm(dtype=self.dtype, name="final_norm")(x)


class AveragePoolPrototypes(nn.Module):
  """Ablation "LR-QFormer replaced by average pooling" (spec 6): `(G, K, h, w, d) -> (G, 1, d)`.

  The mean of all K*h*w tokens of a group (accumulated in float32), no parameters.

  Attributes:
    dtype: dtype of the output.
  """

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, labels: jax.Array | None = None) -> jax.Array:
    """tokens `(G, K, h, w, d)` (labels are accepted and ignored) -> `(G, 1, d)`."""
    del labels
    _check_tokens(tokens, "AveragePoolPrototypes")
    mean = jnp.mean(tokens.astype(jnp.float32), axis=(1, 2, 3))
    return mean[:, None, :].astype(self.dtype)


_QFORMER_FIELDS = ("num_queries", "num_layers", "num_heads", "mlp_ratio", "variant", "num_classes")


def make_prototype_extractor(kind: str, **kw: Any) -> nn.Module:
  """Builds the GKD-Pro prototype extractor named by `kind` ("qformer" or "avg_pool").

  `kw` are the `LRQFormer` attributes (plus Linen's `name`/`parent`). For "avg_pool", the
  LR-QFormer-only attributes (num_queries, num_layers, num_heads, mlp_ratio, variant, num_classes) are accepted
  and ignored so that the same call can switch between the two; `dtype`, `name` and `parent` are
  honoured; anything else raises a TypeError.
  """
  if kind == "qformer":
    return LRQFormer(**kw)
  if kind == "avg_pool":
    passed = {"dtype", "name", "parent"}
    unknown = sorted(set(kw) - set(_QFORMER_FIELDS) - passed)
    if unknown:
      raise TypeError(f"make_prototype_extractor('avg_pool'): unexpected arguments {unknown}.")
    return AveragePoolPrototypes(**{key: value for key, value in kw.items() if key in passed})
  raise ValueError(
      f"make_prototype_extractor: unknown kind {kind!r}; expected one of {EXTRACTOR_KINDS}.")
