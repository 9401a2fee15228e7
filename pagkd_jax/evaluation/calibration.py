"""How far the probabilities can be trusted: expected calibration error, reliability bins and temperature scaling.

Temperature scaling (Guo et al., 2017) divides the logits by one number T > 0 fitted to minimise the negative
log-likelihood on the validation split (never the test split): the predicted class and the ranking of images by a
class's logit stay those of the trained model, only the probabilities' confidence changes. `eval.py` with
`config.eval.calibrate=True` fits T and stores it in WORKDIR/calibration.json with the checkpoint it belongs to;
`eval.py`, `predict.py` and the exported model then apply it (a temperature fitted to another checkpoint is ignored,
with a warning).
"""

import json
import os

import numpy as np
from absl import logging

CALIBRATION_NAME = "calibration.json"
TEMPERATURE_RANGE = (1e-2, 1e2)  # The fitted T is searched in this range (and clipped to it, with a warning).


def _check(labels, probs) -> tuple[np.ndarray, np.ndarray]:
  labels, probs = np.asarray(labels), np.asarray(probs, np.float64)
  if probs.ndim != 2 or labels.shape != probs.shape[:1]:
    raise ValueError(f"need labels (N,) and probabilities (N, C), got {labels.shape} and {probs.shape}")
  return labels, probs


def reliability_bins(labels, probs, n_bins: int = 15) -> dict[str, np.ndarray]:
  """Top-label reliability: images binned by their confidence (the largest probability) into `n_bins` equal-width
  bins of (0, 1] (bin b holds confidences in (b / n, (b + 1) / n]).

  Returns {"count": (n_bins,), "confidence": mean confidence per bin, "accuracy": fraction of the bin's images whose
  predicted class is the true one} (NaN for empty bins).
  """
  labels, probs = _check(labels, probs)
  confidence = probs.max(-1)
  correct = (probs.argmax(-1) == labels).astype(np.float64)
  bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
  count = np.bincount(bins, minlength=n_bins).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_confidence = np.bincount(bins, confidence, minlength=n_bins) / count
    accuracy = np.bincount(bins, correct, minlength=n_bins) / count
  return {"count": count.astype(np.int64), "confidence": mean_confidence, "accuracy": accuracy}


def expected_calibration_error(labels, probs, n_bins: int = 15) -> float:
  """ECE = sum over bins of (images in the bin / N) * |accuracy - mean confidence| (`reliability_bins`)."""
  bins = reliability_bins(labels, probs, n_bins)
  n = bins["count"].sum()
  if n == 0:
    return float("nan")
  used = bins["count"] > 0
  return float(np.sum(bins["count"][used] / n * np.abs(bins["accuracy"][used] - bins["confidence"][used])))


def apply_temperature(log_probs, temperature: float) -> np.ndarray:
  """softmax(log_probs / T) in float64 -> float32 (log-probabilities are logits shifted by a per-image constant, which
  the softmax removes)."""
  z = np.asarray(log_probs, np.float64) / temperature
  z -= z.max(-1, keepdims=True)
  p = np.exp(z)
  return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def negative_log_likelihood(log_probs, labels, temperature: float) -> float:
  """Mean -log softmax(log_probs / T)[label]."""
  z = np.asarray(log_probs, np.float64) / temperature
  z_max = z.max(-1, keepdims=True)
  log_norm = (z_max + np.log(np.exp(z - z_max).sum(-1, keepdims=True)))[:, 0]
  return float(np.mean(log_norm - z[np.arange(len(z)), np.asarray(labels)]))


def fit_temperature(log_probs, labels, *, iterations: int = 200) -> float:
  """The T in TEMPERATURE_RANGE minimising `negative_log_likelihood` (it is convex in 1 / T: bisection on the sign
  of its derivative in log T, to float64 precision). `log_probs` (N, C): the model's log-softmax (or logits)."""
  z = np.asarray(log_probs, np.float64)
  labels = np.asarray(labels)
  if z.ndim != 2 or labels.shape != z.shape[:1] or not len(z):
    raise ValueError(f"need log-probabilities (N, C) with N >= 1 and labels (N,), got {z.shape} and {labels.shape}")
  z = np.maximum(z, np.log(np.finfo(np.float64).tiny))  # A probability of 0 (log -inf) as the smallest positive one.
  z_true = z[np.arange(len(z)), labels]

  def slope(beta: float) -> float:  # d NLL / d beta, beta = 1 / T: E_softmax(beta z)[z] - z_true, non-decreasing.
    w = beta * z
    w = np.exp(w - w.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return float(np.mean((w * z).sum(-1) - z_true))

  low, high = np.log(1 / TEMPERATURE_RANGE[1]), np.log(1 / TEMPERATURE_RANGE[0])  # In log beta.
  # The slope at the smallest T is 0 in float64 once every margin times 1 / T exceeds ~40: the NLL still falls there.
  if slope(np.exp(high)) <= 0 or slope(np.exp(low)) > 0:
    beta = np.exp(high) if slope(np.exp(high)) <= 0 else np.exp(low)
    logging.warning("calibration: the best temperature lies outside %s (the validation images are all right or all "
                    "wrong with a margin); using %g.", TEMPERATURE_RANGE, 1 / beta)
    return float(1 / beta)
  for _ in range(iterations):
    mid = 0.5 * (low + high)
    if slope(np.exp(mid)) < 0:
      low = mid
    else:
      high = mid
  return float(1 / np.exp(0.5 * (low + high)))


def write_calibration(workdir: str, record: dict) -> str:
  """Writes WORKDIR/calibration.json (`record` has at least temperature, checkpoint_step); returns its path."""
  path = os.path.join(workdir, CALIBRATION_NAME)
  with open(path, "w") as f:
    json.dump(record, f, indent=2)
  return path


def read_temperature(workdir: str, step: int | None = None) -> float:
  """The temperature of WORKDIR/calibration.json; 1.0 when there is none, or (with a warning) when it was fitted to
  another checkpoint step than `step`."""
  path = os.path.join(workdir, CALIBRATION_NAME)
  if not os.path.exists(path):
    return 1.0
  with open(path) as f:
    record = json.load(f)
  if step is not None and int(record.get("checkpoint_step", -1)) != int(step):
    logging.warning("%s: the temperature %s was fitted to the checkpoint of step %s, not to the one used (step %d): "
                    "ignored (probabilities uncalibrated). Run eval.py --config.eval.calibrate=True again.", path,
                    record.get("temperature"), record.get("checkpoint_step"), step)
    return 1.0
  return float(record["temperature"])
