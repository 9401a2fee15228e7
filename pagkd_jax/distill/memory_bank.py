"""CRCKD's memory banks (spec CRCKD.md, "CCD"): one embedding row per training image, per side.

`MemoryBanks` is a fixed-shape pytree that belongs to the training state (checkpointed, restored on resume):
  * `student`, `teacher`: `(N_train, d)` float32 rows, initialised U(-s, s), s = 1 / sqrt(d / 3);
  * `labels`: `(N_train,)` int32 class of each row (fixed; the training split's labels in row order);
  * `normalizers`: `(2,)` float32 CCD constants Z, [student anchors vs the teacher bank, teacher anchors vs the
    student bank]; 0 until the first batch fixes them (see `crckd.ccd_loss`).

Row r is training image r: the data pipeline gives every image its row index, and a global batch's rows are
updated once (`update_memory_banks`), after the losses of the step were computed from the rows before it.

`draw_contrast_rows` is the jitted, fixed-shape draw of each anchor's rows: the anchor's own row, P - 1 other rows
of its class and K rows of other classes. `sampling_shortfalls` (host side, once) names the classes for which the
draw has to repeat rows, so the caller can say so once.

The spec's sizes (d = 128, momentum 0.5, P = 20, K = 4096) are `crckd.DEFAULTS`; here they are arguments.
"""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class MemoryBanks:
  """student / teacher `(N, d)` float32, labels `(N,)` int32, normalizers `(2,)` float32 (0 = not fixed yet)."""

  student: jax.Array
  teacher: jax.Array
  labels: jax.Array
  normalizers: jax.Array

  @property
  def num_rows(self) -> int:
    return self.student.shape[0]


def default_init_scale(dim: int) -> float:
  """s = 1 / sqrt(d / 3): the bound of the rows' initial U(-s, s) (spec; gives rows of norm about 1)."""
  return 1.0 / math.sqrt(dim / 3.0)


