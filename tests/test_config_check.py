"""The config check: one broken value per rule and the line it must produce, every preset passing, and the
command-line tools stopping with exit status 2 before they write anything."""

import copy
import importlib.util
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from pagkd_jax import base_config
from pagkd_jax import config_check
from training_configs import REPO_ROOT, load_preset

SOURCES = "exactly one data source: data.synthetic.enabled=True (generated images), ..."

# (overrides of configs/synthetic.py:smoke, the problems they must produce[, find_problems arguments]). TMP stands
# for an existing folder holding the file "file.csv"; a line ending in "..." is matched up to there.
BROKEN = [
    ({"stage": "student"}, ["stage='student': expected one of 'teacher', 'baseline', 'pagkd', 'crckd', 'kd', 'fitnets', 'add'"]),
    ({"seed": -1}, ["seed=-1: expected an integer >= 0"]),
    ({"data.manifest": "TMP/file.csv"}, [
        "data.synthetic.enabled=True, data.manifest='TMP/file.csv', data.root='', data.tfds_dir='': "
        f"expected {SOURCES}"]),
    ({"data.synthetic.enabled": False}, [
        f"data.synthetic.enabled=False, data.manifest='', data.root='', data.tfds_dir='': expected {SOURCES}"]),
    ({"data.synthetic.enabled": False, "data.manifest": "TMP/missing.csv"},
     ["data.manifest='TMP/missing.csv': expected '' or an existing file (a manifest CSV)"]),
    ({"data.synthetic.enabled": False, "data.manifest": "TMP"},
     ["data.manifest='TMP': expected '' or an existing file (a manifest CSV)"]),
    ({"data.synthetic.enabled": False, "data.root": "TMP/file.csv"},
     ["data.root='TMP/file.csv': expected '' or an existing folder (ROOT/<modality>/<class>/ images)"]),
    ({"data.synthetic.enabled": False, "data.tfds_dir": "TMP/nothing"},
     ["data.tfds_dir='TMP/nothing': expected '' or an existing folder (written by data/build_tfds.py)"]),
    ({"data.classes": ["adenoma"]}, ["data.classes=['adenoma']: expected at least 2 distinct, non-empty class names"]),
    ({"data.classes": ["a", "a"]}, ["data.classes=['a', 'a']: expected at least 2 distinct, non-empty class names"]),
    ({"data.classes": ["a", " "]}, ["data.classes=['a', ' ']: expected at least 2 distinct, non-empty class names"]),
    ({"data.classes": ["a", ["b"]]}, ["data.classes=['a', ['b']]: expected at least 2 distinct, non-empty class names"]),
    ({"data.num_folds": 1}, ["data.num_folds=1: expected an integer >= 2"]),
    ({"data.fold": 5}, ["data.fold=5, data.num_folds=5: expected an integer with 0 <= data.fold < data.num_folds"]),
    ({"data.fold": -1}, ["data.fold=-1, data.num_folds=5: expected an integer with 0 <= data.fold < data.num_folds"]),
    ({"data.val_fraction": 1.0}, ["data.val_fraction=1.0: expected a number in [0, 1)"]),
    ({"data.split_seed": -2}, ["data.split_seed=-2: expected an integer >= 0"]),
    ({"data.skip_bad_files": 1}, ["data.skip_bad_files=1: expected True or False"]),
    ({"data.shuffle_train_labels": "yes"}, ["data.shuffle_train_labels='yes': expected True or False"]),
    ({"data.image_size": 16}, ["data.image_size=16: expected an integer >= 32"]),
    ({"data.image_size": 64.0}, ["data.image_size=64.0: expected an integer >= 32"]),
    ({"data.min_image_size": -1}, ["data.min_image_size=-1: expected an integer >= 0"]),
    ({"data.group_size": 0}, ["data.group_size=0: expected an integer >= 1"]),
    ({"data.paired_batch_size": 6, "distill.paired": True}, [
        "data.paired_batch_size=6, devices=4, processes=1: expected a multiple of the number of devices and of the "
        "number of processes when the paired stream runs (distill.paired=True or a stage trained on pairs; each gets "
        "an equal share of the pairs)"], {"devices": 4}),
    ({"data.paired_batch_size": 6, "stage": "kd"}, [
        "data.paired_batch_size=6, devices=4, processes=1: expected a multiple of the number of devices and of the "
        "number of processes when the paired stream runs (distill.paired=True or a stage trained on pairs; each gets "
        "an equal share of the pairs)"], {"devices": 4}),
    ({"distill.paired": 1}, ["distill.paired=1: expected True or False"]),
    ({"data.group_size": 6}, ["data.group_size=6, devices=4, processes=1: expected a multiple of the number of devices "
                              "and of the number of processes (each gets an equal share)"], {"devices": 4}),
    ({"data.group_size": 6}, ["data.group_size=6, devices=2, processes=4: expected a multiple of the number of devices "
                              "and of the number of processes (each gets an equal share)"],
     {"devices": 2, "processes": 4}),
    ({"data.paired_batch_size": 0}, ["data.paired_batch_size=0: expected an integer >= 1"]),
    ({"data.paired_batch_size": 2.5}, ["data.paired_batch_size=2.5: expected an integer >= 1"]),
    ({"data.eval_batch_size": 0}, ["data.eval_batch_size=0: expected an integer >= 1"]),
    ({"data.num_workers": -1}, ["data.num_workers=-1: expected an integer >= 0"]),
    ({"data.worker_buffer_size": 0}, ["data.worker_buffer_size=0: expected an integer >= 1"]),
    ({"data.normalization": "none"}, ["data.normalization='none': expected one of 'imagenet', 'unit'"]),
    ({"data.augment.rotate": "yes"}, ["data.augment.rotate='yes': expected True or False"]),
    ({"data.augment.hflip": None}, ["data.augment.hflip=None: expected True or False"]),
    ({"data.augment.vflip": 0}, ["data.augment.vflip=0: expected True or False"]),
    ({"data.augment.random_resized_crop": "False"}, [
        "data.augment.random_resized_crop='False': expected True or False"]),
    ({"data.augment.crop_scale": (0.8, 0.5)}, [
        "data.augment.crop_scale=(0.8, 0.5): expected two numbers (low, high) with 0 < low <= high <= 1"]),
    ({"data.augment.crop_scale": (0.0, 1.0)}, [
        "data.augment.crop_scale=(0.0, 1.0): expected two numbers (low, high) with 0 < low <= high <= 1"]),
    ({"data.augment.color_jitter": -0.1}, ["data.augment.color_jitter=-0.1: expected a number >= 0"]),
    ({"data.synthetic.enabled": "true"}, ["data.synthetic.enabled='true': expected True or False"]),
    ({"data.synthetic.out": ""}, [
        "data.synthetic.out='': expected the folder of the generated images when data.synthetic.enabled"]),
    ({"data.synthetic.image_size": 48}, [
        "data.synthetic.image_size=48, data.image_size=64: expected data.synthetic.image_size >= data.image_size when "
        "data.synthetic.enabled (no upsampled images)"]),
    ({"data.synthetic.image_size": 4, "data.synthetic.enabled": False, "data.manifest": "TMP/file.csv"},
     ["data.synthetic.image_size=4: expected an integer >= 8"]),
    ({"data.synthetic.lesions_per_class": 0}, ["data.synthetic.lesions_per_class=0: expected an integer >= 1"]),
    ({"data.synthetic.images_per_lesion": 0}, ["data.synthetic.images_per_lesion=0: expected an integer >= 1"]),
    ({"data.synthetic.paired_fraction": 1.5}, ["data.synthetic.paired_fraction=1.5: expected a number in [0, 1]"]),
    ({"data.synthetic.seed": -1}, ["data.synthetic.seed=-1: expected an integer >= 0"]),
    ({"data.synthetic.wli_contrast": -0.1}, ["data.synthetic.wli_contrast=-0.1: expected a number >= 0"]),
    ({"data.splits": "kfold"}, ["data.splits='kfold': expected one of 'folds', 'manifest'"]),
    ({"data.synthetic.task": "shapes"}, ["data.synthetic.task='shapes': expected one of 'lesion', 'generic'"]),
    ({"data.synthetic.wli_lesions_per_class": 0}, [
        "data.synthetic.wli_lesions_per_class=0: expected -1 (data.synthetic.lesions_per_class) or an integer >= 1"]),
    ({"data.synthetic.nbi_lesions_per_class": -2}, [
        "data.synthetic.nbi_lesions_per_class=-2: expected -1 (data.synthetic.lesions_per_class) or an integer >= 1"]),
    ({"data.synthetic.eval_lesions_per_class": -1},
     ["data.synthetic.eval_lesions_per_class=-1: expected an integer >= 0"]),
    ({"data.synthetic.shortcut_agreement": 1.5, "data.synthetic.eval_lesions_per_class": 3, "data.splits": "manifest"},
     ["data.synthetic.shortcut_agreement=1.5: expected a number in [0, 1]"]),
    ({"data.synthetic.subtypes_per_class": 0}, ["data.synthetic.subtypes_per_class=0: expected an integer >= 1"]),
    ({"data.synthetic.eval_lesions_per_class": 3}, [
        "data.synthetic.eval_lesions_per_class=3, data.splits='folds': expected data.splits='manifest' exactly when "
        "data.synthetic.eval_lesions_per_class > 0 (the generator then fixes the split)"]),
    ({"data.synthetic.shortcut_agreement": 0.9}, [
        "data.synthetic.shortcut_agreement=0.9, data.synthetic.eval_lesions_per_class=0: expected shortcut_agreement "
        "0 unless eval_lesions_per_class > 0 ..."]),
    ({"data.synthetic.task": "generic", "data.synthetic.subtypes_per_class": 2}, [
        "data.synthetic.task='generic', data.classes=('hyperplasia', 'adenoma', 'adenocarcinoma'): expected task "
        "'generic' with at most 10 classes ..."]),
    ({"model.name": "resnet51"}, [
        "model.name='resnet51': expected one of 'resnet18', 'resnet34', 'resnet50', 'resnet101', 'tiny'"]),
    ({"model.dtype": "float16"}, ["model.dtype='float16': expected one of 'float32', 'bfloat16'"]),
    ({"model.conv_impl": "dot"},
     ["model.conv_impl='dot': expected one of 'auto', 'xla', 'dot_wgrad', 'dot_wgrad_1x1'"]),
    ({"model.init_from": "TMP/weights"}, [
        "model.init_from='TMP/weights': expected '' or an existing file or folder (imported weights, or a .pth / "
        ".safetensors file)"]),
    ({"optim.learning_rate": 0.0}, ["optim.learning_rate=0.0: expected a number > 0"]),
    ({"optim.learning_rate": float("inf")}, ["optim.learning_rate=inf: expected a number > 0"]),
    ({"optim.weight_decay": -1e-8}, ["optim.weight_decay=-1e-08: expected a number >= 0"]),
    ({"optim.schedule": "cosine"}, ["optim.schedule='cosine': expected one of 'constant', 'warmup_cosine'"]),
    ({"optim.warmup_epochs": -1.0}, ["optim.warmup_epochs=-1.0: expected a number >= 0"]),
    ({"optim.b1": 1.0}, ["optim.b1=1.0: expected a number in [0, 1)"]),
    ({"optim.b2": -0.1}, ["optim.b2=-0.1: expected a number in [0, 1)"]),
    ({"optim.grad_clip_norm": -1.0}, ["optim.grad_clip_norm=-1.0: expected a number >= 0"]),
    ({"train.epochs": float("nan")}, [
        "train.epochs=nan: expected a number",
        "train.epochs=nan, train.num_steps=-1: expected train.num_steps > 0, or train.epochs > 0 (used when "
        "train.num_steps <= 0)"]),
    ({"train.num_steps": 2.5}, ["train.num_steps=2.5: expected an integer"]),
    ({"train.epochs": 0.0}, [
        "train.epochs=0.0, train.num_steps=-1: expected train.num_steps > 0, or train.epochs > 0 (used when "
        "train.num_steps <= 0)"]),
    ({"train.log_every_steps": 0}, ["train.log_every_steps=0: expected an integer >= 1"]),
    ({"train.eval_every_steps": 0}, ["train.eval_every_steps=0: expected an integer >= 1"]),
    ({"train.checkpoint_every_steps": -5}, ["train.checkpoint_every_steps=-5: expected an integer >= 1"]),
    ({"train.keep_latest": 0}, ["train.keep_latest=0: expected an integer >= 1"]),
    ({"train.on_nonfinite": "ignore"}, ["train.on_nonfinite='ignore': expected one of 'stop', 'skip'"]),
    ({"train.select_after_warmup": 1}, ["train.select_after_warmup=1: expected True or False"]),
    ({"train.log_grad_norms": 0}, ["train.log_grad_norms=0: expected True or False"]),
    ({"eval.bootstrap_samples": -1}, ["eval.bootstrap_samples=-1: expected an integer >= 0"]),
    ({"eval.num_cam_images": -1}, ["eval.num_cam_images=-1: expected an integer >= 0"]),
    ({"eval.calibrate": "yes"}, ["eval.calibrate='yes': expected True or False"]),
    ({"eval.calibration_bins": 0}, ["eval.calibration_bins=0: expected an integer >= 1"]),
    ({"teacher.workdir": "TMP/teacher"}, [
        "teacher.workdir='TMP/teacher': expected '' or an existing folder (the workdir of a trained NBI teacher)"]),
    ({"teacher.workdir": "TMP/file.csv"}, [
        "teacher.workdir='TMP/file.csv': expected '' or an existing folder (the workdir of a trained NBI teacher)"]),
    ({"distill.variant": "papr"}, ["distill.variant='papr': expected one of 'paper', 'release'"]),
    ({"distill.level": "pixel"}, ["distill.level='pixel': expected one of 'group', 'image'"]),
    ({"distill.embed_dim": 0}, ["distill.embed_dim=0: expected an integer >= 1"]),
    ({"distill.warmup_epochs": -1.0}, ["distill.warmup_epochs=-1.0: expected a number >= 0"]),
    ({"distill.use_pro": "yes"}, ["distill.use_pro='yes': expected True or False"]),
    ({"distill.lambda_pro": -1.0}, ["distill.lambda_pro=-1.0: expected None (the variant's default) or a number >= 0"]),
    ({"distill.prototypes": "mean"}, ["distill.prototypes='mean': expected one of 'qformer', 'avg_pool'"]),
    ({"distill.num_queries": 0}, ["distill.num_queries=0: expected an integer >= 1"]),
    ({"distill.qformer_layers": 0}, ["distill.qformer_layers=0: expected an integer >= 1"]),
    ({"distill.qformer_heads": 0}, [
        "distill.qformer_heads=0: expected None (the variant's default) or an integer >= 1"]),
    ({"distill.qformer_heads": 3}, [
        "distill.qformer_heads=3, distill.embed_dim=128: expected heads that divide distill.embed_dim (None: 8 for the "
        "paper variant, 16 for the release variant)"]),
    ({"distill.embed_dim": 12}, [
        "distill.qformer_heads=None, distill.embed_dim=12: expected heads that divide distill.embed_dim (None: 8 for "
        "the paper variant, 16 for the release variant)"]),
    ({"distill.embed_dim": 24, "distill.variant": "release"}, [
        "distill.qformer_heads=None, distill.embed_dim=24: expected heads that divide distill.embed_dim (None: 8 for "
        "the paper variant, 16 for the release variant)"]),
    ({"distill.temperature": 0.0}, ["distill.temperature=0.0: expected a number > 0"]),
    ({"distill.use_den": 1}, ["distill.use_den=1: expected True or False"]),
    ({"distill.lambda_den": -1.0}, ["distill.lambda_den=-1.0: expected a number >= 0"]),
    ({"distill.masked": "no"}, ["distill.masked='no': expected True or False"]),
    ({"distill.bidirectional": None}, ["distill.bidirectional=None: expected True or False"]),
    ({"distill.proj_dim": 0}, ["distill.proj_dim=0: expected None (distill.embed_dim // 4) or an integer >= 1"]),
    ({"distill.embed_dim": 2, "distill.qformer_heads": 2}, [
        "distill.embed_dim=2: expected at least 4 when distill.proj_dim is None (embed_dim // 4)"]),
    ({"distill.thresholds": (0.3, 0.7)}, [
        "distill.thresholds=(0.3, 0.7): expected two numbers in [0, 1], the lesion threshold (first) above the "
        "background threshold (second)"]),
    ({"distill.thresholds": (0.7,)}, [
        "distill.thresholds=(0.7,): expected two numbers in [0, 1], the lesion threshold (first) above the "
        "background threshold (second)"]),
    ({"distill.thresholds": (1.2, 0.3)}, [
        "distill.thresholds=(1.2, 0.3): expected two numbers in [0, 1], the lesion threshold (first) above the "
        "background threshold (second)"]),
    ({"distill.par_iters": -1}, ["distill.par_iters=-1: expected an integer >= 0"]),
    ({"distill.par_dilations": ()}, ["distill.par_dilations=(): expected a non-empty tuple of integers >= 1"]),
    ({"distill.par_dilations": (1, 0)}, ["distill.par_dilations=(1, 0): expected a non-empty tuple of integers >= 1"]),
    ({"distill.par_downscale": 0}, ["distill.par_downscale=0: expected an integer >= 1"]),
    ({"distill.par_temperature": 0.0}, ["distill.par_temperature=0.0: expected a number > 0"]),
    ({"distill.par_pos_weight": -0.01}, ["distill.par_pos_weight=-0.01: expected a number >= 0"]),
    ({"distill.paired_loss": "srca"}, ["distill.paired_loss='srca': expected None (the variant's) or one of 'paper', "
                                        "'release'"]),
    ({"distill.paired_loss": "paper", "distill.variant": "release", "distill.paired": True}, [
        "distill.paired_loss='paper', distill.variant='release': expected paired_loss 'release' or None with variant "
        "'release' when the paired stream runs with GKD-Den (the 'paper' paired loss attends through the paper "
        "SRCA's projections)"]),
    ({"distill.par_resampling": "nearest"}, ["distill.par_resampling='nearest': expected one of 'release', 'area'"]),
    ({"distill.teacher_class_shift": 0.5}, ["distill.teacher_class_shift=0.5: expected an integer"]),
    ({"distill.teacher_class_shift_per_step": 1}, [
        "distill.teacher_class_shift_per_step=1: expected True or False"]),
    ({"distill.teacher_class_shift_per_step": True, "distill.teacher_class_shift": 1}, [
        "distill.teacher_class_shift_per_step=True: expected False unless data.classes has at least 3 classes "
        "(with 2 the only other class is fixed) and distill.teacher_class_shift is 0"]),
    ({"distill.teacher_class_shift_per_step": True, "data.classes": ["a", "b"]}, [
        "distill.teacher_class_shift_per_step=True: expected False unless data.classes has at least 3 classes "
        "(with 2 the only other class is fixed) and distill.teacher_class_shift is 0"]),
    ({"distill.region_labels": "cams"}, ["distill.region_labels='cams': expected one of 'cam_par', 'random'"]),
    ({"distill.random_region_fractions": (0.5, 0.5)}, [
        "distill.random_region_fractions=(0.5, 0.5): expected three numbers >= 0 with a positive sum (lesion, "
        "background, ambiguous)"]),
    ({"distill.random_region_fractions": (1.0, -0.5, 0.5)}, [
        "distill.random_region_fractions=(1.0, -0.5, 0.5): expected three numbers >= 0 with a positive sum (lesion, "
        "background, ambiguous)"]),
    ({"crckd.embed_dim": 0}, ["crckd.embed_dim=0: expected an integer >= 1"]),
    ({"crckd.contrast_dim": 64.0}, ["crckd.contrast_dim=64.0: expected an integer >= 1"]),
    ({"crckd.ema_decay": 1.5}, ["crckd.ema_decay=1.5: expected a number in [0, 1]"]),
    ({"crckd.consistency_weight": -1.0}, ["crckd.consistency_weight=-1.0: expected a number >= 0"]),
    ({"crckd.consistency_rampup_epochs": -1.0}, ["crckd.consistency_rampup_epochs=-1.0: expected a number >= 0"]),
    ({"crckd.mean_teacher_start_epoch": -1}, ["crckd.mean_teacher_start_epoch=-1: expected a number >= 0"]),
    ({"crckd.num_positives": 0}, ["crckd.num_positives=0: expected an integer >= 1"]),
    ({"crckd.num_negatives": 0}, ["crckd.num_negatives=0: expected an integer >= 1"]),
    ({"crckd.temperature": 0.0}, ["crckd.temperature=0.0: expected a number > 0"]),
    ({"crckd.bank_momentum": 1.1}, ["crckd.bank_momentum=1.1: expected a number in [0, 1]"]),
    ({"crckd.nce_eps": -1e-7}, ["crckd.nce_eps=-1e-07: expected a number >= 0"]),
    ({"crckd.ccd_weight": -0.1}, ["crckd.ccd_weight=-0.1: expected a number >= 0"]),
    ({"crckd.ccd_weight_late": None}, ["crckd.ccd_weight_late=None: expected a number >= 0"]),
    ({"crckd.crp_weight": "1"}, ["crckd.crp_weight='1': expected a number >= 0"]),
    ({"crckd.crp_temperature": -0.07}, ["crckd.crp_temperature=-0.07: expected a number > 0"]),
    ({"crckd.bank_init_scale": 0.0}, [
        "crckd.bank_init_scale=0.0: expected None (1 / sqrt(crckd.contrast_dim / 3)) or a number > 0"]),
    ({"crckd.normalize_eps": 0.0}, ["crckd.normalize_eps=0.0: expected a number > 0"]),
    ({"fitnets.weight": -1.0}, ["fitnets.weight=-1.0: expected a number >= 0"]),
    ({"paired_method.unpaired": "yes"}, ["paired_method.unpaired='yes': expected True or False"]),
    ({"add.warmup_epochs": -1.0}, ["add.warmup_epochs=-1.0: expected a number >= 0"]),
    ({"add.dense_weight": "1"}, ["add.dense_weight='1': expected a number >= 0"]),
    ({"add.logit_weight": -0.5}, ["add.logit_weight=-0.5: expected a number >= 0"]),
]

