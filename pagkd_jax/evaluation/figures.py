"""Evaluation figures: ROC curves, confusion matrices, reliability diagrams and class-activation-map overlays.

Matplotlib runs on the Agg backend (files only, no display). The CAM overlays visualise the
ground-truth/predicted-class CAMs of spec section 5.1 on the input images.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
from sklearn import metrics as sk_metrics  # noqa: E402

PathLike = str | os.PathLike
_CAM_TOL = 1e-5


def _prepare_path(path: PathLike) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  return path


def plot_roc(
    labels: Any, probs: Any, class_names: Sequence[str], path: PathLike
) -> pathlib.Path:
  """Saves one-vs-rest ROC curves (binary: class 1 only) with AUCs in the legend as a PNG.

  Args:
    labels: (N,) int true class indices.
    probs: (N, C) float probabilities.
    class_names: C names in label-index order.
    path: output PNG file.

  Returns:
    The path written. Classes without positives or negatives are listed as "AUC undefined".
  """
  labels = np.asarray(labels)
  probs = np.asarray(probs, dtype=np.float64)
  num_classes = len(class_names)
  if labels.ndim != 1 or probs.shape != (labels.shape[0], num_classes) or num_classes < 2:
    raise ValueError(
        f"plot_roc needs labels (N,) and probs (N, C) with C = len(class_names) >= 2; got labels "
        f"{labels.shape}, probs {probs.shape}, {num_classes} class names."
    )
  path = _prepare_path(path)
  fig, ax = plt.subplots(figsize=(5.5, 5.0), dpi=120)
  ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
  shown = [1] if num_classes == 2 else list(range(num_classes))
  for k in shown:
    positive = labels == k
    if positive.all() or not positive.any():
      ax.plot([], [], label=f"{class_names[k]} (AUC undefined)")
      continue
    fpr, tpr, _ = sk_metrics.roc_curve(positive.astype(np.int64), probs[:, k])
    auc = sk_metrics.auc(fpr, tpr)
    ax.plot(fpr, tpr, linewidth=1.8, label=f"{class_names[k]} (AUC = {auc:.3f})")
  ax.set_xlim(-0.01, 1.01)
  ax.set_ylim(-0.01, 1.01)
  ax.set_aspect("equal")
  ax.set_xlabel("False positive rate (1 - specificity)")
  ax.set_ylabel("True positive rate (sensitivity)")
  ax.set_title("ROC, one vs rest" if num_classes > 2 else f"ROC, positive class: {class_names[1]}")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, format="png", bbox_inches="tight")
  plt.close(fig)
  return path


def plot_confusion(
    confusion_matrix: Any,
    class_names: Sequence[str],
    path: PathLike,
    normalize: bool = False,
) -> pathlib.Path:
  """Saves an annotated confusion-matrix heat map (rows true, columns predicted) as a PNG.

  Each cell shows its count and its percentage of the row (the true class). The colour encodes
  counts, or row fractions when `normalize` is True.

  Args:
    confusion_matrix: (C, C) non-negative integer counts.
    class_names: C names.
    path: output PNG file.
    normalize: colour by row fraction instead of count.
  """
  counts = np.asarray(confusion_matrix)
  num_classes = len(class_names)
  if counts.shape != (num_classes, num_classes):
    raise ValueError(
        f"confusion_matrix must have shape ({num_classes}, {num_classes}) for classes "
        f"{list(class_names)}, got {counts.shape}."
    )
  if np.any(counts < 0) or np.any(counts != np.round(counts)):
    raise ValueError(
        f"confusion_matrix must hold non-negative integer counts, got {counts.tolist()}."
    )
  counts = counts.astype(np.int64)
  row_totals = counts.sum(axis=1, keepdims=True)
  fractions = counts / np.maximum(row_totals, 1)
  shown = fractions if normalize else counts
  vmax = 1.0 if normalize else max(int(counts.max()), 1)

  path = _prepare_path(path)
  size = 1.3 * num_classes + 2.2
  fig, ax = plt.subplots(figsize=(size, size * 0.85), dpi=120)
  image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=vmax)
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04,
               label="fraction of true class" if normalize else "images")
  for i in range(num_classes):
    for j in range(num_classes):
      colour = "white" if shown[i, j] > 0.55 * vmax else "black"
      text = f"{counts[i, j]}\n({100.0 * fractions[i, j]:.1f}%)" if row_totals[i, 0] else "0"
      ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=10)
  ax.set_xticks(range(num_classes), labels=class_names, rotation=30, ha="right")
  ax.set_yticks(range(num_classes), labels=class_names)
  ax.set_xlabel("Predicted class")
  ax.set_ylabel("True class")
  ax.set_title("Confusion matrix" + (" (row-normalised)" if normalize else ""))
  fig.tight_layout()
  fig.savefig(path, format="png", bbox_inches="tight")
  plt.close(fig)
  return path


def upsample_bilinear(cam: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize of a (h, w) map to (height, width), half-pixel centres, edges clamped.

  Output pixel (i, j) samples the source at y = (i + 0.5) * h / height - 0.5 (likewise x), clamped
  to [0, h - 1], and interpolates the four surrounding source pixels (align_corners=False).
  """
  cam = np.asarray(cam, dtype=np.float64)
  if cam.ndim != 2 or min(cam.shape) < 1 or height < 1 or width < 1:
    raise ValueError(f"upsample_bilinear needs a (h, w) map and a positive size, got {cam.shape}.")

  def axis_weights(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    src = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
    src = np.clip(src, 0.0, in_size - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, src - lo

  y0, y1, fy = axis_weights(height, cam.shape[0])
  x0, x1, fx = axis_weights(width, cam.shape[1])
  top = cam[y0][:, x0] * (1 - fx) + cam[y0][:, x1] * fx
  bottom = cam[y1][:, x0] * (1 - fx) + cam[y1][:, x1] * fx
  return top * (1 - fy)[:, None] + bottom * fy[:, None]


def _check_cam(cam: np.ndarray, where: str) -> np.ndarray:
  cam = np.asarray(cam, dtype=np.float64)
  if cam.ndim != 2:
    raise ValueError(f"{where}: CAM must have shape (h, w), got {cam.shape}.")
  # float32 rounding may overshoot [0, 1] by an ulp or so: tolerated and clipped.
  if not np.all(np.isfinite(cam)) or cam.min() < -_CAM_TOL or cam.max() > 1.0 + _CAM_TOL:
    raise ValueError(
        f"{where}: CAM values must be finite and in [0, 1] (min-max normalise first); "
        f"got range [{np.nanmin(cam)}, {np.nanmax(cam)}]."
    )
  return np.clip(cam, 0.0, 1.0)


def _check_image(image: np.ndarray, where: str) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"{where}: image must be (H, W, 3) uint8, got {image.shape} {image.dtype}.")
  return image


def cam_overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
  """Blends a jet-coloured CAM onto an image: (1 - alpha) * image + alpha * jet(upsampled CAM).

  Args:
    image: (H, W, 3) uint8 RGB.
    cam: (h, w) float in [0, 1]; bilinearly upsampled to (H, W).
    alpha: heat-map opacity in [0, 1].

  Returns:
    (H, W, 3) uint8 blended image.
  """
  image = _check_image(image, "cam_overlay")
  cam = _check_cam(cam, "cam_overlay")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
  heat = upsample_bilinear(cam, image.shape[0], image.shape[1])
  heat_rgb = matplotlib.colormaps["jet"](heat)[..., :3] * 255.0
  blended = (1.0 - alpha) * image.astype(np.float64) + alpha * heat_rgb
  return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def plot_reliability(series: dict[str, dict[str, Any]], path: PathLike, title: str = "Reliability") -> pathlib.Path:
  """Saves a reliability diagram: accuracy against mean confidence per confidence bin, one line per entry of
  `series` ({legend: calibration.reliability_bins(...) plus "ece"}), the diagonal (perfect calibration) and the
  images per bin (of the first series) as bars underneath."""
  path = _prepare_path(path)
  fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(5.5, 6.2), dpi=120, sharex=True,
                                     gridspec_kw={"height_ratios": (3, 1)})
  ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="perfect calibration")
  first = None
  for name, bins in series.items():
    used = np.asarray(bins["count"]) > 0
    ax.plot(np.asarray(bins["confidence"])[used], np.asarray(bins["accuracy"])[used], marker="o", linewidth=1.6,
            label=f"{name} (ECE = {bins['ece']:.3f})")
    first = bins if first is None else first
  n_bins = len(first["count"]) if first is not None else 1
  edges = np.linspace(0, 1, n_bins + 1)
  if first is not None:
    ax_count.bar(edges[:-1], first["count"], width=1 / n_bins, align="edge", color="0.6", edgecolor="white")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.01)
  ax.set_ylabel("Accuracy")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(loc="upper left", fontsize=9)
  ax_count.set_xlabel("Confidence (largest probability)")
  ax_count.set_ylabel("Images")
  fig.tight_layout()
  fig.savefig(path, format="png", bbox_inches="tight")
  plt.close(fig)
  return path