def init_memory_banks(key: jax.Array, row_labels, dim: int, init_scale: float | None = None,
                      num_classes: int | None = None) -> MemoryBanks:
  """Both banks drawn U(-s, s) independently, s = `init_scale` or `default_init_scale(dim)`.

  Args:
    key: PRNG key.
    row_labels: `(N_train,)` int class of each training image, in row order.
    dim: d, the CCD embedding size (128).
    init_scale: s; None for 1 / sqrt(d / 3).
    num_classes: C, if given: every label must be below it.
  Raises:
    ValueError: row_labels not 1-D, empty, out of [0, C), or of a single class (CCD has no negatives then).
  """
  labels = np.asarray(row_labels)
  if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"init_memory_banks: row_labels must be a non-empty 1-D integer array (one class per training "
                     f"image); got shape {labels.shape}, dtype {labels.dtype}.")
  if labels.min() < 0:
    raise ValueError(f"init_memory_banks: row_labels must be >= 0; got {labels.min()}.")
  if num_classes is not None and labels.max() >= num_classes:
    raise ValueError(f"init_memory_banks: row_labels holds class {labels.max()}, but there are {num_classes} classes.")
  if len(np.unique(labels)) < 2:
    raise ValueError(f"init_memory_banks: the training split holds a single class ({labels[0]}); CCD needs images of "
                     "at least two classes (the negatives are images of other classes).")
  s = default_init_scale(dim) if init_scale is None else float(init_scale)
  k_student, k_teacher = jax.random.split(key)
  n = labels.shape[0]
  return MemoryBanks(student=jax.random.uniform(k_student, (n, dim), jnp.float32, -s, s),
                     teacher=jax.random.uniform(k_teacher, (n, dim), jnp.float32, -s, s),
                     labels=jnp.asarray(labels, jnp.int32), normalizers=jnp.zeros((2,), jnp.float32))


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along the last axis (float32), with a finite gradient at x = 0."""
  x = x.astype(jnp.float32)
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def last_occurrence(rows: jax.Array) -> jax.Array:
  """`(B,)` bool: True where rows[i] does not occur again later in `rows` (O(B^2), B is a batch)."""
  b = rows.shape[0]
  later = jnp.arange(b)[None, :] > jnp.arange(b)[:, None]
  return ~jnp.any((rows[:, None] == rows[None, :]) & later, axis=1)


def momentum_rows(bank: jax.Array, rows: jax.Array, features: jax.Array, momentum: float,
                  eps: float = 1e-12) -> jax.Array:
  """bank with bank[rows[i]] <- l2norm(momentum * bank[rows[i]] + (1 - momentum) * features[i]).

  A row that occurs several times in `rows` (a batch drawn with repetition) takes the update of its last
  occurrence, computed from the row before the call; no gradient flows into the bank.

  Args:
    bank: `(N, d)` float32. rows: `(B,)` int rows of the batch. features: `(B, d)` the batch's embeddings.
    momentum: weight of the old row (0.5).
  Returns:
    `(N, d)` float32.
  """
  features = jax.lax.stop_gradient(features.astype(jnp.float32))
  updated = l2_normalize(momentum * bank[rows] + (1.0 - momentum) * features, eps)
  target = jnp.where(last_occurrence(rows), rows, bank.shape[0])  # Out of range: dropped.
  return bank.at[target].set(updated, mode="drop")


def update_memory_banks(banks: MemoryBanks, rows: jax.Array, f_student: jax.Array, f_teacher: jax.Array,
                        momentum: float, eps: float = 1e-12) -> MemoryBanks:
  """Spec: after the step each anchor's row is m <- l2norm(momentum m + (1 - momentum) f), on both sides.

  Args:
    rows: `(B,)` int rows of the global batch. f_student, f_teacher: `(B, d)` the CCD embeddings of the batch.
  """
  if rows.ndim != 1 or f_student.shape != (rows.shape[0], banks.student.shape[1]) or f_teacher.shape != f_student.shape:
    raise ValueError(f"update_memory_banks: rows must be (B,) and f_student, f_teacher (B, d) = "
                     f"({rows.shape[0] if rows.ndim == 1 else '?'}, {banks.student.shape[1]}); got rows "
                     f"{tuple(rows.shape)}, f_student {tuple(f_student.shape)}, f_teacher {tuple(f_teacher.shape)}.")
  return banks.replace(student=momentum_rows(banks.student, rows, f_student, momentum, eps),
                       teacher=momentum_rows(banks.teacher, rows, f_teacher, momentum, eps))


def _draw_from_pools(key: jax.Array, pools: jax.Array, count: int, fallback: jax.Array) -> jax.Array:
  """`count` rows per anchor from its pool `(B, N)` bool, uniformly.

  Without repetition when the pool holds at least `count` rows. A smaller pool of m rows is taken whole, in
  random order, and repeated cyclically: every row then occurs floor(count / m) or ceil(count / m) times. An
  empty pool gives `fallback` `(B,)` everywhere.
  Returns: `(B, count)` int32.
  """
  b, n = pools.shape
  if count == 0:
    return jnp.zeros((b, 0), jnp.int32)
  # Random keys in [0, 1) on the pool, 2 elsewhere: the smallest keys are the pool's rows, in random order.
  keys = jnp.where(pools, jax.random.uniform(key, (b, n)), 2.0)
  _, order = jax.lax.top_k(-keys, min(count, n))
  size = jnp.sum(pools, axis=1)  # (B,)
  slots = jnp.arange(count)[None, :] % jnp.maximum(size, 1)[:, None]
  picks = jnp.take_along_axis(order, slots, axis=1)
  return jnp.where(size[:, None] > 0, picks, fallback[:, None]).astype(jnp.int32)


def draw_contrast_rows(key: jax.Array, row_labels: jax.Array, anchor_rows: jax.Array, num_positives: int,
                       num_negatives: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The bank rows each anchor is scored against (spec, CCD): fixed shape, jit-able.

  Column 0 is the anchor's own row; columns 1 .. P - 1 are other rows of the anchor's class; columns P .. P + K - 1
  rows of the other classes. Both sets are drawn uniformly without repetition when there are enough rows, else
  with repetition (see `_draw_from_pools`): a class of fewer than P rows repeats positives (a class of one row
  repeats the anchor), and fewer than K rows of other classes repeat negatives. The release draws P positives
  among all the class's rows and then overwrites the first with the anchor, so it can hold the anchor twice; here
  the anchor is once in column 0 when its class allows.

  Args:
    key: PRNG key.
    row_labels: `(N,)` int class of every bank row (`MemoryBanks.labels`).
    anchor_rows: `(B,)` int rows of the batch's images.
    num_positives: P (the anchor's row included), >= 1.
    num_negatives: K, >= 1.
  Returns:
    rows `(B, P + K)` int32; positives_repeated `(B,)` bool (the anchor's class has fewer than P rows);
    negatives_repeated `(B,)` bool (fewer than K rows of other classes).
  """
  if num_positives < 1 or num_negatives < 1:
    raise ValueError(f"draw_contrast_rows: num_positives and num_negatives must be >= 1; got {num_positives}, "
                     f"{num_negatives}.")
  n = row_labels.shape[0]
  anchor_rows = anchor_rows.astype(jnp.int32)
  same_class = row_labels[None, :] == row_labels[anchor_rows][:, None]  # (B, N)
  not_anchor = jnp.arange(n)[None, :] != anchor_rows[:, None]
  k_pos, k_neg = jax.random.split(key)
  positives = _draw_from_pools(k_pos, same_class & not_anchor, num_positives - 1, anchor_rows)
  negatives = _draw_from_pools(k_neg, ~same_class, num_negatives, anchor_rows)
  rows = jnp.concatenate([anchor_rows[:, None], positives, negatives], axis=1)
  class_size = jnp.sum(same_class, axis=1)
  return rows, class_size < num_positives, (n - class_size) < num_negatives


def sampling_shortfalls(row_labels, num_positives: int, num_negatives: int) -> dict[str, dict[int, int]]:
  """Host side, once: the classes whose draw repeats rows, for one message in the log.

  Returns:
    {"positives": {class: rows of the class} for classes with fewer than P rows,
     "negatives": {class: rows of other classes} for classes with fewer than K rows of other classes}.
  """
  labels = np.asarray(row_labels)
  classes, counts = np.unique(labels, return_counts=True)
  return {"positives": {int(c): int(m) for c, m in zip(classes, counts) if m < num_positives},
          "negatives": {int(c): int(labels.size - m) for c, m in zip(classes, counts)
                        if labels.size - m < num_negatives}}
