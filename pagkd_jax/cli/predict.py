"""Predictions of a trained model on new images, and its export.

  python predict.py --workdir=runs/synthetic/pagkd --input=new_frames/ --out=preds.csv
  python predict.py --workdir=runs/synthetic/pagkd --input=a.png --input=list.csv --out=preds.csv --cams=cams/
  python predict.py --workdir=runs/synthetic/pagkd --export=exported/   # a jax.export program + weights + JSON

--input is an image, a folder (searched recursively) or a CSV with a `path` column; repeat it for several. The CSV
has one row per image: path, predicted class, one probability column per class (prob_<class>) and `error`, the
reason an image could not be used (its probabilities are then empty; the others are predicted). A stage-2 (pagkd)
or baseline workdir predicts with its WLI classifier, a teacher workdir with the NBI teacher. The workdir's
config.json is checked first (pagkd_jax/config_check.py); a mistaken value exits with status 2.

--export=DIR writes the classifier with its preprocessing as a serialised jax.export program (any batch size and
image size), its weights and model.json; pagkd_jax/exported_model.py runs it with jax and numpy only
(pagkd_jax/evaluation/model_export.py says what the files hold).
"""

import os

import jax
from absl import app
from absl import flags

from pagkd_jax import config_check
from pagkd_jax import runtime
from pagkd_jax.evaluation import evaluator
from pagkd_jax.evaluation import model_export
from pagkd_jax.evaluation import prediction

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir whose model predicts.")
_INPUT = flags.DEFINE_multi_string("input", [], "Image, folder (recursive) or CSV with a 'path' column; repeatable.")
_OUT = flags.DEFINE_string("out", None, "The predictions CSV to write.")
_CAMS = flags.DEFINE_string("cams", None, "Folder for CAM overlays of the predicted class (one PNG per image).")
_WHICH = flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                           "Which checkpoint: best by validation AUC, or the latest.")
_EXPORT = flags.DEFINE_string("export", None, "Folder to write the exported model to (model.jaxexport, weights.npz, "
                              "model.json).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Images per batch (default: the run's data.eval_batch_size).")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _INPUT.value and not _EXPORT.value:
    raise app.UsageError("Give --input (an image, a folder or a CSV; repeatable) with --out, or --export=DIR.")
  if _INPUT.value and not _OUT.value:
    raise app.UsageError("--out (the predictions CSV) is required with --input.")
  runtime.initialize()
  path = os.path.join(_WORKDIR.value, "config.json")
  if os.path.exists(path):  # A missing one is reported when the model is loaded.
    config_check.exit_on_problems([f"{path}: {p}" for p in config_check.find_problems(
        evaluator.load_config(_WORKDIR.value), check_paths=False)])
  if _INPUT.value:  # Before the model is loaded: a mistyped input stops at once.
    paths = prediction.collect_image_paths(_INPUT.value)
  predictor = prediction.load_predictor(_WORKDIR.value, _WHICH.value)
  if _INPUT.value:
    prediction.predict(predictor, paths, _OUT.value, cams_dir=_CAMS.value, batch_size=_BATCH_SIZE.value)
  if _EXPORT.value and jax.process_index() == 0:
    model_export.export_predictor(predictor, _EXPORT.value)


def run() -> None:
  """The `pagkd-predict` command (pyproject.toml [project.scripts]) and `python predict.py`."""
  app.run(main)


if __name__ == "__main__":
  run()
