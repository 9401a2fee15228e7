"""The default configuration every preset in `configs/` starts from.

Values that follow from others (number of classes, steps per epoch, the normalisation constants) are
not stored: they are computed where they are used, so an override of the value they depend on can
never leave them stale.
"""

import copy
import dataclasses
import json

import ml_collections
from ml_collections import config_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # "teacher": cross-entropy on NBI; "baseline": cross-entropy on WLI; "pagkd": distillation; "crckd": CRCKD, the
  # WLI-only distillation from a mean teacher to compare against (config.crckd).
  config.stage = "pagkd"

  # ---- data ----------------------------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  data.manifest = ""  # CSV with path, modality, label, lesion_id[, patient_id, pair_id].
  data.root = ""  # Or a folder ROOT/<modality>/<class>/*.{jpg,png,...}.
  data.tfds_dir = ""  # Or a prepared TFDS/ArrayRecord folder (data/build_tfds.py); set exactly one of the three.
  data.classes = ("hyperplasia", "adenoma", "adenocarcinoma")  # Order = label index.
  data.num_folds = 5
  data.fold = 0  # Test fold.
  data.val_fraction = 0.2  # Of the training patients/lesions, carved out for validation.
  data.split_seed = 0
  # "folds": the K-fold split above; "manifest": the manifest's split column (train/val/test on every row), e.g. a
  # synthetic data set that fixes its split (synthetic.eval_lesions_per_class > 0).
  data.splits = "folds"
  # Training checks every image first (python -m pagkd_jax.data.validate runs the same check) and refuses to start
  # on any error. True: missing, unreadable or undecodable files (and files below data.min_image_size) are left out
  # instead (the other images keep their split) and listed in WORKDIR/skipped_files.csv; manifest and data-set
  # errors still stop training.
  data.skip_bad_files = False
  # Negative control: permute the labels of the training images (within each modality, a fixed permutation per
  # config.seed); validation and test labels are untouched, so a model trained on them scores near chance.
  data.shuffle_train_labels = False
  data.image_size = 448
  # A floor on the images' shorter side: smaller ones are errors of the data check (bad files). 0: no floor; images
  # smaller than data.image_size are upsampled like every other image is resized, with a warning that counts them.
  data.min_image_size = 0
  data.group_size = 8  # N_c: images of every class, per modality, in every training batch.
  # B of the paired stream (spec 8, the release's 24): pairs per paired batch; an epoch's last pairs that fill no
  # batch are left out of that epoch (pagkd_jax/data/pair_batches.py). Used only when the paired stream runs.
  data.paired_batch_size = 24
  data.eval_batch_size = 32  # Fixed; the last batch is padded and masked.
  data.num_workers = 0  # grain worker processes (0: decode in the main process).
  data.worker_buffer_size = 2
  data.normalization = "imagenet"  # "imagenet" (mean/std) or "unit" ([0, 1], as the release).
  data.augment = aug = ml_collections.ConfigDict()
  aug.rotate = True  # Integer angle uniform in [-180, 180].
  aug.hflip = True
  aug.vflip = True
  aug.random_resized_crop = False
  aug.crop_scale = (0.5, 1.0)
  aug.color_jitter = 0.0  # Strength of brightness/contrast/saturation jitter; 0 disables it.
  # Synthetic data (configs/synthetic.py); ignored unless data.synthetic.enabled.
  data.synthetic = syn = ml_collections.ConfigDict()
  syn.enabled = False
  syn.out = ""
  syn.image_size = 128
  syn.lesions_per_class = 40
  syn.images_per_lesion = 3
  syn.paired_fraction = 0.0
  syn.seed = 0
  syn.wli_contrast = 0.5  # Visibility of the class pattern in WLI (synthetic.WLI_CONTRAST).
  # The regime (docs/RESULTS.md, "Transfer regime"; configs/transfer.py). Defaults: today's data set.
  syn.task = "lesion"  # "lesion" or "generic" (synthetic.GENERIC_CLASSES on both palettes, listed as WLI).
  syn.wli_lesions_per_class = -1  # WLI lesions per class (training lesions with a fixed split); -1: lesions_per_class.
  syn.nbi_lesions_per_class = -1  # NBI lesions per class, unpaired with the WLI ones; -1: lesions_per_class.
  syn.eval_lesions_per_class = 0  # > 0: fixed split, this many val and test lesions per class and modality.
  syn.shortcut_agreement = 0.0  # WLI training colour cast agreeing with the class this often; 0: no cast.
  syn.subtypes_per_class = 1  # Pattern variants of each class, mixed within every class.

  # ---- model -----------------------------------------------------------------------------------
  config.model = model = ml_collections.ConfigDict()
  model.name = "resnet50"  # "resnet50", "resnet18" or "tiny".
  model.dtype = "float32"  # Compute dtype; "bfloat16" keeps params and BN statistics in float32.
  # Convolutions: "xla" (lax.conv_general_dilated), "dot_wgrad" / "dot_wgrad_1x1" (kernel gradients of all / of 1x1
  # kernels as matrix products, faster on CPU; same values and parameters) or "auto" (dot_wgrad_1x1 on CPU, else xla).
  model.conv_impl = "auto"
  # Pretrained backbone: a folder written by `python -m pagkd_jax.tools.import_weights`, a torchvision .pth /
  # timm .safetensors ResNet file (converted on the fly), or a trained run's workdir (its best checkpoint: pretrain on
  # one endoscopy data set, fine-tune on another). The head is always new. "" starts from random weights.
  model.init_from = ""

  # ---- optimisation ---------------------------------------------------------------------------
  config.optim = optim = ml_collections.ConfigDict()
  optim.learning_rate = 1e-4
  optim.weight_decay = 1e-8  # L2 penalty added to the gradient (the release's Adam).
  optim.schedule = "constant"  # "constant" or "warmup_cosine".
  optim.warmup_epochs = 0.0
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.grad_clip_norm = 0.0  # 0 disables clipping.

  # ---- training loop ---------------------------------------------------------------------------
  config.train = train = ml_collections.ConfigDict()
  train.epochs = 199.0  # One epoch = ceil(training images of the stage's modality / (C * N_c)).
  train.num_steps = -1  # > 0 overrides epochs.
  train.log_every_steps = 10
  train.eval_every_steps = 200  # Validation (and best-checkpoint selection) cadence.
  # Stage "pagkd": only validations after the distillation warm-up may choose the best checkpoint (earlier ones are
  # still run and logged; the last step always may), so the run ships a distilled model; the control with both
  # losses off chooses among the same steps.
  train.select_after_warmup = True
  train.checkpoint_every_steps = 200
  train.keep_latest = 1
  # Stage 2: log the norms of the gradients that CE, L_pro and L_den send into the student's layer4 map
  # (train/diag/grad_*_layer4); two extra backward passes through the distillation heads per step (tiny model on
  # CPU: +9 % step time, +60 % compile time), so off unless a study needs it (configs/transfer.py turns it on).
  # Logging only: the update is the same either way.
  train.log_grad_norms = False
  train.on_nonfinite = "stop"  # A NaN/inf loss term: "stop" (error naming step and term) or "skip" the update.

  # ---- evaluation --------------------------------------------------------------------------------
  config.eval = ev = ml_collections.ConfigDict()
  ev.bootstrap_samples = 1000
  ev.num_cam_images = 12
  # Fit one temperature on the validation split (never test) and store it in WORKDIR/calibration.json: eval.py,
  # predict.py and the exported model then give softmax(logits / temperature).
  ev.calibrate = False
  ev.calibration_bins = 15  # Equal-width confidence bins of the expected calibration error and reliability diagram.

  # ---- teacher (stage 2) -------------------------------------------------------------------------
  config.teacher = teacher = ml_collections.ConfigDict()
  teacher.workdir = ""  # Trained NBI teacher; "" trains one in WORKDIR/teacher first.

  # ---- distillation (stage "pagkd"; spec sections 4-6) -------------------------------------------
  config.distill = d = ml_collections.ConfigDict()
  d.variant = "paper"  # "paper" or "release" (the public code's losses and LR-QFormer; spec 4-5).
  d.level = "group"  # "group" (PaGKD) or "image" (ablation: each WLI image with one same-class NBI image).
  d.embed_dim = 128  # d of the bias-free 1x1 group-feature embeddings (student, and teacher side).
  d.warmup_epochs = 5.0  # Cross-entropy only before this.
  # "PaGKD (all)" (spec 8): also train on the pairs of the training split (data.paired_batch_size pairs a step, then
  # a class-group step of the unpaired WLI images and all NBI images): CE on the paired WLI images plus, after the
  # warm-up, lambda_den times a dense loss in both directions (paired_loss). Needs pairs (manifest pair_id,
  # data.synthetic.paired_fraction > 0).
  d.paired = False
  # The paired stream's dense loss; None: the variant's. "paper": the SRCA of GKD-Den (spec 5.5) with each pair a group
  # of one image per modality, the MSE over the valid queries, sharing the group loss's projections. "release": the
  # release's per-image relation weights {1, 0, 0.5} with 1 - cos (runs saved before this option trained with it).
  d.paired_loss = config_dict.placeholder(str)
  # GKD-Pro (spec 4).
  d.use_pro = True
  d.lambda_pro = config_dict.placeholder(float)  # None: 1 (paper) or 0.001 (release).
  d.prototypes = "qformer"  # "qformer" or "avg_pool" (ablation: LR-QFormer replaced by average pooling).
  d.num_queries = 12  # N_q.
  d.qformer_layers = 2  # T (paper variant).
  d.qformer_heads = config_dict.placeholder(int)  # None: 8 (paper) or 16 (release).
  d.temperature = 0.1  # tau of the paper's InfoNCE.
  # GKD-Den (spec 5).
  d.use_den = True
  d.lambda_den = 1.0
  d.masked = True  # False: ablation "SRCA replaced by unmasked cross-attention".
  d.bidirectional = True  # False: ablation "unidirectional NBI -> WLI".
  d.proj_dim = config_dict.placeholder(int)  # None: embed_dim // 4.
  d.thresholds = (0.7, 0.3)  # Dual threshold: lesion above the first, background below the second.
  d.par_iters = 10
  d.par_dilations = (1, 2, 4, 8)
  d.par_downscale = 2
  d.par_temperature = 0.3
  d.par_pos_weight = 0.0  # 0 as the release; ToCo/AFA's PAR uses 0.01.
  # How PAR resizes (par.py): "release" as ToCo and the release (bilinear; the CAM scores with corners aligned);
  # "area" (area averaging down) reproduces runs made before this option existed.
  d.par_resampling = "release"
  # Negative controls (distillation that must not help). Teacher groups given the wrong class: the WLI group of
  # class c is distilled from the NBI group of class (c + shift) mod C (GKD-Pro and GKD-Den); 0 = the method.
  d.teacher_class_shift = 0
  # True: the shift is drawn afresh at every step, uniformly from 1..C-1, so each WLI group meets the NBI group of
  # another class and no class correspondence holds from one step to the next (a fixed shift keeps one: a relabelling
  # the group losses can still learn). Needs C >= 3 and teacher_class_shift 0.
  d.teacher_class_shift_per_step = False
  d.region_labels = "cam_par"  # "cam_par" (spec 5.1-5.3) or "random" (negative control: i.i.d. labels per position).
  d.random_region_fractions = (1 / 3, 1 / 3, 1 / 3)  # Probabilities of lesion, background, ambiguous ("random").

  # ---- CRCKD (stage "crckd"; spec CRCKD.md) ---------------------------------------------------------
  # One value per field of pagkd_jax.distill.crckd.DEFAULTS, the spec's values (their meaning: its docstring), e.g.
  # crckd.embed_dim (the classifier's 128-d "feature4" before the head), crckd.num_positives (P = 20),
  # crckd.num_negatives (K = 4096). crckd.ccd_weight_late = 0.01 reproduces the public release, which multiplies the
  # CCD weight by 0.1 twice from crckd.mean_teacher_start_epoch on (the spec keeps 0.1).
  config.crckd = crckd_config()

  # ---- the paired comparison methods (stages "kd", "fitnets", "add"; spec 9) -----------------------
  config.paired_method = ml_collections.ConfigDict()
  # False: trained on the pairs of the training split alone. True: "+ unpaired" (the paper's fair setting): the
  # class-group batches of every training image, each WLI image with a random NBI image of its class; no pairs needed.
  config.paired_method.unpaired = False

  # ---- FitNets on pairs (stage "fitnets"; spec 9) ---------------------------------------------------
  config.fitnets = ml_collections.ConfigDict()
  # Weight of the hint (MSE of the regressed student layer4 map to the teacher's) added to CE; the spec gives none.
  config.fitnets.weight = 1.0

  # ---- ADD on pairs (stage "add"; spec 9) -------------------------------------------------------------
  config.add = ml_collections.ConfigDict()
  config.add.warmup_epochs = 15.0  # Cross-entropy only before this (the spec's 15 epochs).
  # Weights of the dense loss (both directions, ambiguous relation 0) and of the logit alignment added to CE; the
  # spec gives none.
  config.add.dense_weight = 1.0
  config.add.logit_weight = 1.0
  return config


