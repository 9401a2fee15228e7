"""Prototype extractors of GKD-Pro (spec section 4): the LR-QFormer and its average-pool ablation.

Both map the group tokens of G groups, `(G, K, h, w, d)` (K images per group, each a layer4 map
projected to d channels), to a prototype set per group, `(G, N_q, d)`. The same module instance
(the same params) is applied to WLI and to NBI tokens, so the lesion queries are shared by all
classes and both modalities.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

VARIANTS = ("paper", "release")
EXTRACTOR_KINDS = ("qformer", "avg_pool")

# Per-variant default number of heads when `LRQFormer.num_heads` is None.
_DEFAULT_HEADS = {"paper": 8, "release": 16}


def _check_tokens(tokens: jax.Array, who: str) -> None:
  if tokens.ndim != 5:
    raise ValueError(
        f"{who} expects group tokens of shape (G, K, h, w, d); got shape {tuple(tokens.shape)}.")


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention with q/k/v/output projections (with bias).

  `(..., L_q, d) x (..., L_k, d) -> (..., L_q, d)`. Logits are scaled by 1/sqrt(d / num_heads);
  the softmax is computed in float32 whatever the compute dtype (`jax.nn.dot_product_attention`). Projection kernels use
  Xavier-uniform initialisation and zero biases (as torch's `nn.MultiheadAttention`).

  Attributes:
    num_heads: number of heads; must divide d.
    dtype: compute dtype (params stay `param_dtype`).
    param_dtype: parameter dtype.
  """

  num_heads: int
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
      return nn.Dense(d, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=nn.initializers.xavier_uniform(),
                      bias_init=nn.initializers.zeros, name=name)

    def split_heads(x: jax.Array) -> jax.Array:
      return x.reshape(*x.shape[:-1], self.num_heads, head_dim)

    q = split_heads(dense("query")(queries))  # (..., L_q, H, dh)
    k = split_heads(dense("key")(inputs))  # (..., L_k, H, dh)
    v = split_heads(dense("value")(inputs))  # (..., L_k, H, dh)
    # The library attention: softmax(q k^T / sqrt(dh)) v per head, logits and softmax in float32; it takes one
    # batch axis, so the leading axes are flattened.
    batch = q.shape[:-3]
    attended = jax.nn.dot_product_attention(q.reshape(-1, *q.shape[-3:]), k.reshape(-1, *k.shape[-3:]),
                                            v.reshape(-1, *v.shape[-3:]), scale=head_dim ** -0.5)
    attended = attended.reshape(*batch, q.shape[-3], d)
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
  * variant "release": tokens of image k get the scalar k (as a float) added to every channel; one
    multi-head cross-attention from the queries to the tokens (q/k/v/out projections with bias); no
    self-attention, MLP, LayerNorm or residual. Queries start from N(0, 1) (torch.randn in the
    release).

  Attributes:
    num_queries: N_q.
    num_layers: T, number of decoder blocks (paper variant only).
    num_heads: attention heads; None picks the variant's default (paper 8, release 16).
    mlp_ratio: MLP hidden width / d (paper variant only).
    variant: "paper" or "release".
    dtype: compute dtype (softmaxes in float32; params float32). The output has this dtype.
  """

  num_queries: int = 12
  num_layers: int = 2
  num_heads: int | None = None
  mlp_ratio: int = 4
  variant: str = "paper"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens `(G, K, h, w, d)` -> prototypes `(G, N_q, d)`."""
    if self.variant not in VARIANTS:
      raise ValueError(f"LRQFormer: unknown variant {self.variant!r}; expected one of {VARIANTS}.")
    _check_tokens(tokens, "LRQFormer")
    g, k, h, w, d = tokens.shape
    num_heads = _DEFAULT_HEADS[self.variant] if self.num_heads is None else self.num_heads
    if num_heads <= 0 or d % num_heads:
      raise ValueError(f"LRQFormer: num_heads={num_heads} must divide the token width d={d}.")
    tokens = tokens.astype(self.dtype).reshape(g, k, h * w, d)

    query_std = 0.02 if self.variant == "paper" else 1.0
    queries = self.param("queries", nn.initializers.normal(stddev=query_std),
                         (self.num_queries, d), jnp.float32)
    x = jnp.broadcast_to(queries.astype(self.dtype), (g, self.num_queries, d))

    if self.variant == "release":
      image_code = jnp.arange(k, dtype=self.dtype)[None, :, None, None]  # (1, K, 1, 1)
      memory = (tokens + image_code).reshape(g, k * h * w, d)
      return MultiHeadAttention(num_heads, dtype=self.dtype, name="cross_attention")(x, memory)

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
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens `(G, K, h, w, d)` -> `(G, 1, d)`."""
    _check_tokens(tokens, "AveragePoolPrototypes")
    mean = jnp.mean(tokens.astype(jnp.float32), axis=(1, 2, 3))
    return mean[:, None, :].astype(self.dtype)


_QFORMER_FIELDS = ("num_queries", "num_layers", "num_heads", "mlp_ratio", "variant")


def make_prototype_extractor(kind: str, **kw: Any) -> nn.Module:
  """Builds the GKD-Pro prototype extractor named by `kind` ("qformer" or "avg_pool").

  `kw` are the `LRQFormer` attributes (plus Linen's `name`/`parent`). For "avg_pool", the
  LR-QFormer-only attributes (num_queries, num_layers, num_heads, mlp_ratio, variant) are accepted
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
