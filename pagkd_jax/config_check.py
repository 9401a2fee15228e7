"""The check of a resolved config that train.py, eval.py and `python -m pagkd_jax.data.validate CONFIG` run before
anything else: every problem at once, each named by its config path, the value given and what is allowed.

  problems = config_check.find_problems(config, devices=jax.device_count(), processes=jax.process_count())
  config_check.check_config(config)  # Raises ConfigError listing every problem.

A mistake then reads (train.py exits with status 2 and writes nothing), in the order of RULES:

  Invalid configuration (2 problems):
    data.group_size=0: expected an integer >= 1
    distill.variant='papr': expected one of 'paper', 'release'

The rules are the table RULES; adding one is one line, mostly with a builder:

  choice("optim.schedule", optimizer.SCHEDULES),  # An enumerated value: import the tuple the code itself uses.
  flag("distill.use_pro"),  # True or False.
  number("data.synthetic.paired_fraction", minimum=0, maximum=1),  # Also above=, below=, integer=True, none="...".
  existing("teacher.workdir", "folder", "the workdir of a trained NBI teacher"),  # '' or an existing path.
  Rule("distill.thresholds", _thresholds_ok, "two numbers in [0, 1], ..."),  # Anything else: predicate and text.

A `Rule` names one path, or a tuple of paths (all shown in the message) when the values are only wrong together,
and `uses`: further values the predicate reads without showing them; `devices` and `processes` stand for the run's
device and process counts. The predicate gets the values in that order. A rule is skipped when a value it reads is
absent (a config written by an older version, a count the caller does not know), and a rule on several values
returns True when one of them has the wrong type or range (its own rule reports that). `on_disk` rules look at files
and are skipped by `check_paths=False` (evaluation of a finished run). tests/test_config_check.py has a table with a
broken value and its expected message for every rule (a test fails for a rule without one): add a line there too.

Deeper checks stay where library users call functions directly (e.g. `pagkd.check_config`, `mesh.check_divisible`);
the allowed values are the tuples defined beside that code, imported here.
"""

import dataclasses
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pagkd_jax import methods
from pagkd_jax.data import normalization
from pagkd_jax.data import splits
from pagkd_jax.data import synthetic
from pagkd_jax.distill import pagkd
from pagkd_jax.distill import par
from pagkd_jax.distill import qformer
from pagkd_jax.models import conv
from pagkd_jax.models import resnet
from pagkd_jax.training import nonfinite
from pagkd_jax.training import optimizer

USAGE_ERROR = 2  # Exit status of the command-line tools for an invalid config.


class ConfigError(ValueError):
  """The config has `problems` (lines `path=value: expected ...`), all listed in the message."""

  def __init__(self, problems: Sequence[str], source: str = "configuration"):
    self.problems = list(problems)
    super().__init__(f"Invalid {source} ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):\n"
                     + "\n".join(f"  {p}" for p in self.problems))


@dataclasses.dataclass(frozen=True)
class Rule:
  """`ok(*values of path, *values of uses)` says whether the values are allowed; `allowed` says what is."""

  path: str | tuple[str, ...]  # The value(s) checked and shown in the message.
  ok: Callable[..., bool]
  allowed: str
  uses: tuple[str, ...] = ()  # Further values `ok` reads, not shown.
  on_disk: bool = False  # Looks at files (skipped with check_paths=False).

  @property
  def paths(self) -> tuple[str, ...]:
    return (self.path,) if isinstance(self.path, str) else tuple(self.path)


# ---- predicates and rule builders ----------------------------------------------------------------------------
def is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_sequence(v) -> bool:
  return isinstance(v, (tuple, list))


def choice(path: str, values: Sequence[Any]) -> Rule:
  """One of `values` (of the same type: 1 is not True)."""
  values = tuple(values)
  return Rule(path, lambda v: any(type(v) is type(x) and v == x for x in values),
              "one of " + ", ".join(repr(x) for x in values))


def flag(path: str) -> Rule:
  return Rule(path, lambda v: isinstance(v, bool), "True or False")


def _bound_text(minimum, maximum, above, below) -> str:
  lo = f"[{minimum}" if minimum is not None else f"({above}" if above is not None else None
  hi = f"{maximum}]" if maximum is not None else f"{below})" if below is not None else None
  if lo and hi:
    return f" in {lo}, {hi}"
  if lo:
    return f" >= {minimum}" if minimum is not None else f" > {above}"
  if hi:
    return f" <= {maximum}" if maximum is not None else f" < {below}"
  return ""