def split_class_names(classes) -> tuple[str, ...]:
  """Class names as a command line gives them -> a tuple of names: "a,b,c" and ("a,b,c",) (what ml_collections makes
  of --config.data.classes=a,b,c) become ("a", "b", "c"); a tuple of names stays as it is. Names are stripped and
  empty ones ("a,b,") dropped; anything that is not a string is kept for the config check to report."""
  items = (classes,) if isinstance(classes, str) else tuple(classes)
  names = (name.strip() if isinstance(name, str) else name
           for item in items for name in (item.split(",") if isinstance(item, str) else (item,)))
  return tuple(name for name in names if name != "")


def from_command_line(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config of a command line (train.py, the data check) in the form the code reads; call it before the config
  check. Today: `data.classes` given as a comma-separated list (`split_class_names`)."""
  config.data.classes = split_class_names(config.data.classes)
  return config


def crckd_config() -> ml_collections.ConfigDict:
  """config.crckd: the fields of `crckd.DEFAULTS` with their values (None, `bank_init_scale`'s "the spec's s", as a
  float placeholder)."""
  from pagkd_jax.distill import crckd  # The values live there, beside the code that uses them.
  section = ml_collections.ConfigDict()
  for field in dataclasses.fields(crckd.DEFAULTS):
    value = getattr(crckd.DEFAULTS, field.name)
    section[field.name] = config_dict.placeholder(float) if value is None else value
  return section


def apply_release_conventions(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The public release's choices where the paper differs: [0, 1] inputs, release losses and LR-QFormer."""
  config.data.normalization = "unit"
  config.distill.variant = "release"
  return config


# Config values added after runs were saved whose default is not what the code did before them: the value that
# reproduces the earlier behaviour, or a function of the saved config (as json) giving it. A saved config.json without
# such a key is read with this value; without any other added key, with its default (a new option's default keeps
# the old behaviour unless it is listed here).
EARLIER_BEHAVIOUR = {
    "distill.par_resampling": "area",
    # The paired stream trained with the release's loss; a run without it has no paired loss to keep.
    "distill.paired_loss": lambda saved: "release" if saved.get("distill", {}).get("paired") is True else None,
}


def complete_saved_config(saved: dict) -> tuple[dict, list[str]]:
  """A run's saved config.json (as loaded by json) with every key of today's config: keys the run did not have take
  their EARLIER_BEHAVIOUR value, or else their default. Returns (a new dict, the dotted keys added)."""
  defaults = json.loads(get_config().to_json_best_effort())
  added = []

  def fill(node: dict, default: dict, prefix: str) -> None:
    for key, value in default.items():
      path = prefix + key
      if isinstance(value, dict):
        if not isinstance(node.get(key, {}), dict):
          continue  # A value where a section is expected: left for the config check to name.
        fill(node.setdefault(key, {}), value, path + ".")
      elif key not in node:
        earlier = EARLIER_BEHAVIOUR.get(path, value)
        node[key] = earlier(saved) if callable(earlier) else earlier
        added.append(path)

  completed = copy.deepcopy(saved)
  fill(completed, defaults, "")
  return completed, added

