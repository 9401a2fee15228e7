"""Tests for leakage-free stratified group splits."""

import collections

import numpy as np
import pytest

from pagkd_jax.data import splits
from pagkd_jax.data.records import ImageRecord


def _dataset(seed: int = 0) -> list[ImageRecord]:
  """3 classes with 17, 12 and 9 lesions, records and ids in random order (not sorted by class);
  lesions have 1-3 images in one or both modalities; some lesions belong to known patients, one
  patient has lesions of two classes."""
  rng = np.random.default_rng(seed)
  names = iter(rng.permutation(1000))  # Ids that do not sort by class.
  records = []
  for label, num_lesions in enumerate((17, 12, 9)):
    patients = [f"p{next(names):03d}" for _ in range(2)]
    for lesion in range(num_lesions):
      lesion_id = f"l{next(names):03d}"
      patient = patients[lesion // 2] if lesion < 4 else ""
      kind = rng.integers(0, 3)  # 0: WLI only, 1: NBI only, 2: both (a true pair).
      modalities = {0: ["wli"], 1: ["nbi"], 2: ["wli", "nbi"]}[int(kind)]
      for modality in modalities:
        for i in range(int(rng.integers(1, 4))):
          records.append(ImageRecord(path=f"/d/{lesion_id}_{modality}{i}.png", modality=modality,
                                     label=label, lesion_id=lesion_id, patient_id=patient))
  # Patient "mixed" has two adenoma (1) lesions and one hyperplasia (0) lesion.
  for lesion_id, label in (("m1", 1), ("m2", 1), ("m3", 0)):
    records.append(ImageRecord(path=f"/d/{lesion_id}.png", modality="wli", label=label,
                               lesion_id=lesion_id, patient_id="mixed"))
  return [records[i] for i in rng.permutation(len(records))]


def _split_of_groups(records, assigned):
  by_group = collections.defaultdict(set)
  for record, split in zip(records, assigned):
    by_group[record.group_key].add(split)
  return by_group


@pytest.mark.parametrize("val_fraction", [0.0, 0.25])
def test_no_group_crosses_splits_and_test_folds_partition_groups(val_fraction):
  records = _dataset()
  num_folds = 5
  test_folds_of_group = collections.defaultdict(list)
  for fold in range(num_folds):
    assigned = splits.assign_splits(records, num_folds=num_folds, fold=fold,
                                    val_fraction=val_fraction, seed=3)
    assert set(assigned) <= set(splits.SPLITS)
    assert ("val" in assigned) == (val_fraction > 0)
    for group, names in _split_of_groups(records, assigned).items():
      assert len(names) == 1, (group, names)
      if "test" in names:
        test_folds_of_group[group].append(fold)
    # A lesion's WLI and NBI images share one split.
    by_lesion = collections.defaultdict(set)
    for record, split in zip(records, assigned):
      by_lesion[record.lesion_id].add(split)
    assert all(len(s) == 1 for s in by_lesion.values())
  all_groups = {r.group_key for r in records}
  assert set(test_folds_of_group) == all_groups
  assert all(len(folds) == 1 for folds in test_folds_of_group.values())


def _group_labels_reference(records):
  counts = collections.defaultdict(collections.Counter)
  for record in records:
    counts[record.group_key][record.label] += 1
  labels = {}
  for group, counter in counts.items():
    best = max(counter.values())
    labels[group] = min(label for label, n in counter.items() if n == best)
  return labels


def test_stratification_keeps_class_proportions():
  records = _dataset(1)
  labels = _group_labels_reference(records)
  assert labels["patient:mixed"] == 1
  totals = collections.Counter(labels.values())
  num_folds = 4
  for fold in range(num_folds):
    assigned = splits.assign_splits(records, num_folds=num_folds, fold=fold, val_fraction=0.2,
                                    seed=0)
    per_split = collections.defaultdict(collections.Counter)
    for group, names in _split_of_groups(records, assigned).items():
      per_split[next(iter(names))][labels[group]] += 1
    for label, total in totals.items():
      test_count = per_split["test"][label]
      assert total // num_folds <= test_count <= -(-total // num_folds), (fold, label)
      remaining = total - test_count
      expected_val = max(1, round(0.2 * remaining))
      assert per_split["val"][label] == expected_val
      assert per_split["train"][label] == remaining - expected_val


def test_classes_whose_strata_are_all_smaller_than_the_folds_are_split_on_the_label():
  # 8 lesions a class: 3 WLI only, 3 NBI only, 2 paired. No stratum reaches 5 groups, which StratifiedKFold
  # refuses ("n_splits=5 cannot be greater than the number of members in each class").
  records = []
  for label in range(3):
    for lesion, modalities in enumerate([["wli"]] * 3 + [["nbi"]] * 3 + [["wli", "nbi"]] * 2):
      for modality in modalities:
        records.append(ImageRecord(path=f"/d/{label}_{lesion}_{modality}.png", modality=modality, label=label,
                                   lesion_id=f"l{label}_{lesion}", pair_id=f"p{label}_{lesion}"
                                   if len(modalities) == 2 else ""))
  test_folds = collections.Counter()
  for fold in range(5):
    assigned = splits.assign_splits(records, num_folds=5, fold=fold, val_fraction=0.2, seed=0)
    for group, names in _split_of_groups(records, assigned).items():
      assert len(names) == 1
      if names == {"test"}:
        test_folds[group] += 1
    label_of = {r.group_key: r.label for r in records}
    test_groups = collections.Counter(label_of[g] for g, names in _split_of_groups(records, assigned).items()
                                      if names == {"test"})
    assert all(1 <= test_groups[label] <= 2 for label in range(3)), test_groups  # floor or ceil of 8 / 5 a class.
  assert sorted(test_folds) == sorted({r.group_key for r in records}) and set(test_folds.values()) == {1}


def test_splits_are_deterministic_per_seed_and_ignore_record_order():
  records = _dataset()
  first = splits.assign_splits(records, num_folds=5, fold=2, val_fraction=0.2, seed=7)
  again = splits.assign_splits(records, num_folds=5, fold=2, val_fraction=0.2, seed=7)
  other = splits.assign_splits(records, num_folds=5, fold=2, val_fraction=0.2, seed=8)
  assert first == again
  assert first != other
  order = np.random.default_rng(1).permutation(len(records))
  shuffled = splits.assign_splits([records[i] for i in order], num_folds=5, fold=2,
                                  val_fraction=0.2, seed=7)
  assert shuffled == [first[i] for i in order]


def test_invalid_arguments_are_rejected():
  records = _dataset()
  with pytest.raises(ValueError, match="num_folds must be >= 2"):
    splits.assign_splits(records, num_folds=1, fold=0, val_fraction=0.2, seed=0)
  with pytest.raises(ValueError, match=r"fold must be in \[0, 5\), got 5"):
    splits.assign_splits(records, num_folds=5, fold=5, val_fraction=0.2, seed=0)
  with pytest.raises(ValueError, match="val_fraction"):
    splits.assign_splits(records, num_folds=5, fold=0, val_fraction=1.0, seed=0)
  few = [ImageRecord(path=f"/x{i}.png", modality="wli", label=i % 2, lesion_id=f"l{i}")
         for i in range(7)]  # Class 0: 4 lesions, class 1: 3 lesions.
  with pytest.raises(ValueError, match="class 1 has 3"):
    splits.assign_splits(few, num_folds=4, fold=0, val_fraction=0.0, seed=0)
  with pytest.raises(ValueError, match="class 0 has 1 training group"):
    splits.assign_splits(few[:4], num_folds=2, fold=0, val_fraction=0.2, seed=0)
