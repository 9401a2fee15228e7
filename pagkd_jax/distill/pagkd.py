"""PaGKD's distillation heads and losses on top of the two backbones (spec 3-6).

`region_labels` turns backbone outputs into lesion / background / ambiguous maps (CAM -> PAR -> dual
threshold); `DistillationHeads` holds every trainable part of stage 2 besides the student (the two 1x1
embeddings, the prototype extractor, SRCA, the release's prototype classifier) and returns L_pro and L_den;
`pair_images` builds the image-level ablation's groups.

Negative controls (distillation a correct implementation must not let help): `random_region_labels` replaces
the CAM/PAR labels by random ones, `shift_teacher_groups` gives every WLI group the NBI group of another class.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pagkd_jax.distill import par
from pagkd_jax.distill import prototype_loss
from pagkd_jax.distill import qformer
from pagkd_jax.distill import relations
from pagkd_jax.distill import srca
from pagkd_jax.models.cam import class_activation_map

REGION_LABEL_SOURCES = ("cam_par", "random")
# The values whose None in config.distill means "the variant's": lambda_pro (spec 6) and the paired stream's dense
# loss (spec 8: "paper" SRCA per pair with the MSE, "release" the per-image relation weights with 1 - cos).
VARIANT_DEFAULTS = {"paper": {"lambda_pro": 1.0, "paired_loss": "paper"},
                    "release": {"lambda_pro": 1e-3, "paired_loss": "release"}}
PAIRED_LOSSES = ("paper", "release")
LEVELS = ("group", "image")  # distill.level: PaGKD's class groups, or the image-level ablation.


def resolved(distill_config, name: str):
  """A distillation value whose None means "the variant's default" (lambda_pro, paired_loss)."""
  value = distill_config[name]
  return VARIANT_DEFAULTS[distill_config.variant][name] if value is None else value


def check_config(distill_config) -> None:
  d = distill_config
  if d.variant not in VARIANT_DEFAULTS:
    raise ValueError(f"Unknown distill.variant {d.variant!r}; expected one of {tuple(VARIANT_DEFAULTS)}.")
  if d.level not in LEVELS:
    raise ValueError(f"Unknown distill.level {d.level!r}; expected one of {LEVELS}.")
  if d.prototypes not in qformer.EXTRACTOR_KINDS:
    raise ValueError(f"Unknown distill.prototypes {d.prototypes!r}; expected one of {qformer.EXTRACTOR_KINDS}.")
  if d.region_labels not in REGION_LABEL_SOURCES:
    raise ValueError(f"Unknown distill.region_labels {d.region_labels!r}; expected one of {REGION_LABEL_SOURCES}.")
  paired_loss = resolved(d, "paired_loss")
  if paired_loss not in PAIRED_LOSSES:
    raise ValueError(f"Unknown distill.paired_loss {paired_loss!r}; expected one of {PAIRED_LOSSES} or None (the "
                     "variant's).")
  if d.paired and paired_loss == "paper" and d.variant == "release" and d.use_den:
    raise ValueError("distill.paired_loss='paper' attends through the paper SRCA's query and key projections, which "
                     "distill.variant='release' does not have; use paired_loss='release' (or None) with it.")
  fractions = tuple(d.random_region_fractions)
  if len(fractions) != 3 or min(fractions) < 0 or not sum(fractions) > 0:
    raise ValueError(f"distill.random_region_fractions={fractions!r} must be three non-negative probabilities "
                     "(lesion, background, ambiguous) with a positive sum.")
  if not isinstance(d.teacher_class_shift, int):
    raise ValueError(f"distill.teacher_class_shift must be an integer; got {d.teacher_class_shift!r}.")


def region_labels(images: jax.Array, features: jax.Array, fc_kernel: jax.Array, labels: jax.Array,
                  distill_config) -> jax.Array:
  """Spec 5.1-5.3 for a batch: CAM of the true class -> PAR -> dual threshold. No gradient.

  Args:
    images: (B, H, W, 3) network input. features: (B, h, w, F) layer4 maps. fc_kernel: (F, C) head kernel.
    labels: (B,) class of each image.
  Returns:
    (B, h, w) int8: 1 lesion, 0 background, -1 ambiguous.
  """
  cams = class_activation_map(features, fc_kernel, labels)
  return cam_region_labels(images, cams, distill_config)


def cam_region_labels(images: jax.Array, cams: jax.Array, distill_config) -> jax.Array:
  """Spec 5.2-5.3: CAMs (B, h, w) in [0, 1] of the images (B, H, W, 3) -> PAR -> dual threshold, (B, h, w) int8."""
  d = distill_config
  cams = jax.lax.stop_gradient(cams)
  fg = par.pixel_adaptive_refinement(jax.lax.stop_gradient(images), cams, thresholds=tuple(d.thresholds),
                                     num_iters=d.par_iters, dilations=tuple(d.par_dilations),
                                     temperature=d.par_temperature, downscale=d.par_downscale,
                                     pos_weight=d.par_pos_weight, resampling=d.par_resampling)
  return relations.dual_threshold_labels(fg, tuple(d.thresholds))


def random_region_labels(rng: jax.Array, shape: tuple[int, ...], fractions=(1 / 3, 1 / 3, 1 / 3)) -> jax.Array:
  """Negative control for spec 5.1-5.3: every position independently lesion (1), background (0) or ambiguous
  (-1) with probabilities `fractions` (normalised to sum 1); no image, CAM or PAR is read. -> `shape` int8."""
  p = jnp.asarray(fractions, jnp.float32)
  index = jax.random.choice(rng, 3, shape, p=p / jnp.sum(p))
  return jnp.asarray([relations.LESION, relations.BACKGROUND, relations.AMBIGUOUS], jnp.int8)[index]


def shift_teacher_groups(x_nbi: jax.Array, shift: int | jax.Array) -> jax.Array:
  """Negative control: group c receives the NBI group (c + shift) mod G. x_nbi (G, ...) -> (G, ...); `shift` may
  be traced (drawn per step)."""
  return jnp.roll(x_nbi, -shift, axis=0)


def draw_class_shift(rng: jax.Array, num_classes: int) -> jax.Array:
  """Negative control `teacher_class_shift_per_step`: a shift uniform on 1..C-1, () int32."""
  return jax.random.randint(rng, (), 1, num_classes)


def pair_images(x_nbi: jax.Array, rng: jax.Array) -> jax.Array:
  """Image-level ablation: NBI image k of class c becomes the partner of WLI image k of class c, after a
  random permutation within each class. x_nbi (C, K, ...) -> (C, K, ...)."""
  c, k = x_nbi.shape[:2]
  perms = jax.vmap(lambda r: jax.random.permutation(r, k))(jax.random.split(rng, c))  # (C, K)
  return jnp.take_along_axis(x_nbi, perms.reshape((c, k) + (1,) * (x_nbi.ndim - 2)), axis=1)


def mean_token_norm(tokens: jax.Array) -> jax.Array:
  """Mean over all positions of the L2 norm of the d-dimensional tokens (..., d): a shrinkage diagnostic."""
  return jax.lax.stop_gradient(jnp.mean(jnp.linalg.norm(tokens.astype(jnp.float32), axis=-1)))


class DistillationHeads(nn.Module):
  """Trainable distillation parts (spec 3-5), applied to grouped backbone outputs.

  Attributes:
    distill: the `config.distill` values (variant, embed_dim, prototypes, switches).
    num_classes: C, for the release's prototype classifier.
    dtype: compute dtype.
  """

  distill: Any
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, f_student, f_teacher, group_labels, regions_wli, regions_nbi) -> dict:
    """Group-level losses.

    Args:
      f_student: (G, K, h, w, F) student layer4 maps of the WLI groups.
      f_teacher: (G, K, h, w, F) teacher layer4 maps of the NBI groups (gradient already stopped).
      group_labels: (G,) class of each group.
      regions_wli, regions_nbi: (G, K, h, w) int8 region labels (only read by GKD-Den).
    Returns:
      {"loss_pro", "loss_den"} scalars (0 for a disabled term) and diagnostics, among them the mean L2 norm of
      the student's and the teacher-side group tokens ("diag/token_norm_wli", "diag/token_norm_nbi").
    """
    d = self.distill
    release = d.variant == "release"
    # Group features: bias-free 1x1 convolutions F -> d; the teacher side is trainable (spec 3). The release
    # initialises the student's as its ResNet's convolutions (kaiming-normal, fan-out, ReLU gain) and the teacher
    # side with torch's default conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    student_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal") if release else None
    teacher_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform") if release else None
    embed = lambda name, init: nn.Dense(d.embed_dim, use_bias=False, dtype=self.dtype, name=name,
                                        **({"kernel_init": init} if init else {}))
    tokens_wli = embed("student_embed", student_init)(f_student)
    tokens_nbi = embed("teacher_embed", teacher_init)(f_teacher)
    # The release sums its per-class terms; with C * K image-level groups of one, a class's term is the mean over
    # its K groups, hence the factor C / G (1 at the group level).
    per_class = self.num_classes / f_student.shape[0]
    out = {"loss_pro": jnp.zeros((), jnp.float32), "loss_den": jnp.zeros((), jnp.float32),
           "diag/token_norm_wli": mean_token_norm(tokens_wli), "diag/token_norm_nbi": mean_token_norm(tokens_nbi)}
    if d.use_pro:
      extractor = qformer.make_prototype_extractor(
          d.prototypes, num_queries=d.num_queries, num_layers=d.qformer_layers, num_heads=d.qformer_heads,
          variant=d.variant, num_classes=self.num_classes, dtype=self.dtype, name="prototypes")
      # Shared queries: one module, both sides (release: the same identity codes for a class's two groups).
      q_wli, q_nbi = extractor(tokens_wli, group_labels), extractor(tokens_nbi, group_labels)
      if d.variant == "paper":
        out["loss_pro"] = prototype_loss.group_contrastive_loss(q_wli, q_nbi, group_labels, d.temperature)
      else:
        contrastive = per_class * prototype_loss.release_prototype_loss(q_wli, q_nbi, group_labels)
        logits = prototype_loss.PrototypeClassifier(self.num_classes, name="prototype_classifier")(
            jnp.concatenate([q_wli, q_nbi]))
        classification = prototype_loss.prototype_classification_loss(
            logits, jnp.concatenate([group_labels, group_labels]))
        out["loss_pro"] = contrastive + classification
        out["pro/contrastive"], out["pro/classification"] = contrastive, classification
    if d.use_den:
      loss_den, diagnostics = srca.SRCA(proj_dim=d.proj_dim, variant=d.variant, masked=d.masked,
                                        bidirectional=d.bidirectional, dtype=self.dtype, name="srca")(
                                            tokens_wli, tokens_nbi, regions_wli, regions_nbi)
      out["loss_den"] = per_class * loss_den if release else loss_den
      out.update({f"den/{k}": v for k, v in diagnostics.items()})
    return out