# Edge values that are allowed.
ALLOWED = [
    ({"data.fold": 4, "data.val_fraction": 0.0, "data.image_size": 32, "data.synthetic.image_size": 32}, {}),
    ({"data.group_size": 8}, {"devices": 8, "processes": 2}),
    ({"data.paired_batch_size": 6}, {"devices": 4}),  # The paired stream is off: its batch size is not used.
    ({"data.paired_batch_size": 6, "stage": "kd", "paired_method.unpaired": True}, {"devices": 4}),  # Nor here.
    ({"data.synthetic.enabled": False, "data.manifest": "TMP/file.csv"}, {}),
    ({"data.synthetic.enabled": False, "data.root": "TMP"}, {}),
    ({"data.synthetic.enabled": False, "data.synthetic.out": "", "data.synthetic.image_size": 16,
      "data.tfds_dir": "TMP"}, {}),
    ({"train.num_steps": 10, "train.epochs": 0.0}, {}),
    ({"data.synthetic.eval_lesions_per_class": 3, "data.splits": "manifest", "data.synthetic.shortcut_agreement": 1.0,
      "data.synthetic.wli_lesions_per_class": 1, "data.synthetic.nbi_lesions_per_class": -1}, {}),
    ({"data.synthetic.task": "generic", "data.classes": ("stripes", "rings")}, {}),
    ({"optim.weight_decay": 0.0, "optim.b1": 0.0, "distill.lambda_pro": 0.0, "distill.lambda_den": 0.0}, {}),
    ({"distill.thresholds": (1.0, 0.0), "distill.lambda_pro": None, "distill.par_iters": 0}, {}),
    ({"distill.embed_dim": 100, "distill.prototypes": "avg_pool"}, {}),  # No LR-QFormer: its heads do not matter.
    ({"distill.embed_dim": 100, "distill.use_pro": False}, {}),
    ({"distill.embed_dim": 2, "distill.qformer_heads": 2, "distill.proj_dim": 1}, {}),
    ({"distill.embed_dim": 2, "distill.qformer_heads": 2, "distill.variant": "release"}, {}),  # No projection.
    ({"distill.embed_dim": 48, "distill.qformer_heads": 6}, {}),
    ({"teacher.workdir": "TMP", "model.init_from": "TMP/file.csv"}, {}),
    ({"model.init_from": "TMP"}, {}),
    ({"data.manifest": "TMP/missing.csv", "data.synthetic.enabled": False}, {"check_paths": False}),
    ({"data.group_size": 6}, {"devices": None}),  # Device count unknown (eval, validate): not checked.
    ({"stage": "crckd", "crckd.ccd_weight_late": 0.01, "crckd.bank_init_scale": 0.5, "crckd.ema_decay": 1.0,
      "crckd.consistency_rampup_epochs": 0.0, "crckd.mean_teacher_start_epoch": 0}, {}),  # 0.01: the release.
]