def in_range(v, *, integer: bool = False, minimum=None, maximum=None, above=None, below=None) -> bool:
  return ((is_int(v) if integer else is_number(v)) and (minimum is None or v >= minimum)
          and (maximum is None or v <= maximum) and (above is None or v > above) and (below is None or v < below))


def number(path: str, *, integer: bool = False, minimum=None, maximum=None, above=None, below=None,
           none: str | None = None) -> Rule:
  """A finite number (an int with `integer`) within the bounds given; `none`: None is allowed too and means that."""
  bounds = dict(minimum=minimum, maximum=maximum, above=above, below=below)
  text = ("an integer" if integer else "a number") + _bound_text(**bounds)
  if none is not None:
    text = f"None ({none}) or {text}"
  return Rule(path, lambda v: (none is not None and v is None) or in_range(v, integer=integer, **bounds), text)


_KINDS = {"file": os.path.isfile, "folder": os.path.isdir, "file or folder": os.path.exists}


def existing(path: str, kind: str, what: str) -> Rule:
  """'' (not given) or an existing `kind` ("file", "folder" or "file or folder"); `what` it should be."""
  test = _KINDS[kind]
  return Rule(path, lambda v: v == "" or (isinstance(v, str) and test(os.path.expanduser(v))),
              f"'' or an existing {kind} ({what})", on_disk=True)


def _data_sources_ok(synthetic, manifest, root, tfds_dir) -> bool:
  return sum(bool(v) for v in (synthetic, manifest, root, tfds_dir)) == 1


def _classes_ok(classes) -> bool:
  return (is_sequence(classes) and all(isinstance(c, str) and c.strip() for c in classes) and len(classes) >= 2
          and len(set(classes)) == len(classes))


def _thresholds_ok(t) -> bool:
  return is_sequence(t) and len(t) == 2 and all(in_range(x, minimum=0, maximum=1) for x in t) and t[0] > t[1]


def _crop_scale_ok(s) -> bool:
  return is_sequence(s) and len(s) == 2 and all(in_range(x, above=0, maximum=1) for x in s) and s[0] <= s[1]


def _group_size_fits(k, devices, processes) -> bool:
  return not in_range(k, integer=True, minimum=1) or (k % devices == 0 and k % processes == 0)


def _paired_batch_fits(b, devices, processes, paired, stage, unpaired) -> bool:
  pairs = stage in methods.METHODS and methods.get(stage).pairs and unpaired is not True  # On pairs (spec 9).
  return not (paired is True or pairs) or _group_size_fits(b, devices, processes)


def _heads_divide_embed_dim(heads, embed_dim, variant, use_pro, prototypes) -> bool:
  heads = qformer.DEFAULT_HEADS.get(variant) if heads is None else heads
  if not (use_pro is True and prototypes == "qformer"):
    return True
  if not (in_range(heads, integer=True, minimum=1) and in_range(embed_dim, integer=True, minimum=1)):
    return True  # Reported by the rules of those values.
  return embed_dim % heads == 0


