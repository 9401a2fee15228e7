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

The command lives in pagkd_jax/cli/predict.py; an installed package also has it as `pagkd-predict`.
"""

from pagkd_jax.cli import predict as _cli

if __name__ == "__main__":
  _cli.run()