@pytest.fixture
def tmp_dir(tmp_path) -> str:
  (tmp_path / "file.csv").write_text("path,modality,label,lesion_id\n")
  return str(tmp_path)


def _resolve(value, tmp_dir: str):
  return value.replace("TMP", tmp_dir) if isinstance(value, str) else value


def _smoke_dict(overrides: dict, tmp_dir: str) -> dict:
  """configs/synthetic.py:smoke as a plain dict (which takes values of any type) with `overrides` applied."""
  config = load_preset("synthetic", "smoke").to_dict()
  for path, value in overrides.items():
    *parents, key = path.split(".")
    node = config
    for p in parents:
      node = node[p]
    assert key in node, path
    node[key] = _resolve(value, tmp_dir)
  return config


def _problems(overrides, tmp_dir, **kwargs):
  kwargs = {"devices": 1, "processes": 1, **kwargs}
  return config_check.find_problems(_smoke_dict(overrides, tmp_dir), **kwargs)


def _matches(problem: str, expected: str) -> bool:
  return problem.startswith(expected[:-3]) if expected.endswith("...") else problem == expected


@pytest.mark.parametrize("case", BROKEN, ids=lambda c: ",".join(f"{k}={v!r}" for k, v in c[0].items()))
def test_each_broken_value_is_named_with_its_value_and_what_is_allowed(case, tmp_dir):
  overrides, expected, *kwargs = case
  problems = _problems(overrides, tmp_dir, **(kwargs[0] if kwargs else {}))
  expected = [_resolve(e, tmp_dir) for e in expected]
  assert len(problems) == len(expected) and all(map(_matches, problems, expected)), problems


