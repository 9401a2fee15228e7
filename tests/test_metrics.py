"""Tests of pagkd_jax.evaluation.metrics against hand arithmetic and slow NumPy references."""

import json
from fractions import Fraction

import numpy as np
import pytest

from pagkd_jax.evaluation import metrics

NAMES3 = ["hyperplasia", "adenoma", "adenocarcinoma"]

# 8 images, 3 classes; predictions (row argmax) noted on the right.
LABELS8 = np.array([0, 0, 0, 1, 1, 1, 2, 2])
PROBS8 = np.array([
    [0.7, 0.2, 0.1],  # pred 0
    [0.5, 0.4, 0.1],  # pred 0
    [0.2, 0.5, 0.3],  # pred 1
    [0.1, 0.8, 0.1],  # pred 1
    [0.3, 0.6, 0.1],  # pred 1
    [0.2, 0.3, 0.5],  # pred 2
    [0.1, 0.1, 0.8],  # pred 2
    [0.6, 0.2, 0.2],  # pred 0
])


def pairwise_auc(scores, positive):
  """Fraction of (positive, negative) pairs ranked correctly, ties counting 1/2."""
  total, n_pairs = 0.0, 0
  for i in range(len(scores)):
    if not positive[i]:
      continue
    for j in range(len(scores)):
      if positive[j]:
        continue
      n_pairs += 1
      if scores[i] > scores[j]:
        total += 1.0
      elif scores[i] == scores[j]:
        total += 0.5
  return total / n_pairs if n_pairs else None


def slow_summary(labels, probs, auc_classes):
  """Accuracy, macro F1 (0/0 -> 0) and mean AUC over auc_classes with explicit loops."""
  num_classes = probs.shape[1]
  preds = [int(np.argmax(row)) for row in probs]
  correct = sum(int(p == y) for p, y in zip(preds, labels))
  f1s = []
  for k in range(num_classes):
    tp = sum(1 for p, y in zip(preds, labels) if p == k and y == k)
    fp = sum(1 for p, y in zip(preds, labels) if p == k and y != k)
    fn = sum(1 for p, y in zip(preds, labels) if p != k and y == k)
    f1s.append(2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0)
  aucs = [pairwise_auc(probs[:, k], labels == k) for k in auc_classes]
  auc = None if any(a is None for a in aucs) else float(np.mean(aucs))
  return correct / len(labels), float(np.mean(f1s)), auc


def test_three_class_hand_computed():
  report = metrics.classification_report(LABELS8, PROBS8, NAMES3, n_bootstrap=0)
  # Confusion matrix (rows true, columns predicted), read off the comments above.
  assert report["confusion_matrix"] == [[2, 1, 0], [0, 2, 1], [1, 0, 1]]
  assert report["accuracy"] == pytest.approx(float(Fraction(2 + 2 + 1, 8)))
  # Class 0: TP 2, FP 1 (image 7), FN 1, 5 negatives -> P 2/3, R 2/3, F1 2/3, spec 4/5.
  # Class 1: TP 2, FP 1 (image 2), FN 1, 5 negatives -> P 2/3, R 2/3, F1 2/3, spec 4/5.
  # Class 2: TP 1, FP 1 (image 5), FN 1, 6 negatives -> P 1/2, R 1/2, F1 1/2, spec 5/6.
  expected = {
      "hyperplasia": (Fraction(2, 3), Fraction(2, 3), Fraction(4, 5), 3),
      "adenoma": (Fraction(2, 3), Fraction(2, 3), Fraction(4, 5), 3),
      "adenocarcinoma": (Fraction(1, 2), Fraction(1, 2), Fraction(5, 6), 2),
  }
  for name, (precision, sensitivity, specificity, support) in expected.items():
    row = report["per_class"][name]
    assert row["precision"] == pytest.approx(float(precision))
    assert row["sensitivity"] == pytest.approx(float(sensitivity))
    assert row["specificity"] == pytest.approx(float(specificity))
    assert row["support"] == support
  f1_macro = (Fraction(2, 3) + Fraction(2, 3) + Fraction(1, 2)) / 3  # = 11/18
  assert report["f1_macro"] == pytest.approx(float(f1_macro))
  # Class 0 AUC by hand: positives 0.7, 0.5, 0.2 vs negatives 0.1, 0.3, 0.2, 0.1, 0.6:
  # 0.7 beats 5; 0.5 beats 4; 0.2 beats 2 and ties 1 -> (5 + 4 + 2.5) / 15 = 23/30.
  assert report["per_class"]["hyperplasia"]["auc"] == pytest.approx(23 / 30)
  per_class_auc = [pairwise_auc(PROBS8[:, k], LABELS8 == k) for k in range(3)]
  for k, name in enumerate(NAMES3):
    assert report["per_class"][name]["auc"] == pytest.approx(per_class_auc[k])
  assert report["auc"] == pytest.approx(np.mean(per_class_auc))
  assert report["n_images"] == 8 and report["n_groups"] == 8
  assert report["class_names"] == NAMES3
  assert report["warnings"] == []
  assert report["ci95"]["n_resamples"] == 0 and report["ci95"]["auc"] is None
  json.dumps(report)  # JSON-serialisable.


