"""The transfer regime: synthetic data where an unpaired NBI teacher has something to give a WLI student.

  python train.py --config=configs/transfer.py:pretrain --workdir=runs/transfer/seed0/pretrain   # generic backbone
  python train.py --config=configs/transfer.py --config.stage=baseline --workdir=runs/transfer/seed0/baseline \
      --config.model.init_from=runs/transfer/seed0/pretrain
  python train.py --config=configs/transfer.py:oracle --workdir=runs/transfer/seed0/oracle \
      --config.model.init_from=runs/transfer/seed0/pretrain
  python scripts/transfer_headroom.py --seed=0                                  # the headroom check, all of the above

Arguments: nothing (the regime, stage 2), `pretrain` (the generic task every run of a seed starts from, stage
baseline), `oracle` (WLI classifier on ten times the WLI training lesions, shortcut uninformative, stage
baseline), each optionally with `,smoke` (tiny images and counts: a CI-sized run of seconds).

The regime (docs/RESULTS.md, "Transfer regime"): 12 WLI training lesions per class, 150 unpaired NBI ones; a WLI
colour cast that agrees with the class in 90 % of the WLI training lesions and is independent of it in validation
and test; three pattern sub-types per class; the WLI pattern at contrast 1.0. The values that the headroom check set
(the contrast, the generic pretraining's size and steps) and every attempt are in docs/RESULTS.md, "Headroom
check". The generator fixes the split (30 validation and 30 test lesions per class and modality,
`data.splits = "manifest"`), so the oracle's and the regime's WLI test images are the same files. Images go to
data/synthetic_endoscopy/<name from the options>/ beside this repository (ignored by git).
"""

import os

from pagkd_jax import base_config
from pagkd_jax.data import synthetic

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ("pretrain", "oracle", "smoke", "pretrain,smoke", "oracle,smoke")  # Every accepted argument.
ORACLE_LESION_FACTOR = 10  # The oracle's WLI training lesions, in multiples of the regime's.


def get_config(arg: str | None = None):
  if arg and arg not in ARGS:
    raise ValueError(f"Unknown argument {arg!r} for configs/transfer.py; expected nothing, 'pretrain', 'oracle' "
                     "or 'smoke', or one of the first two with ',smoke'.")
  names = arg.split(",") if arg else []
  config = base_config.get_config()
  config.stage = "pagkd"  # Trains the NBI teacher first (in WORKDIR/teacher) unless teacher.workdir is set.
  data = config.data
  s = data.synthetic
  s.enabled = True
  s.image_size = 96
  s.images_per_lesion = 3
  s.lesions_per_class = 60  # Unused here: both modalities' counts are set.
  s.wli_lesions_per_class = 12  # Few WLI training lesions (the premise)...
  s.nbi_lesions_per_class = 150  # ... many unpaired NBI ones.
  s.eval_lesions_per_class = 30  # Per class and modality, for validation and for test: AUC on 90 lesions.
  s.shortcut_agreement = 0.9  # The WLI-only shortcut in training; independent of the class in val/test.
  s.subtypes_per_class = 3  # A group of 8 shows every sub-type of its class, one image one.
  # The WLI pattern's visibility (the generator's default is 0.5), set with the generic pretraining's size and steps
  # below by the headroom check (docs/RESULTS.md, "Transfer regime", "Headroom check").
  s.wli_contrast = 1.0
  data.splits = "manifest"  # The generator's fixed split.
  data.image_size = 64
  data.group_size = 8
  data.eval_batch_size = 64
  data.normalization = "imagenet"
  config.model.name = "tiny"
  config.optim.learning_rate = 3e-3
  config.optim.schedule = "warmup_cosine"
  config.optim.warmup_epochs = 1.0
  # One budget in steps for every stage: the NBI teacher's epoch is 12x the WLI one, so epochs would not compare.
  config.train.num_steps = 600
  config.train.log_every_steps = 20
  config.train.eval_every_steps = 50
  config.train.checkpoint_every_steps = 50
  config.train.log_grad_norms = True  # The benchmark's diagnostics: gradients L_pro / L_den send into layer4.
  # As configs/synthetic.py (chosen there for a from-scratch student); with 108 WLI training images an epoch is 5
  # steps, so the cross-entropy warm-up is the first 100 of the 600 steps.
  config.distill.warmup_epochs = 20.0
  config.distill.lambda_pro = 0.1

  if "pretrain" in names:  # The generic task: a backbone per seed for teacher, baseline, students and oracle.
    config.stage = "baseline"  # Every generic image is listed as WLI (both palettes; see synthetic.generate).
    data.classes = synthetic.GENERIC_CLASSES
    data.splits = "folds"
    data.group_size = 4  # 10 classes: 40 images per step.
    for name, default in synthetic.REGIME_DEFAULTS.items():
      s[name] = default
    s.task = "generic"
    # 80 lesions and 1500 steps, set by the headroom check (docs/RESULTS.md, "Headroom check"): with 40 lesions
    # and 600 steps the backbone learnt too little of the generic task and slowed the oracle down.
    s.lesions_per_class = 80
    s.images_per_lesion = 2
    config.train.num_steps = 1500
  elif "oracle" in names:  # Ten times the WLI training lesions; the same casts, independent of the class.
    config.stage = "baseline"
    s.wli_lesions_per_class *= ORACLE_LESION_FACTOR
    s.shortcut_agreement = 1.0 / len(data.classes)
  if "smoke" in names:  # Tiny images and counts: every stage runs in seconds (CI, the headroom script's test).
    s.image_size = 32
    data.image_size = 32
    data.group_size = 2
    data.eval_batch_size = 16
    s.images_per_lesion = 1
    if s.task == "generic":
      s.lesions_per_class = 8  # The 5 folds need 5 patient groups per class.
    else:
      s.wli_lesions_per_class = 2 * (ORACLE_LESION_FACTOR if "oracle" in names else 1)
      s.nbi_lesions_per_class = 4
      s.eval_lesions_per_class = 3
    config.train.num_steps = 6
    config.train.log_every_steps = 2
    config.train.eval_every_steps = 3
    config.train.checkpoint_every_steps = 3
    config.distill.warmup_epochs = 1.0
    config.eval.bootstrap_samples = 20
    config.eval.num_cam_images = 2

  if s.task == "generic":
    name = (f"generic{len(data.classes)}_{s.image_size}px_{s.lesions_per_class}l_{s.images_per_lesion}v"
            f"_contrast{s.wli_contrast:g}")
  else:
    name = (f"transfer_{s.image_size}px_{s.images_per_lesion}v_wli{s.wli_lesions_per_class}"
            f"_nbi{s.nbi_lesions_per_class}_eval{s.eval_lesions_per_class}_shortcut{s.shortcut_agreement:.3g}"
            f"_sub{s.subtypes_per_class}_contrast{s.wli_contrast:g}")
  s.out = os.path.join(_REPO, "data", "synthetic_endoscopy", f"{name}_seed{s.seed}")
  return config