def save_cam_overlays(
    images: Any,
    cams: Any,
    out_dir: PathLike,
    titles: Sequence[str],
    alpha: float = 0.4,
    names: Sequence[str] | None = None,
) -> list[pathlib.Path]:
  """Saves `cam_000.png`, `cam_001.png`, ... (or `names`): each image beside its CAM overlay, with a title.

  Args:
    images: (N, H, W, 3) uint8 RGB images.
    cams: (N, h, w) float CAMs in [0, 1].
    out_dir: output folder (created if missing).
    titles: N titles, e.g. "true: adenoma / pred: adenoma (0.91)".
    alpha: heat-map opacity.
    names: N file names (default `cam_000.png`, ...).

  Returns:
    The N paths written, in input order.
  """
  images = np.asarray(images)
  cams = np.asarray(cams)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}.")
  if cams.ndim != 3 or cams.shape[0] != images.shape[0]:
    raise ValueError(f"cams must be (N, h, w) with N = {images.shape[0]}, got {cams.shape}.")
  if len(titles) != images.shape[0]:
    raise ValueError(f"need one title per image: {images.shape[0]} images, {len(titles)} titles.")
  if names is not None and len(names) != images.shape[0]:
    raise ValueError(f"need one file name per image: {images.shape[0]} images, {len(names)} names.")
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = []
  for i, (image, cam, title) in enumerate(zip(images, cams, titles)):
    overlay = cam_overlay(image, _check_cam(cam, f"cams[{i}]"), alpha)
    fig, axes = plt.subplots(1, 2, figsize=(7.0, 3.8), dpi=110)
    for ax, panel, name in zip(axes, (image, overlay), ("image", "CAM overlay")):
      ax.imshow(panel)
      ax.set_title(name, fontsize=9)
      ax.axis("off")
    fig.suptitle(str(title), fontsize=11)
    fig.tight_layout()
    path = out_dir / (names[i] if names is not None else f"cam_{i:03d}.png")
    fig.savefig(path, format="png", bbox_inches="tight")
    plt.close(fig)
    paths.append(path)
  return paths
