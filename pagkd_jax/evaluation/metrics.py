"""Classification metrics of spec section 6: accuracy, macro F1, macro one-vs-rest AUC.

Everything here is pure NumPy in, JSON-serialisable dicts out. Point estimates come from
scikit-learn; the bootstrap intervals use an equivalent vectorised NumPy path (weighted Mann-Whitney
AUC and weighted confusion matrices), so 1000 resamples cost milliseconds rather than seconds.

Bootstrap procedure (the one `classification_report` documents and the tests re-implement):
`rng = np.random.default_rng(seed)`; the G distinct groups are ordered as `np.unique(groups)` sorts
them; resample b draws `rng.integers(0, G, size=G)` (one call per resample, in order b = 0, 1, ...)
and takes every image of every drawn group, a group drawn k times contributing its images k times.
Without groups, each image is its own group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn import metrics as sk_metrics

_SUMMARY_KEYS = ("auc", "accuracy", "f1_macro")
# Resamples are evaluated in chunks of this many to bound memory at (chunk, N) float64 arrays.
_BOOTSTRAP_CHUNK = 256


def _validate(
    labels: Any, probs: Any, class_names: Sequence[str], groups: Any | None
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray | None]:
  """Checks shapes, dtypes and ranges.

  Returns labels (N,) int64, probs (N, C) float64, class names, groups (N,) str or None.
  """
  class_names = [str(name) for name in class_names]
  num_classes = len(class_names)
  if num_classes < 2:
    raise ValueError(f"class_names must name at least 2 classes, got {class_names!r}.")
  if len(set(class_names)) != num_classes:
    raise ValueError(f"class_names must be unique, got {class_names!r}.")

  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must have shape (N,), got shape {labels.shape}.")
  if labels.size == 0:
    raise ValueError("labels is empty: nothing to evaluate.")
  if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}.")
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    row = int(bad[0])
    raise ValueError(
        f"labels[{row}] = {int(labels[row])} is outside [0, {num_classes}) "
        f"for classes {class_names}."
    )
  labels = labels.astype(np.int64)

  probs = np.asarray(probs)
  if probs.ndim != 2 or probs.shape != (labels.shape[0], num_classes):
    raise ValueError(
        f"probs must have shape (N, C) = ({labels.shape[0]}, {num_classes}), "
        f"got shape {probs.shape}."
    )
  if not (np.issubdtype(probs.dtype, np.floating) or np.issubdtype(probs.dtype, np.integer)):
    raise ValueError(f"probs must be numeric probabilities, got dtype {probs.dtype}.")
  probs = probs.astype(np.float64)
  bad_rows, bad_cols = np.nonzero(~np.isfinite(probs) | (probs < 0.0) | (probs > 1.0))
  if bad_rows.size:
    row, col = int(bad_rows[0]), int(bad_cols[0])
    raise ValueError(
        f"probs must be probabilities in [0, 1] (apply softmax to logits first); "
        f"probs[{row}, {col}] = {probs[row, col]!r}."
    )

  if groups is not None:
    groups = np.asarray(groups)
    if groups.ndim != 1 or groups.shape[0] != labels.shape[0]:
      raise ValueError(
          f"groups must have shape (N,) = ({labels.shape[0]},), got shape {groups.shape}."
      )
    groups = groups.astype(str)
  return labels, probs, class_names, groups


def _none_if_nan(value: float) -> float | None:
  return None if value is None or not math.isfinite(value) else float(value)


def _group_index(groups: np.ndarray | None, num_images: int) -> tuple[np.ndarray, int]:
  """Maps each image to its group index in `np.unique` order; (N,) int64 and the group count G."""
  if groups is None:
    return np.arange(num_images, dtype=np.int64), num_images
  unique, inverse = np.unique(groups, return_inverse=True)
  return inverse.astype(np.int64).reshape(-1), int(unique.shape[0])


def _weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """Mann-Whitney AUC (ties count 1/2) of `scores` (N,) for every row of `weights` (B, N).

  Row b treats image i as present `weights[b, i]` times, which is exactly ROC AUC on the resample.
  Returns (B,) float64, NaN where a row has no positive or no negative weight.
  """
  order = np.argsort(scores, kind="stable")
  sorted_scores = scores[order]
  sorted_pos = positive[order]
  w = weights[:, order]
  neg_w = np.where(sorted_pos, 0.0, w)
  pos_w = np.where(sorted_pos, w, 0.0)
  # Tie blocks of equal scores: [start, end] positions in the sorted order.
  new_block = np.concatenate([[True], sorted_scores[1:] != sorted_scores[:-1]])
  block_id = np.cumsum(new_block) - 1
  starts = np.flatnonzero(new_block)
  ends = np.concatenate([starts[1:], [scores.shape[0]]]) - 1
  cum_neg = np.cumsum(neg_w, axis=1)
  cum_neg_padded = np.concatenate([np.zeros((w.shape[0], 1)), cum_neg], axis=1)
  below = cum_neg_padded[:, starts[block_id]]  # Negative weight with a strictly lower score.
  tied = cum_neg_padded[:, ends[block_id] + 1] - below  # Negative weight with an equal score.
  numerator = np.sum(pos_w * (below + 0.5 * tied), axis=1)
  denominator = pos_w.sum(axis=1) * neg_w.sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, numerator / safe, np.nan)


def _weighted_summary(
    labels: np.ndarray,
    probs: np.ndarray,
    weights: np.ndarray,
    auc_classes: Sequence[int],
) -> dict[str, np.ndarray]:
  """Accuracy, macro F1 (0/0 -> 0), mean AUC over `auc_classes`; per row of weights (B, N).

  AUC is NaN for a row where any class in `auc_classes` lacks positives or negatives.
  """
  num_classes = probs.shape[1]
  preds = np.argmax(probs, axis=1)
  total = weights.sum(axis=1)
  accuracy = (weights @ (preds == labels).astype(np.float64)) / total
  cells = np.zeros((labels.shape[0], num_classes * num_classes))
  cells[np.arange(labels.shape[0]), labels * num_classes + preds] = 1.0
  confusion = (weights @ cells).reshape(-1, num_classes, num_classes)
  tp = np.diagonal(confusion, axis1=1, axis2=2)
  fp = confusion.sum(axis=1) - tp
  fn = confusion.sum(axis=2) - tp
  denom = 2 * tp + fp + fn
  f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1.0), 0.0)
  f1_macro = f1.mean(axis=1)
  if auc_classes:
    per_class = np.stack(
        [_weighted_auc(probs[:, k], labels == k, weights) for k in auc_classes], axis=1
    )
    auc = per_class.mean(axis=1)  # NaN propagates: the resample is then skipped.
  else:
    auc = np.full(weights.shape[0], np.nan)
  return {"auc": auc, "accuracy": accuracy, "f1_macro": f1_macro}


def _bootstrap(
    labels: np.ndarray,
    probs: np.ndarray,
    image_group: np.ndarray,
    num_groups: int,
    auc_classes: Sequence[int],
    n_bootstrap: int,
    seed: int,
) -> tuple[dict[str, np.ndarray], int]:
  """Percentile-bootstrap statistics over groups (module docstring); (n_used,) arrays and n_used.

  When `auc_classes` is non-empty, resamples where the AUC is undefined are dropped for all metrics.
  """
  rng = np.random.default_rng(seed)
  draws = np.stack([rng.integers(0, num_groups, size=num_groups) for _ in range(n_bootstrap)])
  collected: dict[str, list[np.ndarray]] = {key: [] for key in _SUMMARY_KEYS}
  for start in range(0, n_bootstrap, _BOOTSTRAP_CHUNK):
    chunk = draws[start : start + _BOOTSTRAP_CHUNK]
    group_counts = np.stack([np.bincount(row, minlength=num_groups) for row in chunk])
    weights = group_counts[:, image_group].astype(np.float64)  # (B, N) image multiplicities.
    stats = _weighted_summary(labels, probs, weights, auc_classes)
    keep = np.isfinite(stats["auc"]) if auc_classes else np.ones(chunk.shape[0], dtype=bool)
    for key in _SUMMARY_KEYS:
      collected[key].append(stats[key][keep])
  values = {key: np.concatenate(parts) for key, parts in collected.items()}
  return values, int(values["accuracy"].shape[0])


def classification_report(
    labels: Any,
    probs: Any,
    class_names: Sequence[str],
    *,
    groups: Any | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
  """Accuracy, macro F1, AUC, per-class figures and bootstrap CIs (spec section 6).

  Args:
    labels: (N,) int true class indices in [0, C).
    probs: (N, C) float class probabilities in [0, 1] (not logits); predictions are the row argmax.
    class_names: C names, in label-index order.
    groups: optional (N,) group (lesion) id per image; the bootstrap resamples whole groups.
    n_bootstrap: number of bootstrap resamples (0 disables the intervals).
    seed: seed of the bootstrap generator; equal seeds give equal intervals.

  Returns:
    A JSON-serialisable dict: `auc` (macro one-vs-rest over classes with a defined AUC; binary:
    the AUC of class 1; None if undefined), `accuracy`, `f1_macro` (over all C classes,
    zero_division=0), `per_class` {name: precision, sensitivity, specificity, auc, support} (None
    where a ratio is 0/0), `confusion_matrix` (C x C, rows true, columns predicted), `ci95`
    {auc, accuracy, f1_macro: [lo, hi] or None, n_resamples}, `n_images`, `n_groups`,
    `class_names`, `warnings` (list of str).
  """
  labels, probs, class_names, groups = _validate(labels, probs, class_names, groups)
  if (isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer))
      or n_bootstrap < 0):
    raise ValueError(f"n_bootstrap must be an integer >= 0, got {n_bootstrap!r}.")
  num_classes = len(class_names)
  num_images = labels.shape[0]
  class_ids = list(range(num_classes))
  report_warnings: list[str] = []

  preds = np.argmax(probs, axis=1)
  accuracy = float(sk_metrics.accuracy_score(labels, preds))
  f1_macro = float(
      sk_metrics.f1_score(labels, preds, labels=class_ids, average="macro", zero_division=0)
  )
  confusion = sk_metrics.confusion_matrix(labels, preds, labels=class_ids)
  precision, recall, _, support = sk_metrics.precision_recall_fscore_support(
      labels, preds, labels=class_ids, zero_division=np.nan
  )

  per_class: dict[str, dict[str, Any]] = {}
  defined_auc: list[int] = []
  for k, name in enumerate(class_names):
    positive = labels == k
    n_pos = int(positive.sum())
    if 0 < n_pos < num_images:
      class_auc = float(sk_metrics.roc_auc_score(positive.astype(np.int64), probs[:, k]))
      defined_auc.append(k)
    else:
      class_auc = None
      kind = "no images" if n_pos == 0 else "no images of any other class"
      report_warnings.append(
          f"class {name!r} (index {k}) has {kind} in labels: its one-vs-rest AUC is undefined"
          + (" and skipped in the macro AUC." if num_classes > 2 else ".")
      )
    negatives = confusion.sum() - confusion[k, :].sum()
    false_pos = confusion[:, k].sum() - confusion[k, k]
    specificity = (negatives - false_pos) / negatives if negatives > 0 else None
    per_class[name] = {
        "precision": _none_if_nan(float(precision[k])),
        "sensitivity": _none_if_nan(float(recall[k])),
        "specificity": None if specificity is None else float(specificity),
        "auc": class_auc,
        "support": int(support[k]),
    }

  # Classes the summary AUC averages: binary -> the positive class only; else every defined one.
  auc_classes = ([1] if 1 in defined_auc else []) if num_classes == 2 else defined_auc
  if auc_classes:
    auc = float(np.mean([per_class[class_names[k]]["auc"] for k in auc_classes]))
  else:
    auc = None
    report_warnings.append("no class has a defined AUC: auc is None.")

  image_group, num_groups = _group_index(groups, num_images)
  ci95: dict[str, Any] = {key: None for key in _SUMMARY_KEYS}
  ci95["n_resamples"] = 0
  if n_bootstrap > 0:
    values, n_used = _bootstrap(
        labels, probs, image_group, num_groups, auc_classes, int(n_bootstrap), int(seed)
    )
    ci95["n_resamples"] = n_used
    if n_used < n_bootstrap:
      report_warnings.append(
          f"{n_bootstrap - n_used} of {n_bootstrap} bootstrap resamples left a class without "
          "positives or negatives (AUC undefined) and were skipped."
      )
    if n_used > 0:
      for key in _SUMMARY_KEYS:
        if key == "auc" and not auc_classes:
          continue
        lo, hi = np.percentile(values[key], [2.5, 97.5])
        ci95[key] = [float(lo), float(hi)]

  return {
      "auc": auc,
      "accuracy": accuracy,
      "f1_macro": f1_macro,
      "per_class": per_class,
      "confusion_matrix": confusion.astype(int).tolist(),
      "ci95": ci95,
      "n_images": int(num_images),
      "n_groups": int(num_groups),
      "class_names": list(class_names),
      "warnings": report_warnings,
  }


def per_fold_summary(fold_reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Mean and sample standard deviation (ddof=1) over folds of auc, accuracy and f1_macro.

  Args:
    fold_reports: dicts returned by `classification_report`, one per fold.

  Returns:
    {metric: {"mean", "std", "values", "n_folds"}}; folds whose value is None (undefined AUC) are
    left out of that metric; `std` is None with fewer than 2 values, `mean` None with none.
  """
  if not fold_reports:
    raise ValueError("fold_reports is empty: need at least one fold report.")
  summary: dict[str, Any] = {}
  for key in _SUMMARY_KEYS:
    values = []
    for i, report in enumerate(fold_reports):
      if key not in report:
        raise ValueError(f"fold_reports[{i}] has no {key!r} entry; is it a classification_report?")
      if report[key] is not None:
        values.append(float(report[key]))
    summary[key] = {
        "mean": float(np.mean(values)) if values else None,
        "std": float(np.std(values, ddof=1)) if len(values) >= 2 else None,
        "values": values,
        "n_folds": len(values),
    }
  return summary