def test_binary_auc_is_positive_class_auc():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 2, size=30)
  p1 = np.clip(0.3 * labels + 0.7 * rng.random(30), 0, 1).round(2)  # Rounded: some ties.
  probs = np.stack([1 - p1, p1], axis=1)
  report = metrics.classification_report(labels, probs, ["benign", "malignant"], n_bootstrap=0)
  expected = pairwise_auc(p1, labels == 1)
  assert report["auc"] == pytest.approx(expected)
  assert report["per_class"]["malignant"]["auc"] == pytest.approx(expected)


def test_binary_auc_uses_column_one_even_if_columns_disagree():
  # Column 0 is not 1 - column 1 here, so its one-vs-rest AUC differs from class 1's.
  labels = np.array([0, 0, 1, 1])
  probs = np.array([[0.9, 0.1], [0.1, 0.6], [0.8, 0.4], [0.2, 0.7]])
  report = metrics.classification_report(labels, probs, ["neg", "pos"], n_bootstrap=0)
  assert report["auc"] == pytest.approx(pairwise_auc(probs[:, 1], labels == 1))  # 3/4
  assert report["auc"] == pytest.approx(0.75)
  assert report["per_class"]["neg"]["auc"] == pytest.approx(pairwise_auc(probs[:, 0], labels == 0))


def test_absent_class_skipped_with_warning():
  labels = np.array([0, 0, 1, 1, 1])
  probs = np.array([
      [0.6, 0.3, 0.1],  # pred 0
      [0.3, 0.3, 0.4],  # pred 2 (class 2 never occurs)
      [0.2, 0.7, 0.1],  # pred 1
      [0.5, 0.4, 0.1],  # pred 0
      [0.1, 0.8, 0.1],  # pred 1
  ])
  report = metrics.classification_report(labels, probs, NAMES3, n_bootstrap=0)
  absent = report["per_class"]["adenocarcinoma"]
  assert absent["auc"] is None and absent["support"] == 0
  assert absent["sensitivity"] is None  # 0 / 0.
  assert absent["precision"] == 0.0  # 0 / 1: predicted once, wrongly.
  expected_auc = np.mean([pairwise_auc(probs[:, k], labels == k) for k in (0, 1)])
  assert report["auc"] == pytest.approx(expected_auc)
  assert any("adenocarcinoma" in w and "AUC" in w for w in report["warnings"])
  # F1: class 0 TP 1 FP 1 FN 1 -> 1/2; class 1 TP 2 FP 0 FN 1 -> 4/5; class 2 TP 0 -> 0.
  assert report["f1_macro"] == pytest.approx(float((Fraction(1, 2) + Fraction(4, 5) + 0) / 3))
  json.dumps(report)


