"""PICCOLO (3 classes), the paper's setting: ResNet-50 at 448 x 448, class groups of 8, Adam 1e-4.

PICCOLO needs an access request to its owners; once you have it, describe it with a manifest CSV
(`path, modality, label, lesion_id[, patient_id, pair_id]`) or the folder layout ROOT/<modality>/<class>/, then:

  python train.py --config=configs/piccolo.py --config.data.manifest=/data/piccolo/manifest.csv --workdir=runs/piccolo_f0
  (or --config.data.root=/data/piccolo; folds: --config.data.fold=0..4)
"""

from pagkd_jax import base_config


def get_config(arg: str | None = None):
  config = base_config.get_config()
  config.stage = "pagkd"  # Trains the NBI teacher first (in WORKDIR/teacher) unless teacher.workdir is set.
  config.data.classes = ("hyperplasia", "adenoma", "adenocarcinoma")
  config.data.image_size = 448
  config.data.group_size = 8
  config.data.eval_batch_size = 32
  config.data.num_workers = 8
  config.model.name = "resnet50"
  config.optim.learning_rate = 1e-4
  config.optim.weight_decay = 1e-8
  config.train.epochs = 199.0
  if arg == "release":
    config.data.normalization = "unit"
  elif arg:
    raise ValueError(f"Unknown argument {arg!r} for configs/piccolo.py; expected nothing or 'release'.")
  return config
