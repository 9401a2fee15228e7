"""Expected calibration error and temperature scaling against NumPy references on small known cases."""

import numpy as np
import pytest

from pagkd_jax.evaluation import calibration


def _reference_ece(labels, probs, n_bins):
  """ECE by its definition, one bin at a time: bins (b / n, (b + 1) / n], the first one closed at 0."""
  confidence = probs.max(-1)
  correct = probs.argmax(-1) == labels
  total = 0.0
  for b in range(n_bins):
    low, high = b / n_bins, (b + 1) / n_bins
    members = (confidence > low) & (confidence <= high) if b else (confidence <= high)
    if members.any():
      total += members.mean() * abs(correct[members].mean() - confidence[members].mean())
  return total


def test_ece_of_a_hand_computed_case():
  probs = np.array([[0.9, 0.1], [0.85, 0.15], [0.3, 0.7], [0.55, 0.45]])
  labels = np.array([0, 1, 1, 1])
  # Five bins: (0.8, 1] holds 0.9 (right) and 0.85 (wrong): 2/4 * |0.5 - 0.875| = 0.1875; (0.6, 0.8] holds 0.7
  # (right): 1/4 * |1 - 0.7| = 0.075; (0.4, 0.6] holds 0.55 (wrong): 1/4 * 0.55 = 0.1375. Sum 0.4.
  assert calibration.expected_calibration_error(labels, probs, n_bins=5) == pytest.approx(0.4, abs=1e-12)
  bins = calibration.reliability_bins(labels, probs, n_bins=5)
  assert bins["count"].tolist() == [0, 0, 1, 1, 2]
  np.testing.assert_allclose(bins["accuracy"][2:], [0.0, 1.0, 0.5])
  np.testing.assert_allclose(bins["confidence"][2:], [0.55, 0.7, 0.875])
  # A perfectly calibrated and a perfectly confident right model: ECE 0.
  assert calibration.expected_calibration_error([0, 1], np.eye(2)) == 0.0


@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_ece_matches_the_reference_on_random_predictions(n_bins):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(500, 4)) * 2
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  labels = rng.integers(0, 4, 500)
  assert calibration.expected_calibration_error(labels, probs, n_bins) == pytest.approx(
      _reference_ece(labels, probs, n_bins), abs=1e-12)


def _reference_nll(logits, labels, temperature):
  z = logits / temperature
  return np.mean(np.log(np.exp(z).sum(-1)) - z[np.arange(len(z)), labels])


def test_fitted_temperature_minimises_the_nll_and_recovers_a_known_one():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(20000, 3)) * 3
  true_temperature = 2.0  # Labels drawn from softmax(logits / 2): the model is overconfident by a factor 2.
  p = np.exp(logits / true_temperature)
  p /= p.sum(-1, keepdims=True)
  labels = (rng.random((len(p), 1)) > p.cumsum(-1)).sum(-1)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))  # What the model gives: log-softmax.

  fitted = calibration.fit_temperature(log_probs, labels)
  grid = np.exp(np.linspace(np.log(0.5), np.log(8), 4001))  # Steps of 0.07 %.
  nll = np.array([_reference_nll(logits, labels, t) for t in grid])
  assert abs(fitted - grid[nll.argmin()]) <= 2 * (grid[1] - grid[0]) * grid[nll.argmin()]
  assert _reference_nll(logits, labels, fitted) <= nll.min() + 1e-9
  assert fitted == pytest.approx(true_temperature, rel=0.05)  # 20000 draws: the estimate is within a few %.
  assert calibration.negative_log_likelihood(log_probs, labels, fitted) == pytest.approx(
      _reference_nll(logits, labels, fitted), abs=1e-9)
  np.testing.assert_allclose(calibration.apply_temperature(log_probs, fitted),
                             np.exp(logits / fitted) / np.exp(logits / fitted).sum(-1, keepdims=True), atol=1e-7)


def test_temperature_outside_the_range_is_clipped_with_a_warning(caplog):
  log_probs = np.log(np.array([[0.6, 0.4], [0.3, 0.7]]))  # Both right: the NLL falls as T -> 0.
  assert calibration.fit_temperature(log_probs, np.array([0, 1])) == pytest.approx(calibration.TEMPERATURE_RANGE[0])
  assert "outside" in caplog.text
  # A zero probability (log -inf) of a wrong class is fine.
  assert np.isfinite(calibration.fit_temperature(np.array([[0.0, -np.inf], [-0.1, -2.4]]), np.array([0, 1])))


def test_a_temperature_of_another_checkpoint_is_ignored(tmp_path, caplog):
  calibration.write_calibration(str(tmp_path), {"temperature": 1.7, "checkpoint_step": 300})
  assert calibration.read_temperature(str(tmp_path), 300) == 1.7
  assert calibration.read_temperature(str(tmp_path), 400) == 1.0
  assert "fitted to the checkpoint of step 300, not to the one used (step 400)" in caplog.text
  assert calibration.read_temperature(str(tmp_path / "elsewhere"), 300) == 1.0
