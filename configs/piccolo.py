"""PICCOLO (3 classes) with the paper's settings (the defaults of pagkd_jax/base_config.py): ResNet-50 at
448 x 448, class groups of 8, Adam 1e-4 with L2 1e-8, 199 epochs, 5 folds split by patient/lesion.

PICCOLO needs an access request to its owners; once you have it, describe it with a manifest CSV
(`path, modality, label, lesion_id[, patient_id, pair_id]`) or the folder layout ROOT/<modality>/<class>/, then:

  python train.py --config=configs/piccolo.py --config.data.manifest=/data/piccolo/manifest.csv \
      --config.model.init_from=weights/resnet50 --workdir=runs/piccolo/fold0
  (or --config.data.root=/data/piccolo; folds: --config.data.fold=0..4; the release's conventions: configs/piccolo.py:release)

weights/resnet50: ImageNet weights imported once with `python -m pagkd_jax.tools.import_weights` (README,
"ImageNet weights"), as the paper starts both networks from ImageNet.
"""

from pagkd_jax import base_config


ARGS = ("release",)  # The accepted `:ARG` values besides none.


def get_config(arg: str | None = None):
  config = base_config.get_config()
  config.stage = "pagkd"  # Trains the NBI teacher first (in WORKDIR/teacher) unless teacher.workdir is set.
  config.data.classes = ("hyperplasia", "adenoma", "adenocarcinoma")
  config.data.num_workers = 8  # 448 px decode + augmentation needs several CPU workers to keep a GPU busy.
  if arg == "release":
    base_config.apply_release_conventions(config)
  elif arg:
    raise ValueError(f"Unknown argument {arg!r} for configs/piccolo.py; expected nothing or 'release'.")
  return config
