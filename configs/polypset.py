"""PolypSet (2 classes) with the paper's settings (the defaults of pagkd_jax/base_config.py): ResNet-50 at
448 x 448, class groups of 8, Adam 1e-4 with L2 1e-8, 199 epochs, 5 folds split by patient/lesion.
PolypSet needs an access request; point `data.manifest` or `data.root` at your copy:

  python train.py --config=configs/polypset.py --config.data.root=/data/polypset \
      --config.model.init_from=weights/resnet50 --workdir=runs/polypset/fold0

weights/resnet50: ImageNet weights imported with `python -m pagkd_jax.tools.import_weights` (README, "ImageNet weights").
"""

from pagkd_jax import base_config


ARGS = ("release",)  # The accepted `:ARG` values besides none.


def get_config(arg: str | None = None):
  config = base_config.get_config()
  config.stage = "pagkd"  # Trains the NBI teacher first (in WORKDIR/teacher) unless teacher.workdir is set.
  config.data.classes = ("hyperplastic", "adenomatous")
  config.data.num_workers = 8  # 448 px decode + augmentation needs several CPU workers to keep a GPU busy.
  if arg == "release":
    base_config.apply_release_conventions(config)
  elif arg:
    raise ValueError(f"Unknown argument {arg!r} for configs/polypset.py; expected nothing or 'release'.")
  return config