def test_no_defined_auc_gives_none():
  labels = np.array([1, 1, 1])
  probs = np.array([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
  report = metrics.classification_report(labels, probs, ["a", "b"], n_bootstrap=20)
  assert report["auc"] is None and report["ci95"]["auc"] is None
  assert report["accuracy"] == pytest.approx(1 / 3)  # Argmax ties go to the first class.
  assert report["per_class"]["b"]["specificity"] is None  # No negatives.
  assert report["ci95"]["n_resamples"] == 20 and report["ci95"]["accuracy"] is not None
  assert json.loads(json.dumps(report))["auc"] is None


def reference_group_bootstrap(labels, probs, groups, n_bootstrap, seed, auc_classes):
  """The documented procedure, written out with loops."""
  unique = sorted(set(groups))
  members = {g: [i for i, gi in enumerate(groups) if gi == g] for g in unique}
  rng = np.random.default_rng(seed)
  values = {"auc": [], "accuracy": [], "f1_macro": []}
  for _ in range(n_bootstrap):
    draw = rng.integers(0, len(unique), size=len(unique))
    idx = [i for g in draw for i in members[unique[g]]]
    acc, f1, auc = slow_summary(labels[idx], probs[idx], auc_classes)
    if auc is None:
      continue
    values["auc"].append(auc)
    values["accuracy"].append(acc)
    values["f1_macro"].append(f1)
  return {k: list(np.percentile(v, [2.5, 97.5])) for k, v in values.items()}, len(values["auc"])


def test_group_bootstrap_matches_reference_and_is_deterministic():
  groups = np.array(["L3", "L3", "L1", "L1", "L1", "L4", "L2", "L2"])
  report = metrics.classification_report(
      LABELS8, PROBS8, NAMES3, groups=groups, n_bootstrap=60, seed=7
  )
  expected, n_used = reference_group_bootstrap(LABELS8, PROBS8, list(groups), 60, 7, [0, 1, 2])
  assert report["n_groups"] == 4
  assert report["ci95"]["n_resamples"] == n_used
  assert 0 < n_used < 60  # Some resamples lose a class and must have been skipped.
  assert any("skipped" in w for w in report["warnings"])
  for key in ("auc", "accuracy", "f1_macro"):
    np.testing.assert_allclose(report["ci95"][key], expected[key], rtol=0, atol=1e-12)
  again = metrics.classification_report(
      LABELS8, PROBS8, NAMES3, groups=groups, n_bootstrap=60, seed=7
  )
  assert again["ci95"] == report["ci95"]
  other = metrics.classification_report(
      LABELS8, PROBS8, NAMES3, groups=groups, n_bootstrap=60, seed=8
  )
  assert other["ci95"] != report["ci95"]


def test_no_groups_resamples_images():
  ids = [f"img{i:02d}" for i in range(8)]  # Sorted like the image order.
  plain = metrics.classification_report(LABELS8, PROBS8, NAMES3, n_bootstrap=40, seed=3)
  as_groups = metrics.classification_report(
      LABELS8, PROBS8, NAMES3, groups=ids, n_bootstrap=40, seed=3
  )
  assert plain["ci95"] == as_groups["ci95"]
  expected, n_used = reference_group_bootstrap(LABELS8, PROBS8, ids, 40, 3, [0, 1, 2])
  assert plain["ci95"]["n_resamples"] == n_used
  np.testing.assert_allclose(plain["ci95"]["auc"], expected["auc"], atol=1e-12)


def test_duplicated_lesions_group_bootstrap_equals_deduplicated_image_bootstrap():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, size=40)
  logits = rng.normal(size=(40, 3))
  logits[np.arange(40), labels] += 1.0
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  # Each lesion = 3 identical copies of one image; ids sort in the original image order.
  dup_labels = np.repeat(labels, 3)
  dup_probs = np.repeat(probs, 3, axis=0)
  dup_groups = np.repeat([f"L{i:02d}" for i in range(40)], 3)
  kwargs = dict(n_bootstrap=200, seed=5)
  grouped = metrics.classification_report(
      dup_labels, dup_probs, NAMES3, groups=dup_groups, **kwargs
  )
  dedup = metrics.classification_report(labels, probs, NAMES3, **kwargs)
  for key in ("auc", "accuracy", "f1_macro"):
    np.testing.assert_allclose(grouped["ci95"][key], dedup["ci95"][key], atol=1e-12)
  # Treating the copies as independent images understates the uncertainty.
  by_image = metrics.classification_report(dup_labels, dup_probs, NAMES3, **kwargs)
  width = lambda r: r["ci95"]["accuracy"][1] - r["ci95"]["accuracy"][0]
  assert width(by_image) < width(grouped)


def test_ci_contains_point_estimate():
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 3, size=150)
  logits = rng.normal(size=(150, 3))
  logits[np.arange(150), labels] += 1.5
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  groups = (np.arange(150) // 3).astype(str)
  report = metrics.classification_report(labels, probs, NAMES3, groups=groups, n_bootstrap=300)
  assert report["ci95"]["n_resamples"] == 300
  for key in ("auc", "accuracy", "f1_macro"):
    lo, hi = report["ci95"][key]
    assert lo < report[key] < hi
    assert hi - lo < 0.4


@pytest.mark.parametrize(
    "labels, probs, message",
    [
        ([0, 3], [[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], r"labels\[1\] = 3"),
        ([0, -1], [[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], r"labels\[1\] = -1"),
        ([0.0, 1.0], [[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], "integer"),
        ([0, 1], [[0.5, 0.5], [0.1, 0.9]], r"shape \(N, C\)"),
        ([0, 1], [[0.5, 0.3, 0.2], [2.5, -1.0, 0.8]], r"\[0, 1\].*probs\[1, 0\]"),
        ([0, 1], [[0.5, 0.3, np.nan], [0.1, 0.1, 0.8]], r"probs\[0, 2\]"),
        ([], np.zeros((0, 3)), "empty"),
    ],
)
def test_invalid_inputs(labels, probs, message):
  with pytest.raises(ValueError, match=message):
    metrics.classification_report(np.asarray(labels), probs, NAMES3, n_bootstrap=0)


def test_invalid_groups_and_options():
  with pytest.raises(ValueError, match="groups"):
    metrics.classification_report(LABELS8, PROBS8, NAMES3, groups=["a"] * 7)
  with pytest.raises(ValueError, match="n_bootstrap"):
    metrics.classification_report(LABELS8, PROBS8, NAMES3, n_bootstrap=-1)
  with pytest.raises(ValueError, match="unique"):
    metrics.classification_report(LABELS8, PROBS8, ["a", "a", "b"])


def test_per_fold_summary():
  folds = [
      {"auc": 0.8, "accuracy": 0.7, "f1_macro": 0.6},
      {"auc": 0.9, "accuracy": 0.5, "f1_macro": 0.4},
      {"auc": None, "accuracy": 0.6, "f1_macro": 0.5},
  ]
  summary = metrics.per_fold_summary(folds)
  assert summary["auc"]["n_folds"] == 2
  assert summary["auc"]["mean"] == pytest.approx(0.85)
  # Sample std of (0.8, 0.9): sqrt(((0.05)^2 * 2) / 1) = sqrt(0.005).
  assert summary["auc"]["std"] == pytest.approx(np.sqrt(0.005))
  assert summary["accuracy"]["mean"] == pytest.approx(0.6)
  # Deviations 0.1, -0.1, 0 -> sqrt(0.02 / 2) = 0.1.
  assert summary["accuracy"]["std"] == pytest.approx(0.1)
  assert summary["f1_macro"]["values"] == [0.6, 0.4, 0.5]
  single = metrics.per_fold_summary([folds[0]])
  assert single["auc"]["mean"] == 0.8 and single["auc"]["std"] is None
  with pytest.raises(ValueError, match="empty"):
    metrics.per_fold_summary([])
  with pytest.raises(ValueError, match=r"fold_reports\[0\]"):
    metrics.per_fold_summary([{"auc": 0.5}])


def test_group_bootstrap_matches_reference_continuous_case():
  # Unequal group sizes and continuous scores: bootstrap statistics are nearly all distinct.
  rng = np.random.default_rng(4)
  labels = rng.integers(0, 3, size=30)
  logits = rng.normal(size=(30, 3))
  logits[np.arange(30), labels] += 1.0
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  groups = np.array([f"L{g}" for g in rng.integers(0, 12, size=30)])
  report = metrics.classification_report(
      labels, probs, NAMES3, groups=groups, n_bootstrap=50, seed=11
  )
  expected, n_used = reference_group_bootstrap(labels, probs, list(groups), 50, 11, [0, 1, 2])
  assert report["ci95"]["n_resamples"] == n_used
  for key in ("auc", "accuracy", "f1_macro"):
    np.testing.assert_allclose(report["ci95"][key], expected[key], rtol=0, atol=1e-12)