@pytest.mark.parametrize("case", ALLOWED, ids=lambda c: ",".join(f"{k}={v!r}" for k, v in c[0].items()))
def test_edge_values_that_are_allowed_pass(case, tmp_dir):
  overrides, kwargs = case
  assert _problems(overrides, tmp_dir, **kwargs) == []


def test_every_rule_has_a_broken_case_in_the_table(tmp_dir):
  """A rule added to config_check.RULES needs its line in BROKEN above."""
  untested = []
  for rule in config_check.RULES:
    if not any(_problems(overrides, tmp_dir, rules=[rule], **(kwargs[0] if kwargs else {}))
               for overrides, _, *kwargs in BROKEN):
      untested.append(rule.path)
  assert not untested, f"rules without a broken case in BROKEN: {untested}"


def test_config_crckd_holds_every_field_of_the_cores_defaults_each_with_a_rule():
  """config.crckd is derived from crckd.DEFAULTS (one source of the spec's values), and each value is checked."""
  import dataclasses
  from pagkd_jax.distill import crckd
  section = base_config.get_config().crckd
  fields = [f.name for f in dataclasses.fields(crckd.DEFAULTS)]
  assert sorted(section.keys()) == sorted(fields)
  for name in fields:
    assert section[name] == getattr(crckd.DEFAULTS, name), name
  assert section.ccd_weight_late == crckd.DEFAULTS.ccd_weight != crckd.RELEASE_CCD_WEIGHT_LATE  # Not the release's.
  checked = {p for rule in config_check.RULES for p in rule.paths}
  assert {f"crckd.{name}" for name in fields} <= checked


