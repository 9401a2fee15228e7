"""How much a WLI classifier follows the synthetic shortcut (`data.synthetic.shortcut_agreement`, configs/transfer.py).

In the WLI training images a colour cast names the class most of the time; in validation and test it is drawn
independently of the class. On those images a model that ignores the cast gives predictions unrelated to it: the
macro one-vs-rest AUC of its class probabilities scored against the cast as if it were the label (`cast_auc`) is
about 0.5, and the share of images predicted as the class their cast stands for (`cast_following`) is about 1 / C.
A model that learnt the cast in place of the lesion pattern scores higher on both.

  casts = read_casts(config.data.synthetic.out)            # {absolute image path: cast index, -1 none}
  shortcut_reliance(probs, np.asarray([casts[p] for p in paths]))
"""

import numpy as np

from pagkd_jax.data import synthetic
from pagkd_jax.evaluation import metrics as metrics_lib


def read_casts(synthetic_out: str) -> dict[str, int]:
  """{absolute image path: cast (nuisance) index, -1 for none} from OUT/lesions.csv of a generated data set."""
  return synthetic.read_lesion_columns(synthetic_out, lambda row: int(row["nuisance"]), required=("nuisance",),
                                       why_missing="the data set was generated without a shortcut")


def shortcut_reliance(probs: np.ndarray, casts: np.ndarray) -> dict:
  """probs (N, C) class probabilities, casts (N,) cast index in [0, C) of each image (-1: none, left out) ->
  {"cast_auc": macro one-vs-rest AUC of probs against the casts (None if undefined), "cast_following": share of
  images whose predicted class is their cast's, "n_images": images with a cast}."""
  probs, casts = np.asarray(probs, np.float64), np.asarray(casts)
  if probs.ndim != 2 or casts.shape != probs.shape[:1]:
    raise ValueError(f"probs must be (N, C) and casts (N,); got {probs.shape} and {casts.shape}.")
  keep = casts >= 0
  if np.any(casts[keep] >= probs.shape[1]):
    raise ValueError(f"casts must be class indices below C = {probs.shape[1]}; got {sorted(set(casts[keep]))}.")
  if not np.any(keep):
    return {"cast_auc": None, "cast_following": None, "n_images": 0}
  probs, casts = probs[keep], casts[keep]
  report = metrics_lib.classification_report(casts, probs, [str(c) for c in range(probs.shape[1])], n_bootstrap=0)
  return {"cast_auc": report["auc"], "cast_following": float(np.mean(np.argmax(probs, -1) == casts)),
          "n_images": int(len(casts))}
