"""Leakage-free train/val/test splits: stratified K-fold over lesion (or patient) groups.

Spec section 1: 5-fold cross-validation split by lesion; section 6: checkpoints are chosen on a
validation split carved from the training folds, never on the test fold.

The unit of splitting is `ImageRecord.group_key` (the patient when known, else the lesion), so all
images of a lesion -- a WLI and an NBI image of the same lesion included -- share one split.
Groups are stratified on (label, modalities present): the label of a group is the majority label
of its images (ties to the smaller index), and splitting each label's WLI-only, NBI-only and
two-modality groups evenly keeps the per-class image mix of both modalities similar in every fold.

With `config.data.splits = "manifest"` the manifest's `split` column is used instead (`split_records`), e.g. for a
data set with a fixed evaluation set or split sizes other than the folds' 64 : 16 : 20.
"""

import collections
import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn import model_selection

from pagkd_jax.data.records import MODALITIES, SPLITS, ImageRecord

SPLIT_MODES = ("folds", "manifest")  # Values of config.data.splits.


def _majority(counts: collections.Counter) -> int:
  """The most frequent label; ties go to the smallest label."""
  return max(counts.items(), key=lambda item: (item[1], -item[0]))[0]


def group_table(records: Sequence[ImageRecord]) -> tuple[list[str], np.ndarray, np.ndarray]:
  """The groups of `records`, sorted by key (so the split ignores the order of the records).

  Returns:
    keys: group keys, (G,).
    labels: majority label of each group, (G,) int.
    strata: stratification key `label * 4 + modality bits` (bit 0: has WLI, bit 1: has NBI), (G,).
  """
  label_counts: dict[str, collections.Counter] = {}
  modality_bits: dict[str, int] = collections.defaultdict(int)
  for record in records:
    label_counts.setdefault(record.group_key, collections.Counter())[record.label] += 1
    modality_bits[record.group_key] |= 1 << MODALITIES.index(record.modality)
  keys = sorted(label_counts)
  labels = np.array([_majority(label_counts[k]) for k in keys], dtype=np.int64)
  strata = labels * 4 + np.array([modality_bits[k] for k in keys], dtype=np.int64)
  return keys, labels, strata


def _spread_pick(ordered: Sequence[int], count: int) -> list[int]:
  """`count` elements at evenly spaced positions of `ordered` (proportional over its runs)."""
  n = len(ordered)
  return [ordered[int((i + 0.5) * n / count)] for i in range(count)]


def assign_splits(
    records: Sequence[ImageRecord],
    *,
    num_folds: int,
    fold: int,
    val_fraction: float,
    seed: int,
) -> list[str]:
  """One of "train"/"val"/"test" per record; deterministic in `seed`.

  Test = fold `fold` of a shuffled `StratifiedKFold` over the groups (stratum = label and
  modalities present; the label alone when every stratum has fewer than `num_folds` groups). Validation = for every label, `round(val_fraction * n)` (at least 1 when
  `val_fraction > 0`) of its `n` remaining groups, chosen at random but spread evenly over the
  modality strata. A group never spans two splits.

  Raises:
    ValueError: `num_folds < 2`, `fold` out of range, `val_fraction` not in [0, 1), no records,
      or a class with fewer groups than `num_folds` (or, with validation, fewer than 2 groups
      left for training and validation).
  """
  if num_folds < 2:
    raise ValueError(f"num_folds must be >= 2, got {num_folds}")
  if not 0 <= fold < num_folds:
    raise ValueError(f"fold must be in [0, {num_folds}), got {fold}")
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
  if not records:
    raise ValueError("no records to split")
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}")
  keys, labels, strata = group_table(records)
  groups_per_label = collections.Counter(labels.tolist())
  too_small = {c: n for c, n in sorted(groups_per_label.items()) if n < num_folds}
  if too_small:
    raise ValueError(
        f"{num_folds}-fold splitting needs at least {num_folds} lesion/patient groups per class; "
        + ", ".join(f"class {c} has {n}" for c, n in too_small.items()))

  folds = model_selection.StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed)
  # StratifiedKFold deals the strata out in order of first appearance, each continuing where the
  # previous one stopped; presenting the groups sorted by stratum keeps the strata of one label
  # adjacent, so every label (not only every stratum) gets floor or ceil of n / num_folds groups.
  by_stratum = np.argsort(strata, kind="stable")
  if np.bincount(strata).max() < num_folds:
    # Every stratum is smaller than num_folds (e.g. 8 lesions a class, as many WLI-only, NBI-only and paired ones),
    # which StratifiedKFold refuses: the folds are stratified on the label alone (every label has num_folds groups).
    strata = labels
  with warnings.catch_warnings():
    # Strata rarer than num_folds (e.g. a handful of paired lesions) are spread as far as they go.
    warnings.filterwarnings("ignore", message=".*least populated class.*")
    _, test_positions = list(folds.split(np.zeros(len(keys)), strata[by_stratum]))[fold]
  split_of_group = np.full(len(keys), "train", dtype=object)
  split_of_group[by_stratum[test_positions]] = "test"

  if val_fraction > 0:
    rng = np.random.default_rng([seed, fold])
    for label in sorted(groups_per_label):
      candidates = np.flatnonzero((labels == label) & (split_of_group == "train"))
      if len(candidates) < 2:
        raise ValueError(f"class {label} has {len(candidates)} training group(s) after taking "
                         "the test fold; a validation split needs at least 2")
      count = min(max(1, round(val_fraction * len(candidates))), len(candidates) - 1)
      shuffled = rng.permutation(candidates)
      ordered = shuffled[np.argsort(strata[shuffled], kind="stable")]
      split_of_group[_spread_pick(ordered.tolist(), count)] = "val"

  index_of_key = {k: i for i, k in enumerate(keys)}
  splits = [str(split_of_group[index_of_key[r.group_key]]) for r in records]
  seen: dict[str, str] = {}
  for record, split in zip(records, splits):
    if seen.setdefault(record.group_key, split) != split:
      raise AssertionError(f"group {record.group_key} spans splits {seen[record.group_key]} "
                           f"and {split}")
  return splits