def _default_proj_dim_ok(embed_dim, proj_dim, use_den, variant) -> bool:
  return (proj_dim is not None or use_den is not True or variant != "paper"
          or not in_range(embed_dim, integer=True, minimum=1) or embed_dim // 4 >= 1)


def _per_step_shift_ok(per_step, classes, shift) -> bool:
  return per_step is not True or (is_sequence(classes) and len(classes) >= 3 and shift == 0)


def _paired_loss_fits_variant(paired_loss, variant, paired, use_den) -> bool:
  return not (paired is True and use_den is True and variant == "release" and paired_loss == "paper")


def _synthetic_size_ok(synthetic_size, image_size, enabled) -> bool:
  return enabled is not True or not (is_int(synthetic_size) and is_int(image_size)) or synthetic_size >= image_size


def _modality_count_ok(v) -> bool:
  return v == -1 or in_range(v, integer=True, minimum=1)


def _fixed_split_ok(eval_lesions, split_mode, enabled) -> bool:
  return enabled is not True or not is_int(eval_lesions) or (eval_lesions > 0) == (split_mode == "manifest")


def _shortcut_needs_fixed_split(agreement, eval_lesions) -> bool:
  return not (is_number(agreement) and is_int(eval_lesions)) or agreement == 0 or eval_lesions > 0


def _generic_task_ok(task, classes, *lesion_options) -> bool:
  defaults = tuple(synthetic.REGIME_DEFAULTS[k] for k in _LESION_OPTIONS)
  return task != "generic" or (is_sequence(classes) and len(classes) <= len(synthetic.GENERIC_CLASSES)
                               and lesion_options == defaults)


_LESION_OPTIONS = ("wli_lesions_per_class", "nbi_lesions_per_class", "eval_lesions_per_class", "shortcut_agreement",
                   "subtypes_per_class")


# ---- the rules -------------------------------------------------------------------------------------------------
SOURCES = ("data.synthetic.enabled", "data.manifest", "data.root", "data.tfds_dir")

RULES: list[Rule] = [
    choice("stage", methods.STAGES),
    number("seed", integer=True, minimum=0),
    # data
    Rule(SOURCES, _data_sources_ok, "exactly one data source: data.synthetic.enabled=True (generated images), "
         "data.manifest (a CSV), data.root (a folder <modality>/<class>/) or data.tfds_dir (a prepared TFDS folder); "
         "configs/synthetic.py enables synthetic data: add data.synthetic.enabled=False to use another source"),
    existing("data.manifest", "file", "a manifest CSV"),
    existing("data.root", "folder", "ROOT/<modality>/<class>/ images"),
    existing("data.tfds_dir", "folder", "written by data/build_tfds.py"),
    Rule("data.classes", _classes_ok, "at least 2 distinct, non-empty class names"),
    number("data.num_folds", integer=True, minimum=2),
    Rule(("data.fold", "data.num_folds"), lambda f, n: is_int(f) and (not is_int(n) or 0 <= f < n),
         "an integer with 0 <= data.fold < data.num_folds"),
    number("data.val_fraction", minimum=0, below=1),
    number("data.split_seed", integer=True, minimum=0),
    flag("data.skip_bad_files"),
    flag("data.shuffle_train_labels"),
    number("data.image_size", integer=True, minimum=32),
    number("data.min_image_size", integer=True, minimum=0),
    number("data.group_size", integer=True, minimum=1),
    Rule(("data.group_size", "devices", "processes"), _group_size_fits,
         "a multiple of the number of devices and of the number of processes (each gets an equal share)"),
    number("data.paired_batch_size", integer=True, minimum=1),
    Rule(("data.paired_batch_size", "devices", "processes"), _paired_batch_fits,
         "a multiple of the number of devices and of the number of processes when the paired stream runs "
         "(distill.paired=True or a stage trained on pairs; each gets an equal share of the pairs)",
         uses=("distill.paired", "stage", "paired_method.unpaired")),
    number("data.eval_batch_size", integer=True, minimum=1),
    number("data.num_workers", integer=True, minimum=0),
    number("data.worker_buffer_size", integer=True, minimum=1),
    choice("data.normalization", normalization.NORMALIZATIONS),
    flag("data.augment.rotate"),
    flag("data.augment.hflip"),
    flag("data.augment.vflip"),
    flag("data.augment.random_resized_crop"),
    Rule("data.augment.crop_scale", _crop_scale_ok, "two numbers (low, high) with 0 < low <= high <= 1"),
    number("data.augment.color_jitter", minimum=0),
    flag("data.synthetic.enabled"),
    Rule("data.synthetic.out", lambda out, on: on is not True or bool(out),
         "the folder of the generated images when data.synthetic.enabled", uses=("data.synthetic.enabled",)),
    number("data.synthetic.image_size", integer=True, minimum=8),
    Rule(("data.synthetic.image_size", "data.image_size"), _synthetic_size_ok,
         "data.synthetic.image_size >= data.image_size when data.synthetic.enabled (no upsampled images)",
         uses=("data.synthetic.enabled",)),
    number("data.synthetic.lesions_per_class", integer=True, minimum=1),
    number("data.synthetic.images_per_lesion", integer=True, minimum=1),
    number("data.synthetic.paired_fraction", minimum=0, maximum=1),
    number("data.synthetic.seed", integer=True, minimum=0),
    number("data.synthetic.wli_contrast", minimum=0),
    choice("data.splits", splits.SPLIT_MODES),
    choice("data.synthetic.task", synthetic.TASKS),
    Rule("data.synthetic.wli_lesions_per_class", _modality_count_ok,
         "-1 (data.synthetic.lesions_per_class) or an integer >= 1"),
    Rule("data.synthetic.nbi_lesions_per_class", _modality_count_ok,
         "-1 (data.synthetic.lesions_per_class) or an integer >= 1"),
    number("data.synthetic.eval_lesions_per_class", integer=True, minimum=0),
    number("data.synthetic.shortcut_agreement", minimum=0, maximum=1),
    number("data.synthetic.subtypes_per_class", integer=True, minimum=1),
    Rule(("data.synthetic.eval_lesions_per_class", "data.splits"), _fixed_split_ok,
         "data.splits='manifest' exactly when data.synthetic.eval_lesions_per_class > 0 (the generator then fixes "
         "the split)", uses=("data.synthetic.enabled",)),
    Rule(("data.synthetic.shortcut_agreement", "data.synthetic.eval_lesions_per_class"), _shortcut_needs_fixed_split,
         "shortcut_agreement 0 unless eval_lesions_per_class > 0 (the shortcut is drawn in training images only, so "
         "the generator must fix the split)"),
    Rule(("data.synthetic.task", "data.classes"), _generic_task_ok,
         f"task 'generic' with at most {len(synthetic.GENERIC_CLASSES)} classes (synthetic.GENERIC_CLASSES) and the "
         "lesion task's options (" + ", ".join(_LESION_OPTIONS) + ") at their defaults",
         uses=tuple(f"data.synthetic.{k}" for k in _LESION_OPTIONS)),
    # model
    choice("model.name", tuple(resnet.PRESETS)),
    choice("model.dtype", tuple(resnet.DTYPES)),
    choice("model.conv_impl", conv.CONV_IMPLS),
    existing("model.init_from", "file or folder", "imported weights, or a .pth / .safetensors file"),
    # optimisation
    number("optim.learning_rate", above=0),
    number("optim.weight_decay", minimum=0),
    choice("optim.schedule", optimizer.SCHEDULES),
    number("optim.warmup_epochs", minimum=0),
    number("optim.b1", minimum=0, below=1),
    number("optim.b2", minimum=0, below=1),
    number("optim.grad_clip_norm", minimum=0),
    # training loop
    number("train.epochs"),
    number("train.num_steps", integer=True),
    Rule(("train.epochs", "train.num_steps"), lambda e, n: in_range(n, above=0) or in_range(e, above=0),
         "train.num_steps > 0, or train.epochs > 0 (used when train.num_steps <= 0)"),
    number("train.log_every_steps", integer=True, minimum=1),
    number("train.eval_every_steps", integer=True, minimum=1),
    number("train.checkpoint_every_steps", integer=True, minimum=1),
    number("train.keep_latest", integer=True, minimum=1),
    choice("train.on_nonfinite", nonfinite.MODES),
    flag("train.select_after_warmup"),
    flag("train.log_grad_norms"),
    # evaluation
    number("eval.bootstrap_samples", integer=True, minimum=0),
    number("eval.num_cam_images", integer=True, minimum=0),
    flag("eval.calibrate"),
    number("eval.calibration_bins", integer=True, minimum=1),
    # teacher
    existing("teacher.workdir", "folder", "the workdir of a trained NBI teacher"),
    # distillation
    choice("distill.variant", tuple(pagkd.VARIANT_DEFAULTS)),
    choice("distill.level", pagkd.LEVELS),
    number("distill.embed_dim", integer=True, minimum=1),
    number("distill.warmup_epochs", minimum=0),
    flag("distill.paired"),
    Rule("distill.paired_loss", lambda v: v is None or v in pagkd.PAIRED_LOSSES,
         "None (the variant's) or one of " + ", ".join(repr(x) for x in pagkd.PAIRED_LOSSES)),
    Rule(("distill.paired_loss", "distill.variant"), _paired_loss_fits_variant,
         "paired_loss 'release' or None with variant 'release' when the paired stream runs with GKD-Den (the "
         "'paper' paired loss attends through the paper SRCA's projections)", uses=("distill.paired", "distill.use_den")),
    flag("distill.use_pro"),
    number("distill.lambda_pro", minimum=0, none="the variant's default"),
    choice("distill.prototypes", qformer.EXTRACTOR_KINDS),
    number("distill.num_queries", integer=True, minimum=1),
    number("distill.qformer_layers", integer=True, minimum=1),
    number("distill.qformer_heads", integer=True, minimum=1, none="the variant's default"),
    Rule(("distill.qformer_heads", "distill.embed_dim"), _heads_divide_embed_dim,
         "heads that divide distill.embed_dim (None: " + ", ".join(
             f"{h} for the {v} variant" for v, h in qformer.DEFAULT_HEADS.items()) + ")",
         uses=("distill.variant", "distill.use_pro", "distill.prototypes")),
    number("distill.temperature", above=0),
    flag("distill.use_den"),
    number("distill.lambda_den", minimum=0),
    flag("distill.masked"),
    flag("distill.bidirectional"),
    number("distill.proj_dim", integer=True, minimum=1, none="distill.embed_dim // 4"),
    Rule("distill.embed_dim", _default_proj_dim_ok, "at least 4 when distill.proj_dim is None (embed_dim // 4)",
         uses=("distill.proj_dim", "distill.use_den", "distill.variant")),
    Rule("distill.thresholds", _thresholds_ok,
         "two numbers in [0, 1], the lesion threshold (first) above the background threshold (second)"),
    number("distill.par_iters", integer=True, minimum=0),
    Rule("distill.par_dilations", lambda d: is_sequence(d) and len(d) > 0 and all(in_range(x, integer=True, minimum=1)
                                                                                for x in d),
         "a non-empty tuple of integers >= 1"),
    number("distill.par_downscale", integer=True, minimum=1),
    number("distill.par_temperature", above=0),
    number("distill.par_pos_weight", minimum=0),
    choice("distill.par_resampling", par.RESAMPLING),
    number("distill.teacher_class_shift", integer=True),
    flag("distill.teacher_class_shift_per_step"),
    Rule("distill.teacher_class_shift_per_step", _per_step_shift_ok,
         "False unless data.classes has at least 3 classes (with 2 the only other class is fixed) and "
         "distill.teacher_class_shift is 0", uses=("data.classes", "distill.teacher_class_shift")),
    choice("distill.region_labels", pagkd.REGION_LABEL_SOURCES),
    Rule("distill.random_region_fractions", lambda f: is_sequence(f) and len(f) == 3
         and all(in_range(x, minimum=0) for x in f) and sum(f) > 0,
         "three numbers >= 0 with a positive sum (lesion, background, ambiguous)"),
    flag("paired_method.unpaired"),
    number("fitnets.weight", minimum=0),
    number("add.warmup_epochs", minimum=0),
    number("add.dense_weight", minimum=0),
    number("add.logit_weight", minimum=0),
    # CRCKD (one rule per field of crckd.DEFAULTS; test_config_check checks that none is missing)
    number("crckd.embed_dim", integer=True, minimum=1),
    number("crckd.contrast_dim", integer=True, minimum=1),
    number("crckd.ema_decay", minimum=0, maximum=1),
    number("crckd.consistency_weight", minimum=0),
    number("crckd.consistency_rampup_epochs", minimum=0),
    number("crckd.mean_teacher_start_epoch", minimum=0),
    number("crckd.num_positives", integer=True, minimum=1),
    number("crckd.num_negatives", integer=True, minimum=1),
    number("crckd.temperature", above=0),
    number("crckd.bank_momentum", minimum=0, maximum=1),
    number("crckd.nce_eps", minimum=0),
    number("crckd.ccd_weight", minimum=0),
    number("crckd.ccd_weight_late", minimum=0),
    number("crckd.crp_weight", minimum=0),
    number("crckd.crp_temperature", above=0),
    number("crckd.bank_init_scale", above=0, none="1 / sqrt(crckd.contrast_dim / 3)"),
    number("crckd.normalize_eps", above=0),
]


# ---- the check ---------------------------------------------------------------------------------------------------
_ABSENT = object()


def _lookup(config, path: str, runtime: dict[str, Any]):
  if path in runtime:
    return _ABSENT if runtime[path] is None else runtime[path]
  node = config
  for key in path.split("."):
    try:
      node = node[key]
    except (KeyError, TypeError, AttributeError):
      return _ABSENT
  return node


def find_problems(config, *, devices: int | None = None, processes: int | None = None, check_paths: bool = True,
                  rules: Sequence[Rule] = RULES) -> list[str]:
  """The problems of `config` (a ConfigDict, or the dict of a workdir's config.json), one line each.

  `devices` and `processes`: the run's counts (jax.device_count(), jax.process_count()); None skips the rules that
  read them. `check_paths=False` skips the rules that look at files.
  """
  runtime = {"devices": devices, "processes": processes}
  problems = []
  for rule in rules:
    if rule.on_disk and not check_paths:
      continue
    values = [_lookup(config, p, runtime) for p in rule.paths + rule.uses]
    if any(v is _ABSENT for v in values) or rule.ok(*values):
      continue
    given = ", ".join(f"{p}={v!r}" for p, v in zip(rule.paths, values))
    problems.append(f"{given}: expected {rule.allowed}")
  return problems


def check_config(config, *, source: str = "configuration", **kwargs) -> None:
  """Raises ConfigError listing every problem of `config` (arguments as `find_problems`)."""
  if problems := find_problems(config, **kwargs):
    raise ConfigError(problems, source)


def exit_on_problems(problems: Sequence[str], source: str = "configuration") -> None:
  """The command-line tools' end for an invalid config: the problems on stderr, exit status 2 (usage error)."""
  if problems:
    print(ConfigError(problems, source), file=sys.stderr)
    sys.exit(USAGE_ERROR)
