"""Shortcut reliance (pagkd_jax/evaluation/shortcut.py) against a slow NumPy reference, and in eval.py's report of a
real run on the transfer regime's data."""

import json
import os

import numpy as np
import pytest

from pagkd_jax.evaluation import shortcut
from training_configs import load_preset


def _np_auc(scores, positive):
  """P(score of a positive > score of a negative) + 0.5 P(tie), over every (positive, negative) pair."""
  pos, neg = scores[positive], scores[~positive]
  return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def _np_reliance(probs, casts):
  keep = casts >= 0
  probs, casts = probs[keep], casts[keep]
  aucs = [_np_auc(probs[:, c], casts == c) for c in range(probs.shape[1]) if 0 < np.sum(casts == c) < len(casts)]
  return np.mean(aucs), np.mean(probs.argmax(1) == casts)


def test_matches_the_pairwise_reference_and_leaves_out_images_without_a_cast():
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(3), size=40)
  casts = rng.integers(-1, 3, size=40)
  got = shortcut.shortcut_reliance(probs, casts)
  auc, following = _np_reliance(probs, casts)
  assert got["cast_auc"] == pytest.approx(auc, abs=1e-12) and got["cast_following"] == pytest.approx(following)
  assert got["n_images"] == int(np.sum(casts >= 0))


def test_a_model_of_the_class_ignores_a_cast_independent_of_it_and_a_model_of_the_cast_follows_it():
  labels = np.repeat(np.arange(3), 9)
  casts = np.tile(np.arange(3), 9)  # Every cast equally often in every class, as in the test split.
  of_class = shortcut.shortcut_reliance(np.eye(3)[labels], casts)
  assert of_class["cast_auc"] == pytest.approx(0.5) and of_class["cast_following"] == pytest.approx(1 / 3)
  of_cast = shortcut.shortcut_reliance(np.eye(3)[casts] * 0.8 + 0.1, casts)
  assert of_cast["cast_auc"] == pytest.approx(1.0) and of_cast["cast_following"] == 1.0


def test_bad_inputs_are_named(tmp_path):
  with pytest.raises(ValueError, match=r"probs must be \(N, C\)"):
    shortcut.shortcut_reliance(np.ones((4, 3)) / 3, np.zeros(5, int))
  with pytest.raises(ValueError, match="below C = 3"):
    shortcut.shortcut_reliance(np.ones((2, 3)) / 3, np.array([0, 3]))
  assert shortcut.shortcut_reliance(np.ones((2, 3)) / 3, np.array([-1, -1]))["cast_auc"] is None
  with pytest.raises(FileNotFoundError, match="lesions.csv"):
    shortcut.read_casts(str(tmp_path))
  (tmp_path / "lesions.csv").write_text("path,center_x,center_y,radius\na.png,1,1,1\n")
  with pytest.raises(ValueError, match="no 'nuisance' column"):
    shortcut.read_casts(str(tmp_path))


def test_eval_reports_the_wli_models_reliance_on_the_cast(tmp_path):
  """A 6-step WLI baseline on the transfer regime's smoke data: eval.py's report holds the shortcut figures of every
  WLI test image, computed from the probabilities it reports and the casts in lesions.csv."""
  from pagkd_jax import experiment
  from pagkd_jax.evaluation import evaluator
  from pagkd_jax.training import trainer
  config = load_preset("transfer", "smoke")
  config.stage = "baseline"
  config.data.synthetic.out = str(tmp_path / "data")
  workdir = str(tmp_path / "baseline")
  trainer.train_and_evaluate(config, workdir)
  result = evaluator.evaluate_workdir(workdir)
  saved = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
  test = experiment.load_split_data(config).select("test", "wli")
  casts = shortcut.read_casts(config.data.synthetic.out)
  want = shortcut.shortcut_reliance(result["probs"], np.asarray([casts[os.path.realpath(r.path)] for r in test]))
  assert saved["shortcut"] == want and want["n_images"] == len(test) == saved["n_images"]
  assert min(casts.values()) == -1 and all(casts[os.path.realpath(r.path)] >= 0 for r in test)  # NBI: no cast.