def test_every_rule_reads_values_of_the_base_config():
  """A misspelt path would make its rule skip silently (absent values are skipped for older configs)."""
  flat = set(_flatten(base_config.get_config().to_dict()))
  for rule in config_check.RULES:
    for path in rule.paths + rule.uses:
      assert path in flat or path in ("devices", "processes"), path


def _flatten(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flatten(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}"


def test_all_problems_are_reported_at_once(tmp_dir):
  config = load_preset("synthetic", "smoke")
  config.distill.variant = "papr"
  config.data.group_size = 0
  config.data.manifest = os.path.join(tmp_dir, "file.csv")
  with pytest.raises(config_check.ConfigError) as raised:
    config_check.check_config(config, devices=1, processes=1)
  problems = raised.value.problems
  assert len(problems) == 3
  assert problems[0].startswith(f"data.synthetic.enabled=True, data.manifest='{tmp_dir}/file.csv', data.root=''")
  assert problems[1:] == ["data.group_size=0: expected an integer >= 1",
                          "distill.variant='papr': expected one of 'paper', 'release'"]
  assert str(raised.value) == "Invalid configuration (3 problems):\n" + "\n".join(f"  {p}" for p in problems)
  config_check.check_config(load_preset("synthetic", "smoke"), devices=1, processes=1)  # The preset: no error.


def test_a_workdirs_config_json_is_checked_and_values_it_lacks_are_skipped(tmp_dir):
  """eval.py checks WORKDIR/config.json: lists instead of tuples, null placeholders; older runs lack newer keys."""
  config = load_preset("synthetic", "smoke")
  config.teacher.workdir = os.path.join(tmp_dir, "gone")  # Not needed to evaluate: not checked without paths.
  loaded = json.loads(config.to_json_best_effort())
  assert loaded["distill"]["lambda_pro"] == 0.1 and loaded["distill"]["qformer_heads"] is None
  assert config_check.find_problems(ml_collections.ConfigDict(loaded), check_paths=False) == []
  older = copy.deepcopy(loaded)
  del older["train"]["on_nonfinite"]
  older["distill"]["thresholds"] = [0.3, 0.7]
  assert config_check.find_problems(ml_collections.ConfigDict(older), check_paths=False) == [
      "distill.thresholds=[0.3, 0.7]: expected two numbers in [0, 1], the lesion threshold (first) above the "
      "background threshold (second)"]


def _preset_modules():
  for path in sorted((REPO_ROOT / "configs").glob("*.py")):
    spec = importlib.util.spec_from_file_location(f"configs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield path.name, module


def test_every_preset_with_each_of_its_arguments_passes_the_check(tmp_dir):
  checked = []
  for name, module in _preset_modules():
    assert hasattr(module, "ARGS"), f"configs/{name} should list its accepted arguments in ARGS"
    for arg in (None, *module.ARGS):
      config = module.get_config(arg)
      data = config.data
      if not (data.synthetic.enabled or data.manifest or data.root or data.tfds_dir):  # The user names the data.
        data.manifest = os.path.join(tmp_dir, "file.csv")
      # Paths a preset names (e.g. weights of an earlier run) live on the user's machine: not looked at here.
      assert config_check.find_problems(config, devices=1, processes=1, check_paths=False) == [], (name, arg)
      checked.append(f"{name}:{arg}" if arg else name)
  assert {"synthetic.py", "synthetic.py:smoke", "piccolo.py", "piccolo.py:release", "polypset.py",
          "polypset.py:release"} <= set(checked)


# ---- the command-line tools --------------------------------------------------------------------------------------
def _run(args, timeout=300):
  return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("override, expected", [
    ("--config.distill.variant=papr", ["distill.variant='papr': expected one of 'paper', 'release'"]),
    ("--config.data.group_size=0", ["data.group_size=0: expected an integer >= 1"]),
    ("--config.data.manifest=/data/mine.csv", [
        "data.synthetic.enabled=True, data.manifest='/data/mine.csv', data.root='', data.tfds_dir='': expected "
        "exactly one data source", "data.manifest='/data/mine.csv': expected '' or an existing file"]),
    # A comma-separated list is a tuple of names (here a repeated one, to stop the run): not one name "a,a".
    ("--config.data.classes=adenoma, adenoma", [
        "data.classes=('adenoma', 'adenoma'): expected at least 2 distinct, non-empty class names"]),
], ids=["variant", "group_size", "two_sources", "classes_comma_separated"])
def test_train_py_stops_before_the_teacher_with_status_2_and_writes_nothing(override, expected, tmp_path):
  workdir = tmp_path / "W"
  result = _run(["train.py", "--config=configs/synthetic.py:smoke", override, f"--workdir={workdir}"])
  assert result.returncode == 2, result.stderr[-3000:]
  assert f"Invalid configuration ({len(expected)} problem" in result.stderr
  for line in expected:
    assert f"\n  {line}" in result.stderr
  assert "Stage 1" not in result.stderr
  assert not workdir.exists()


def test_eval_py_checks_each_workdirs_config_first(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  config = load_preset("synthetic", "smoke")
  config.model.name = "resnet51"
  (workdir / "config.json").write_text(config.to_json_best_effort())
  result = _run(["eval.py", f"--workdir={workdir}"])
  assert result.returncode == 2, result.stderr[-3000:]
  assert f"  {workdir}/config.json: model.name='resnet51': expected one of 'resnet18'," in result.stderr
  assert sorted(os.listdir(workdir)) == ["config.json"]


def test_validate_checks_the_config_before_reading_any_data(tmp_path):
  out = tmp_path / "synthetic"
  result = _run(["-m", "pagkd_jax.data.validate", "configs/synthetic.py", f"--config.data.synthetic.out={out}",
                 "--config.data.image_size=16"])
  assert result.returncode == 2, result.stdout + result.stderr[-3000:]
  assert "  data.image_size=16: expected an integer >= 32" in result.stderr
  assert not out.exists()


def test_class_names_from_the_command_line():
  assert base_config.split_class_names("a,b,c") == ("a", "b", "c")
  assert base_config.split_class_names(("a,b, c",)) == ("a", "b", "c")  # ml_collections' --config.data.classes=a,b,c
  assert base_config.split_class_names(("a", "b")) == ("a", "b")
  assert base_config.split_class_names(["x", "y,"]) == ("x", "y")
  assert base_config.split_class_names(("a", 3)) == ("a", 3)  # Left for the check to report.
  config = base_config.get_config()
  config.data.classes = ("hyperplasia,adenoma",)
  assert base_config.from_command_line(config).data.classes == ("hyperplasia", "adenoma")
