"""PolypSet (2 classes: hyperplastic, adenomatous), the paper's setting: ResNet-50 at 448 x 448, class groups
of 8, Adam 1e-4. PolypSet needs an access request; point `data.manifest` or `data.root` at your copy:

  python train.py --config=configs/polypset.py --config.data.root=/data/polypset --workdir=runs/polypset_f0
"""

from pagkd_jax import base_config


def get_config(arg: str | None = None):
  config = base_config.get_config()
  config.stage = "pagkd"  # Trains the NBI teacher first (in WORKDIR/teacher) unless teacher.workdir is set.
  config.data.classes = ("hyperplastic", "adenomatous")
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
    raise ValueError(f"Unknown argument {arg!r} for configs/polypset.py; expected nothing or 'release'.")
  return config