def manifest_splits(records: Sequence[ImageRecord]) -> list[str]:
  """The split each record's manifest row names (`ImageRecord.split`).

  Raises:
    ValueError: no records, records without a split (the first few named), or a lesion/patient group whose
      records name different splits.
  """
  if not records:
    raise ValueError("no records to split")
  missing = [r for r in records if r.split not in SPLITS]
  if missing:
    raise ValueError(f"data.splits='manifest' needs a split column (one of {SPLITS}) on every row; "
                     f"{len(missing)} of {len(records)} records have none, e.g. "
                     + ", ".join(r.path for r in missing[:3]))
  seen: dict[str, ImageRecord] = {}
  for record in records:
    first = seen.setdefault(record.group_key, record)
    if first.split != record.split:
      raise ValueError(f"group {record.group_key} spans splits: {first.path} is {first.split!r}, "
                       f"{record.path} is {record.split!r}")
  return [r.split for r in records]


def split_records(records: Sequence[ImageRecord], data_config) -> list[str]:
  """One of "train"/"val"/"test" per record as `data_config.splits` asks: "folds" (`assign_splits` with the
  config's fold settings) or "manifest" (`manifest_splits`).

  Raises:
    ValueError: an unknown `splits` value, or the errors of the function it selects.
  """
  mode = data_config.get("splits", "folds")
  if mode == "manifest":
    return manifest_splits(records)
  if mode != "folds":
    raise ValueError(f"data.splits must be one of {SPLIT_MODES}, got {mode!r}")
  return assign_splits(records, num_folds=data_config.num_folds, fold=data_config.fold,
                       val_fraction=data_config.val_fraction, seed=data_config.split_seed)


def shuffle_train_labels(records: Sequence[ImageRecord], splits: Sequence[str], seed: int) -> list[ImageRecord]:
  """Negative control: the labels of the "train" records permuted at random within each modality.

  Every other record is returned unchanged, and each modality keeps its per-class counts (so class groups can
  still be drawn). The permutation depends on `seed` and on the training records themselves (sorted by path and
  record index), not on their order.
  """
  if len(records) != len(splits):
    raise ValueError(f"shuffle_train_labels: {len(records)} records but {len(splits)} splits.")
  shuffled = list(records)
  for m, modality in enumerate(MODALITIES):
    positions = [i for i, (r, s) in enumerate(zip(records, splits)) if s == "train" and r.modality == modality]
    positions.sort(key=lambda i: (records[i].path, records[i].record_index))
    permutation = np.random.default_rng([seed, m]).permutation(len(positions))
    for i, j in zip(positions, permutation):
      shuffled[i] = dataclasses.replace(records[i], label=records[positions[j]].label)
  return shuffled
