"""Synthetic WLI/NBI endoscopy images: the project's embedded default dataset.

Every image shows one lesion on a mucosa-like background (low-frequency pinkish or teal texture,
darker curved folds, specular highlights, camera vignetting and a circular field of view). The class
is carried **only** by a fine surface pattern inside the lesion:

* class 0 ("hyperplasia"): regular round pits on a hexagonal lattice;
* class 1 ("adenoma"): elongated tubular pits in curved rows;
* class 2 ("adenocarcinoma"): irregular, disrupted dense vessel network with amorphous areas.

For C classes, class c uses the pattern parameters interpolated at t = c / (C - 1) between those
three anchors (t = 0, 0.5, 1), so any C >= 2 works.

NBI images render the pattern crisp and with high contrast (dark brown vessels on a teal-green and
brown palette). WLI images of *other, independent* lesions render the same kind of pattern faint:
low contrast, blurred, with colour noise, a reddish tint and stronger glare, so the WLI task is hard
but not impossible. Lesion size, position, colour shade, brightness, folds and highlights are drawn
independently of the class. A `paired_fraction` of each class's lesions is rendered in both
modalities (same lesion id, view k of both modalities shares pose and a `pair_id`).

Regime options (`generate`; off by default, which leaves the data set above unchanged byte for byte): modality
imbalance (`wli_lesions_per_class`, `nbi_lesions_per_class`), a split fixed by the generator with separate
validation and test lesions (`eval_lesions_per_class`), a WLI-only colour-cast shortcut in training images
(`shortcut_agreement`), pattern sub-types per class (`subtypes_per_class`), and a generic pretraining task
(`task="generic"`: GENERIC_CLASSES drawn on the same scenes in both palettes). configs/transfer.py uses them.

Everything is deterministic per seed: each lesion, view and image draws from its own
`np.random.default_rng([seed, stream, ...])`, so the output does not depend on iteration order.

Output layout (`generate`):

  OUT/<modality>/<class>/<lesion_id>__<k>.png
  OUT/lesions.csv        path, center_x, center_y, radius (pixels): where the lesion is, for
                         localisation checks (e.g. CAM quality); not used for training. With regime
                         options also palette, subtype, nuisance (the shortcut value, -1: none).
  OUT/synthetic.json     the generation parameters.
  OUT/manifest.csv       path, modality, label, lesion_id, patient_id, pair_id[, split] (written last,
                         atomically: its presence means the folder is complete).

CLI: `python -m pagkd_jax.data.synthetic --out DIR [--image_size 128] [--lesions_per_class 40]
[--images_per_lesion 3] [--paired_fraction 0.0] [--seed 0] [--classes a,b,c] [--wli_contrast 0.5]
[--task lesion] [--wli_lesions_per_class -1] [--nbi_lesions_per_class -1] [--eval_lesions_per_class 0]
[--shortcut_agreement 0] [--subtypes_per_class 1]`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import fcntl
import io
import json
import os
import pathlib
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

DEFAULT_CLASSES = ("hyperplasia", "adenoma", "adenocarcinoma")
MANIFEST_NAME = "manifest.csv"
PARAMS_NAME = "synthetic.json"
LESIONS_NAME = "lesions.csv"
MANIFEST_COLUMNS = ("path", "modality", "label", "lesion_id", "patient_id", "pair_id")
# Bump when the renderer changes, so `ensure_generated` never reuses images of another version.
GENERATOR_VERSION = 1

# ---- tuning knobs --------------------------------------------------------------------------------
# WLI: how visible the class pattern is (the cross-modal gap). Contrast is the fraction by which a
# vessel darkens the lesion colour; blur is the Gaussian sigma in units of the image size.
# Measured with these values (96 px images, 60 lesions per class, downsized to 64 px, the `tiny`
# ResNet, 600 steps of 8 images per class, 3 patient-grouped 80/20 splits): NBI test AUC 0.99
# (0.98-1.00), WLI 0.65 (0.54-0.78). WLI_CONTRAST 0.2 with stronger noise and glare gave WLI 0.56;
# a clean WLI (contrast 0.5, little noise and glare) gave 0.87. Noise and glare matter as much as
# the contrast.
WLI_CONTRAST = 0.5
WLI_BLUR = 0.008
WLI_NOISE = 0.02  # Per-pixel colour noise (std, in [0, 1] intensity units).
WLI_CHROMA_NOISE = 0.03  # Low-frequency colour blotches (amplitude).
WLI_HIGHLIGHTS = (3, 10)  # Number of specular highlights, [low, high).
# NBI: crisp and high-contrast pattern.
NBI_CONTRAST = 0.8
NBI_NOISE = 0.01
NBI_HIGHLIGHTS = (1, 6)
# Sub-types (`subtypes_per_class` > 1): lattice-period factor and pit-size change at the extreme sub-types.
SUBTYPE_PERIOD = 1.3
SUBTYPE_PIT = 0.12
# WLI shortcut (`shortcut_agreement` > 0): strength of the colour cast, a per-channel gain offset of this norm
# (about +-0.1 per channel against a lesion shade spread of 0.06-0.08), direction 2 pi v / C in the chroma plane.
SHORTCUT_CAST = 0.15

# The generic task's pattern classes (unrelated to the lesion classes), in label order.
GENERIC_CLASSES = ("stripes", "checkerboard", "rings", "dots", "crosshatch", "zigzag", "spokes", "spots",
                   "waves", "bricks")
TASKS = ("lesion", "generic")

# Pattern anchors at t = 0 (hyperplasia), 0.5 (adenoma), 1 (adenocarcinoma), all in lattice-cell
# units: stretch = cell length along the rows / period; rx, ry = pit half-axes; jitter = positional
# disorder; orient = per-pit orientation spread (radians, std); size = log-normal size spread;
# dropout = fraction of missing pits; network = weight of the irregular vessel mesh; warp = row
# curvature; amorph = weight of structure-less patches.
_ANCHOR_T = np.array([0.0, 0.5, 1.0])
_ANCHORS = {
    "stretch": (1.0, 2.6, 1.0),
    "rx": (0.30, 0.40, 0.26),
    "ry": (0.30, 0.17, 0.22),
    "jitter": (0.02, 0.06, 0.32),
    "orient": (0.0, 0.12, 1.6),
    "size": (0.04, 0.08, 0.40),
    "dropout": (0.0, 0.04, 0.45),
    "network": (0.0, 0.0, 1.0),
    "warp": (0.0, 0.30, 0.45),
    "amorph": (0.0, 0.0, 0.6),
}
_CELL_TABLE = 32  # Lattice cells per side of a lesion's pit table (wraps around).

_MODALITIES = ("wli", "nbi")
_STREAM_LESION, _STREAM_VIEW, _STREAM_IMAGE, _STREAM_IDS, _STREAM_PATIENTS, _STREAM_NUISANCE = 1, 2, 3, 4, 5, 6
_SPLITS = ("train", "val", "test")  # As splits.SPLITS (not imported: the generator stands alone).

# Palettes (RGB in [0, 1]) of the two modalities.
_PALETTE = {
    "wli": {
        "mucosa": np.array([0.88, 0.52, 0.46]),
        "lesion": np.array([0.86, 0.44, 0.40]),
        "vessel_tint": np.array([0.55, 1.0, 0.9]),  # Per-channel darkening weights (reddish).
    },
    "nbi": {
        "mucosa": np.array([0.40, 0.55, 0.52]),
        "lesion": np.array([0.52, 0.43, 0.32]),
        "vessel": np.array([0.22, 0.13, 0.09]),
    },
}


# ---- scene description ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Lesion:
  """Modality-independent description of a lesion and its surroundings (world units: image = 1)."""

  t: float  # Class position in [0, 1].
  center: np.ndarray  # (2,) lesion centre.
  radius: float
  aspect: float  # Ellipse axis ratio.
  angle: float  # Ellipse orientation.
  harmonics: np.ndarray  # (3, 2) amplitude and phase of boundary harmonics k = 2, 3, 4.
  edge: float  # Soft-edge width, relative to the radius.
  period: float  # Pit lattice period.
  pattern_angle: float
  params: dict[str, float]  # Pattern parameters at t.
  cell_jitter: np.ndarray  # (G, G, 2)
  cell_angle: np.ndarray  # (G, G)
  cell_size: np.ndarray  # (G, G)
  cell_present: np.ndarray  # (G, G)
  warp: np.ndarray  # (3,) row-curvature frequency, phase, sign.
  network: np.ndarray  # (K, 4): frequency x, frequency y, phase, amplitude (cycles per period).
  amorph: np.ndarray  # (K, 4) low-frequency field of the amorphous areas (cycles per radius).
  background: np.ndarray  # (K, 4) low-frequency mucosa texture (cycles per image).
  capillary: np.ndarray  # (K, 4) faint class-independent capillary mesh of the mucosa.
  folds: np.ndarray  # (F, 7) angle, offset, amplitude, frequency, phase, curvature, width.
  shade: np.ndarray  # (2, 3) colour shade of mucosa and lesion (normal draws).
  brightness: float
  height: float  # Raised-lesion shading strength.
  generic: int = -1  # Generic task: index into GENERIC_CLASSES of the pattern drawn in place of the pits; -1: none.
  generic_params: np.ndarray | None = None  # (4,) random numbers of the generic pattern (see `_generic_map`).


@dataclasses.dataclass(frozen=True)
class _View:
  """One camera pose and lighting; shared by both modalities of a paired lesion."""

  shift: np.ndarray  # (2,)
  rotation: float
  zoom: float
  gain: float
  light: np.ndarray  # (2,) light direction.
  vignette: float
  fov: float  # Radius of the circular field of view (1 = half the image side).
  contrast: float  # Pattern contrast multiplier.


def _pattern_params(t: float) -> dict[str, float]:
  return {k: float(np.interp(t, _ANCHOR_T, np.asarray(v))) for k, v in _ANCHORS.items()}


def _random_field(rng: np.random.Generator, count: int, fmin: float, fmax: float) -> np.ndarray:
  """(count, 4) random plane waves: frequency x, frequency y, phase, amplitude."""
  freq = rng.uniform(fmin, fmax, count)
  direction = rng.uniform(0.0, np.pi, count)
  return np.stack([freq * np.cos(direction), freq * np.sin(direction),
                   rng.uniform(0, 2 * np.pi, count), rng.uniform(0.5, 1.0, count)], axis=1)


def _draw_lesion(rng: np.random.Generator, t: float) -> _Lesion:
  params = _pattern_params(t)
  g = _CELL_TABLE
  num_folds = int(rng.integers(1, 4))
  folds = np.stack([
      rng.uniform(0, np.pi, num_folds),  # angle
      rng.uniform(-0.45, 0.45, num_folds),  # offset
      rng.uniform(0.0, 0.08, num_folds),  # amplitude
      rng.uniform(3.0, 9.0, num_folds),  # frequency
      rng.uniform(0, 2 * np.pi, num_folds),  # phase
      rng.uniform(-0.6, 0.6, num_folds),  # curvature
      rng.uniform(0.02, 0.05, num_folds),  # width
  ], axis=1)
  return _Lesion(
      t=t,
      center=rng.uniform(0.32, 0.68, 2),
      radius=float(rng.uniform(0.14, 0.26)),
      aspect=float(rng.uniform(0.7, 1.0)),
      angle=float(rng.uniform(0, np.pi)),
      harmonics=np.stack([rng.uniform(0, 0.07, 3), rng.uniform(0, 2 * np.pi, 3)], axis=1),
      edge=float(rng.uniform(0.05, 0.12)),
      period=float(rng.uniform(0.062, 0.08)),
      pattern_angle=float(rng.uniform(0, np.pi)),
      params=params,
      cell_jitter=(params["jitter"] * rng.uniform(-1, 1, (g, g, 2))).astype(np.float32),
      cell_angle=(params["orient"] * rng.standard_normal((g, g))).astype(np.float32),
      cell_size=np.clip(np.exp(params["size"] * rng.standard_normal((g, g))), 0.55,
                        1.6).astype(np.float32),
      cell_present=(rng.uniform(size=(g, g)) >= params["dropout"]).astype(np.float32),
      warp=np.array([rng.uniform(0.15, 0.35), rng.uniform(0, 2 * np.pi), rng.choice([-1, 1])]),
      network=_random_field(rng, 10, 0.7, 1.2),
      amorph=_random_field(rng, 6, 0.4, 1.2),
      background=_random_field(rng, 12, 0.5, 4.0),
      capillary=_random_field(rng, 10, 5.0, 10.0),
      folds=folds,
      shade=rng.standard_normal((2, 3)),
      brightness=float(rng.uniform(-0.08, 0.08)),
      height=float(rng.uniform(0.05, 0.25)),
  )


def _draw_view(rng: np.random.Generator) -> _View:
  return _View(
      shift=rng.uniform(-0.03, 0.03, 2),
      rotation=float(rng.uniform(-0.2, 0.2)),
      zoom=float(rng.uniform(0.94, 1.06)),
      gain=float(rng.uniform(0.88, 1.08)),
      light=np.array([np.cos(a := rng.uniform(0, 2 * np.pi)), np.sin(a)]),
      vignette=float(rng.uniform(0.2, 0.5)),
      fov=float(rng.uniform(1.05, 1.3)),
      contrast=float(rng.uniform(0.85, 1.15)),
  )



def _with_subtype(lesion: _Lesion, subtype: int, num_subtypes: int) -> _Lesion:
  """The lesion's class pattern as sub-type `subtype` of `num_subtypes`: a pattern variant of its class.

  Sub-type position u = 2 s / (S - 1) - 1 in [-1, 1] scales the pit lattice by SUBTYPE_PERIOD^u (coarse or fine
  pits) and the pit half-axes by 1 - SUBTYPE_PIT u (fine lattices get relatively larger pits), leaving the class's
  arrangement (stretch, disorder, vessel mesh) as it is. One sub-type (S = 1) is the lesion unchanged.
  """
  if num_subtypes == 1:
    return lesion
  u = 2.0 * subtype / (num_subtypes - 1) - 1.0
  params = dict(lesion.params)
  params["rx"] *= 1.0 - SUBTYPE_PIT * u
  params["ry"] *= 1.0 - SUBTYPE_PIT * u
  return dataclasses.replace(lesion, period=lesion.period * SUBTYPE_PERIOD**u, params=params)


def _shortcut_cast(value: int, num_values: int) -> np.ndarray:
  """(3,) colour-cast gain offsets of nuisance value `value` of `num_values`: norm SHORTCUT_CAST, direction
  2 pi value / num_values in the plane of grey-free colour changes (orthogonal to (1, 1, 1))."""
  e1 = np.array([2.0, -1.0, -1.0]) / np.sqrt(6.0)
  e2 = np.array([0.0, 1.0, -1.0]) / np.sqrt(2.0)
  angle = 2 * np.pi * value / num_values
  return SHORTCUT_CAST * (np.cos(angle) * e1 + np.sin(angle) * e2)


def _draw_generic(rng: np.random.Generator, pattern: int) -> _Lesion:
  """A scene of the generic task: a lesion-like blob (the lesion task's scene) carrying generic pattern `pattern`."""
  lesion = _draw_lesion(rng, 0.0)
  return dataclasses.replace(lesion, generic=pattern, generic_params=rng.uniform(0.0, 1.0, 4))


def _lines(x: np.ndarray, width: float = 0.14) -> np.ndarray:
  """Thin lines at the integers of `x` (periodic Gaussian profile), values in [0, 1]."""
  return np.exp(-((x - np.round(x)) / width)**2)


def _generic_map(lesion: _Lesion, local: _Frame) -> np.ndarray:
  """Generic pattern `lesion.generic` in [0, 1] over a lesion-local frame (world units), (H, W).

  Period 0.055-0.095 of the image and orientation are random per scene (`generic_params`); the ten patterns are
  GENERIC_CLASSES in order.
  """
  a, b, c, _ = lesion.generic_params
  period = 0.055 + 0.04 * a
  lattice = local.map(_rotation(-np.pi * b) / period)
  px, py = lattice.coords()
  name = GENERIC_CLASSES[lesion.generic]
  if name == "stripes":
    return _lines(px, 0.2)
  if name == "checkerboard":
    return ((np.floor(px) + np.floor(py)) % 2).astype(np.float32)
  if name == "rings":
    return _lines(np.hypot(px, py))
  if name == "dots":
    return np.clip((0.3 - np.hypot(px - np.round(px), py - np.round(py))) / 0.08, 0.0, 1.0)
  if name == "crosshatch":
    return np.maximum(_lines(px), _lines(py))
  if name == "zigzag":
    triangle = np.abs(2.0 * (py / 2.0 - np.floor(py / 2.0 + 0.5)))
    return _lines(px + 0.8 * triangle)
  if name == "spokes":
    spokes = 8 + int(8 * c)
    return _lines(spokes * np.arctan2(py, px) / (2 * np.pi), 0.18)
  if name == "spots":
    field = _waves(_random_field(np.random.default_rng(int(c * 2**31)), 10, 0.5, 1.0), lattice)
    return _smoothstep(0.9, 1.4, field)
  if name == "waves":
    return _lines(px + 0.7 * np.sin(2 * np.pi * py / 3.0))
  if name == "bricks":
    row = np.floor(py)
    return np.maximum(_lines(py), _lines(px / 2.0 + 0.5 * (row % 2)))
  raise AssertionError(name)


# ---- rendering -----------------------------------------------------------------------------------
def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
  y = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
  return y * y * (3.0 - 2.0 * y)


@dataclasses.dataclass(frozen=True)
class _Frame:
  """Affine coordinates on a pixel grid: point(row r, col c) = origin + c * col_step + r * row_step.

  Every coordinate system of the renderer (camera, world, lesion, pit lattice) is affine in the
  pixel indices, which makes sums of plane waves separable (`_waves`).
  """

  origin: np.ndarray  # (2,)
  col_step: np.ndarray  # (2,)
  row_step: np.ndarray  # (2,)
  shape: tuple[int, int]  # (H, W)

  @classmethod
  def camera(cls, size: int) -> "_Frame":
    """Pixel centres in [0, 1]^2 (x to the right, y down)."""
    return cls(np.full(2, 0.5 / size), np.array([1.0 / size, 0.0]),
               np.array([0.0, 1.0 / size]), (size, size))

  def map(self, matrix: np.ndarray, offset: np.ndarray | float = 0.0) -> "_Frame":
    """The frame of coordinates `matrix @ p + offset`."""
    return _Frame(matrix @ self.origin + offset, matrix @ self.col_step, matrix @ self.row_step,
                  self.shape)

  def crop(self, r0: int, r1: int, c0: int, c1: int) -> "_Frame":
    return _Frame(self.origin + c0 * self.col_step + r0 * self.row_step, self.col_step,
                  self.row_step, (r1 - r0, c1 - c0))

  def coords(self) -> tuple[np.ndarray, np.ndarray]:
    """(x, y), each (H, W) float32."""
    rows = np.arange(self.shape[0], dtype=np.float32)[:, None]
    cols = np.arange(self.shape[1], dtype=np.float32)[None, :]
    x = self.origin[0] + cols * self.col_step[0] + rows * self.row_step[0]
    y = self.origin[1] + cols * self.col_step[1] + rows * self.row_step[1]
    return x.astype(np.float32), y.astype(np.float32)


def _rotation(angle: float) -> np.ndarray:
  c, s = np.cos(angle), np.sin(angle)
  return np.array([[c, -s], [s, c]])


def _waves(field: np.ndarray, frame: _Frame) -> np.ndarray:
  """Sum of plane waves `field` (K, 4) over `frame`, normalised to unit std, (H, W) float32.

  cos(2 pi f.(o + c u + r v) + phi) = Re(exp(i (2 pi f.v r + 2 pi f.o + phi)) exp(i 2 pi f.u c)):
  a (K, H) x (K, W) product instead of K full-size cosines.
  """
  freq, phase, amp = field[:, :2], field[:, 2], field[:, 3]
  rows = np.arange(frame.shape[0])
  cols = np.arange(frame.shape[1])
  along_cols = np.exp(1j * 2 * np.pi * np.outer(freq @ frame.col_step, cols))
  along_rows = np.exp(1j * (2 * np.pi * np.outer(freq @ frame.row_step, rows)
                            + (2 * np.pi * (freq @ frame.origin) + phase)[:, None]))
  along_rows = amp[:, None] * along_rows
  # Re(a b) = Re a Re b - Im a Im b; einsum's own loops (BLAS threads contend on busy machines).
  total = (np.einsum("kh,kw->hw", along_rows.real, along_cols.real)
           - np.einsum("kh,kw->hw", along_rows.imag, along_cols.imag))
  return (total / np.sqrt(0.5 * np.sum(amp**2))).astype(np.float32)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
  """Gaussian blur of an (H, W) or (H, W, C) array with std `sigma` pixels (FFT, periodic)."""
  if sigma <= 0:
    return image
  h, w = image.shape[:2]
  fy = np.fft.fftfreq(h)[:, None]
  fx = np.fft.rfftfreq(w)[None, :]
  transfer = np.exp(-2.0 * np.pi**2 * sigma**2 * (fx**2 + fy**2))
  if image.ndim == 3:
    transfer = transfer[..., None]
  spectrum = np.fft.rfft2(image, axes=(0, 1))
  return np.fft.irfft2(spectrum * transfer, s=(h, w), axes=(0, 1))


def _pit_pattern(lesion: _Lesion, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Pit map in [0, 1] at lattice coordinates (u along rows, v across), (H, W)."""
  p = lesion.params
  g = _CELL_TABLE
  iu = np.floor(u).astype(np.int64)
  iv = np.floor(v).astype(np.int64)
  out = np.zeros_like(u)
  for dv in (-1, 0, 1):
    cv = iv + dv
    row_offset = 0.5 * np.mod(cv, 2)  # Hexagonal / brick arrangement.
    for du in (-1, 0, 1):
      cu = iu + du
      iu_t, iv_t = np.mod(cu, g), np.mod(cv, g)
      jitter = lesion.cell_jitter[iu_t, iv_t]
      dx = u - (cu + 0.5 + row_offset + jitter[..., 0])
      dy = v - (cv + 0.5 + jitter[..., 1])
      ang = lesion.cell_angle[iu_t, iv_t]
      # Rotate in metric units (the lattice is stretched along u), then measure the ellipse.
      mx, my = dx * p["stretch"], dy
      ca, sa = np.cos(ang), np.sin(ang)
      ax, ay = ca * mx + sa * my, -sa * mx + ca * my
      size = lesion.cell_size[iu_t, iv_t]
      dist = np.sqrt((ax / (p["rx"] * p["stretch"] * size))**2 + (ay / (p["ry"] * size))**2)
      pit = np.clip((1.15 - dist) / 0.35, 0.0, 1.0) * lesion.cell_present[iu_t, iv_t]
      out = np.maximum(out, pit)
  return out


def _vessel_map(lesion: _Lesion, local: _Frame) -> np.ndarray:
  """Class pattern in [0, 1] (1 = vessel/pit) over a lesion-local frame (world units), (H, W)."""
  p = lesion.params
  lattice = local.map(_rotation(-lesion.pattern_angle) / lesion.period)  # Periods.
  px, py = lattice.coords()
  freq, phase, sign = lesion.warp
  u = (px + sign * p["warp"] * np.sin(2 * np.pi * freq * py + phase) * p["stretch"]) / p["stretch"]
  pattern = _pit_pattern(lesion, u, py)
  if p["network"] > 0:
    mesh = np.exp(-(_waves(lesion.network, lattice) / 0.3)**2)
    pattern = np.maximum(pattern, p["network"] * mesh)
  if p["amorph"] > 0:
    field = _waves(lesion.amorph, local.map(np.eye(2) / lesion.radius))
    blob = _smoothstep(0.4, 1.2, field)
    pattern = pattern * (1 - p["amorph"] * blob) + 0.45 * p["amorph"] * blob
  return pattern


def _render(lesion: _Lesion, view: _View, modality: str, rng: np.random.Generator,
            size: int, wli_contrast: float,
            cast: np.ndarray | None = None) -> tuple[np.ndarray, tuple[float, float, float]]:
  """Renders one image, (size, size, 3) uint8, and the lesion (centre x, centre y, radius) in px.

  `modality` is the palette and optics ("wli" or "nbi"); `cast` (3,) optional per-channel gain offsets of a colour
  cast applied to the scene before the camera's noise (`_shortcut_cast`).
  """
  camera = _Frame.camera(size)
  cx, cy = camera.coords()
  cx, cy = cx - 0.5, cy - 0.5
  to_world = _rotation(view.rotation) / view.zoom
  world = camera.map(to_world, 0.5 + view.shift - to_world @ np.full(2, 0.5))
  wx, wy = world.coords()

  # Mucosa: low-frequency texture and folds.
  palette = _PALETTE[modality]
  texture = _waves(lesion.background, world)
  mucosa = palette["mucosa"] * (1 + 0.06 * lesion.shade[0]) + lesion.brightness
  capillaries = np.exp(-(_waves(lesion.capillary, world) / 0.2)**2)
  texture = texture - (0.9 if modality == "nbi" else 0.4) * capillaries
  image = mucosa.astype(np.float32) * (1 + 0.07 * texture[..., None])
  for angle, offset, amp, freq, phase, curv, width in lesion.folds:
    a = np.cos(angle) * (wx - 0.5) + np.sin(angle) * (wy - 0.5)
    b = -np.sin(angle) * (wx - 0.5) + np.cos(angle) * (wy - 0.5)
    dist = b - (offset + amp * np.sin(freq * a + phase) + curv * a**2)
    band = np.exp(-(dist / width)**2)
    rim = np.exp(-((dist + 1.6 * width) / (0.8 * width))**2)
    image = image * (1 - 0.25 * band[..., None]) + 0.05 * rim[..., None]

  # Lesion: soft-edged blob with a perturbed elliptical boundary.
  local = world.map(np.eye(2), -lesion.center)
  ellipse = local.map(np.diag([1 / lesion.radius, 1 / (lesion.radius * lesion.aspect)])
                      @ _rotation(-lesion.angle))
  ex, ey = ellipse.coords()
  theta = np.arctan2(ey, ex)
  boundary = 1.0 + sum(amp * np.cos((k + 2) * theta + ph)
                       for k, (amp, ph) in enumerate(lesion.harmonics))
  rho = np.sqrt(ex**2 + ey**2) / boundary
  mask = 1.0 / (1.0 + np.exp(-(1.0 - rho) / lesion.edge))

  # Lesion location in pixels (world -> camera), and the class pattern inside its box only.
  center = np.linalg.solve(to_world, lesion.center - 0.5 - view.shift) + 0.5
  extent = lesion.radius * (1 + np.sum(lesion.harmonics[:, 0])) * view.zoom
  box = (float(center[0] * size), float(center[1] * size), float(extent * size))
  c0, c1 = (int(np.clip(np.floor(box[0] - box[2]) - 1, 0, size)),
            int(np.clip(np.ceil(box[0] + box[2]) + 2, 0, size)))
  r0, r1 = (int(np.clip(np.floor(box[1] - box[2]) - 1, 0, size)),
            int(np.clip(np.ceil(box[1] + box[2]) + 2, 0, size)))
  vessels = np.zeros((size, size), np.float32)
  if r1 > r0 and c1 > c0:
    inner = _smoothstep(0.95, 0.75, rho[r0:r1, c0:c1])
    crop = local.crop(r0, r1, c0, c1)
    pattern = _vessel_map(lesion, crop) if lesion.generic < 0 else _generic_map(lesion, crop)
    vessels[r0:r1, c0:c1] = pattern * inner * view.contrast

  lesion_col = (palette["lesion"] * (1 + 0.08 * lesion.shade[1]) + lesion.brightness)
  lesion_img = np.broadcast_to(lesion_col.astype(np.float32), image.shape)
  if modality == "nbi":
    k = np.clip(NBI_CONTRAST * vessels, 0, 1)[..., None]
    lesion_img = lesion_img * (1 - k) + palette["vessel"].astype(np.float32) * k
  else:
    soft = _gaussian_blur(vessels, WLI_BLUR * size).astype(np.float32)
    lesion_img = lesion_img * (1 - wli_contrast * soft[..., None]
                               * palette["vessel_tint"].astype(np.float32))
  # Raised lesion: a dome lit from `view.light`.
  dome = mask * np.sqrt(np.clip(1 - rho**2, 0, 1))
  gy, gx = np.gradient(dome)
  shading = 1 + lesion.height * size * lesion.radius * (gx * view.light[0] + gy * view.light[1])
  lesion_img = lesion_img * shading[..., None]
  image = image * (1 - mask[..., None]) + lesion_img * mask[..., None]
  if cast is not None:
    image = image * (1 + cast.astype(np.float32))

  # Camera: modality noise, lighting, vignetting, highlights, field of view.
  if modality == "wli":
    chroma = np.stack([_waves(_random_field(rng, 6, 0.5, 3.0), camera) for _ in range(3)], -1)
    image = image * np.array([1.04, 0.97, 0.97], np.float32) + WLI_CHROMA_NOISE * chroma
    image = image + WLI_NOISE * rng.standard_normal(image.shape, np.float32)
    lo, hi = WLI_HIGHLIGHTS
    max_sigma = 0.022
  else:
    image = image + NBI_NOISE * rng.standard_normal(image.shape, np.float32)
    lo, hi = NBI_HIGHLIGHTS
    max_sigma = 0.012
  r2 = (cx**2 + cy**2) / 0.25
  image = image * view.gain * (1 - view.vignette * r2)[..., None]
  # Specular highlights (camera space), about half of them on the raised lesion.
  num = int(rng.integers(lo, hi))
  spots = np.where(rng.uniform(size=(num, 1)) < 0.5,
                   center + rng.normal(0, 0.6 * extent, (num, 2)),
                   rng.uniform(0.15, 0.85, (num, 2)))
  sigmas = rng.uniform(0.003, max_sigma, num)
  axis = (np.arange(size) + 0.5) / size
  gx_ = np.exp(-(axis[None, :] - spots[:, 0, None])**2 / (2 * sigmas[:, None]**2))  # (N, W)
  gy_ = np.exp(-(axis[None, :] - spots[:, 1, None])**2 / (2 * sigmas[:, None]**2))  # (N, H)
  glare = np.clip(1.6 * np.einsum("nh,nw->hw", gy_, gx_), 0, 1).astype(np.float32)
  image = image + (1 - image) * glare[..., None]
  fov = 1.0 / (1.0 + np.exp(-(view.fov - np.sqrt(r2)) / 0.015))
  image = image * fov[..., None]
  pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
  return pixels, box


# ---- dataset -------------------------------------------------------------------------------------
def _png_bytes(pixels: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels, mode="RGB").save(buf, format="PNG", optimize=False, compress_level=6)
  return buf.getvalue()


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def read_lesion_columns(out: str | os.PathLike, parse, required: Sequence[str] = (), why_missing: str = "") -> dict:
  """{absolute (resolved) image path: parse(row)} over the rows of OUT/lesions.csv of a generated data set.

  `required`: columns the file must have (a file without one raises ValueError naming it, then `why_missing`); a row
  that `parse` cannot read raises ValueError naming the file and the row."""
  out = pathlib.Path(out).expanduser()
  path = out / LESIONS_NAME
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: {out} is not a generated synthetic data set.")
  table = {}
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    for column in required:
      if column not in (reader.fieldnames or ()):
        raise ValueError(f"{path} has no {column!r} column{': ' + why_missing if why_missing else ''}.")
    for row in reader:
      try:
        table[str((out / row["path"]).resolve())] = parse(row)
      except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: bad row {row} ({type(e).__name__}: {e}).") from e
  return table


def _check_args(classes: Sequence[str], image_size: int, lesions_per_class: int,
                images_per_lesion: int, paired_fraction: float) -> None:
  if len(classes) < 2:
    raise ValueError(f"synthetic data needs at least 2 classes, got {list(classes)}")
  if len(set(classes)) != len(classes):
    raise ValueError(f"duplicate class names in {list(classes)}")
  for name in classes:
    if not name or name in (".", "..") or "/" in name or "\\" in name or name != name.strip():
      raise ValueError(f"class name {name!r} cannot be used as a folder name")
  if image_size < 8:
    raise ValueError(f"image_size must be >= 8, got {image_size}")
  if lesions_per_class < 1:
    raise ValueError(f"lesions_per_class must be >= 1, got {lesions_per_class}")
  if images_per_lesion < 1:
    raise ValueError(f"images_per_lesion must be >= 1, got {images_per_lesion}")
  if not 0.0 <= paired_fraction <= 1.0:
    raise ValueError(f"paired_fraction must be in [0, 1], got {paired_fraction}")


# The regime options of `generate` and their defaults (today's data set). Only options set to another value are
# written to synthetic.json, so the parameters (and every file) of a default data set never change.
REGIME_DEFAULTS = {
    "task": "lesion",
    "wli_lesions_per_class": -1,
    "nbi_lesions_per_class": -1,
    "eval_lesions_per_class": 0,
    "shortcut_agreement": 0.0,
    "subtypes_per_class": 1,
}


def _regime(options: Mapping[str, Any]) -> dict[str, Any]:
  """The regime options, checked and normalised (None counts -> -1, None agreement -> 0)."""
  unknown = sorted(set(options) - set(REGIME_DEFAULTS))
  if unknown:
    raise ValueError(f"unknown synthetic option(s) {unknown}; known: {sorted(REGIME_DEFAULTS)}")
  regime = {**REGIME_DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
  if regime["task"] not in TASKS:
    raise ValueError(f"task must be one of {TASKS}, got {regime['task']!r}")
  for name in ("wli_lesions_per_class", "nbi_lesions_per_class"):
    regime[name] = int(regime[name])
    if regime[name] != -1 and regime[name] < 1:
      raise ValueError(f"{name} must be >= 1 (or -1: lesions_per_class), got {regime[name]}")
  regime["eval_lesions_per_class"] = int(regime["eval_lesions_per_class"])
  if regime["eval_lesions_per_class"] < 0:
    raise ValueError(f"eval_lesions_per_class must be >= 0, got {regime['eval_lesions_per_class']}")
  regime["shortcut_agreement"] = float(regime["shortcut_agreement"])
  if not 0.0 <= regime["shortcut_agreement"] <= 1.0:
    raise ValueError(f"shortcut_agreement must be in [0, 1] (0: no shortcut), got {regime['shortcut_agreement']}")
  if regime["shortcut_agreement"] > 0 and regime["eval_lesions_per_class"] == 0:
    raise ValueError("shortcut_agreement > 0 needs eval_lesions_per_class > 0: the shortcut is drawn in training "
                     "images only, so the generator must fix the split itself")
  regime["subtypes_per_class"] = int(regime["subtypes_per_class"])
  if regime["subtypes_per_class"] < 1:
    raise ValueError(f"subtypes_per_class must be >= 1, got {regime['subtypes_per_class']}")
  if regime["task"] == "generic":
    lesion_only = [k for k in REGIME_DEFAULTS if k != "task" and regime[k] != REGIME_DEFAULTS[k]]
    if lesion_only:
      raise ValueError(f"task='generic' takes none of the lesion task's options; got {lesion_only}")
  return regime


def _params(classes, image_size, lesions_per_class, images_per_lesion, paired_fraction, seed,
            wli_contrast, regime: Mapping[str, Any] | None = None) -> dict[str, Any]:
  params = {
      "generator_version": GENERATOR_VERSION,
      "classes": list(classes),
      "image_size": int(image_size),
      "lesions_per_class": int(lesions_per_class),
      "images_per_lesion": int(images_per_lesion),
      "paired_fraction": float(paired_fraction),
      "seed": int(seed),
      "wli_contrast": float(wli_contrast),
  }
  params.update({k: v for k, v in _regime(regime or {}).items() if v != REGIME_DEFAULTS[k]})
  return params


@dataclasses.dataclass(frozen=True)
class _Planned:
  """One lesion to be written: its class, random streams, modalities and what the regime gives it."""

  label: int
  key: tuple[int, ...]  # Its random streams are [seed, stream, *key, ...].
  modalities: tuple[str, ...]  # Listed in the manifest; each rendered in its own palette unless `palette`.
  lesion_id: str = ""
  patient_id: str = ""
  split: str = ""  # Fixed split ("" when the folds decide).
  subtype: int = 0
  nuisance: int = -1  # Shortcut value (colour cast) of its WLI views; -1: none.
  palette: str = ""  # Generic task: the palette ("wli" or "nbi") of all its views.


def _fold_plan(num_classes: int, num_wli: int, num_nbi: int, num_paired: int, seed: int, task: str,
               num_subtypes: int) -> list[_Planned]:
  """Lesions of a data set the folds split: per class, serials [0, P) paired, [P, N_nbi) NBI only,
  [N_nbi, N_nbi + N_wli - P) WLI only (generic task: N lesions listed as WLI, palettes alternating).
  Lesion ids are a seeded permutation; patients hold 1 or 2 lesions (generic task: no patients, every lesion its
  own split group)."""
  lesions = []
  for c in range(num_classes):
    if task == "generic":
      lesions += [_Planned(c, (c, s), ("wli",), palette=_MODALITIES[s % 2]) for s in range(num_wli)]
      continue
    for s in range(num_nbi + num_wli - num_paired):
      mods = _MODALITIES if s < num_paired else ("nbi",) if s < num_nbi else ("wli",)
      lesions.append(_Planned(c, (c, s), mods, subtype=s % num_subtypes))
  order = np.random.default_rng([seed, _STREAM_IDS]).permutation(len(lesions))
  lesion_ids = {}
  for new_index, i in enumerate(order):
    lesion_ids[i] = f"lesion{new_index:05d}"
  patient_ids = {}
  prng = np.random.default_rng([seed, _STREAM_PATIENTS])
  shuffled = prng.permutation(len(lesions))
  pos, patient = 0, 0
  while pos < len(shuffled):
    take = int(prng.integers(1, 3))
    for i in shuffled[pos:pos + take]:
      patient_ids[i] = f"patient{patient:05d}"
    pos += take
    patient += 1
  return [dataclasses.replace(p, lesion_id=lesion_ids[i], patient_id=patient_ids[i] if task == "lesion" else "")
          for i, p in enumerate(lesions)]


def _nuisance_values(split: str, label: int, count: int, num_classes: int, agreement: float,
                     rng: np.random.Generator) -> np.ndarray:
  """(count,) shortcut values of one class's WLI lesions of one split, in a seeded random order.

  Training: round(agreement * count) equal the label, the rest cycle through the other labels (so agreement 1 / C
  makes the values balanced, i.e. independent of the class). Validation and test: every value equally often
  (independent of the class when count is a multiple of C).
  """
  if split == "train":
    agree = int(round(agreement * count))
    others = [(label + 1 + i % (num_classes - 1)) % num_classes for i in range(count - agree)]
    values = np.array([label] * agree + others, dtype=np.int64)
  else:
    values = np.arange(count, dtype=np.int64) % num_classes
  return rng.permutation(values)


def _fixed_plan(num_classes: int, num_wli: int, num_nbi: int, num_eval: int, seed: int, agreement: float,
                num_subtypes: int) -> list[_Planned]:
  """Lesions of a data set with a fixed split: per class and modality, N_wli or N_nbi training lesions and
  `num_eval` validation and `num_eval` test lesions, all unpaired.

  A lesion's streams depend only on (class, split, modality, index), and lesion ids on (split, modality, index),
  so data sets that differ only in training counts or in the training agreement share their validation and test
  images byte for byte. Sub-type = index mod S. Patients are not simulated (every lesion its own group).
  """
  plan = []
  for split_index, split in enumerate(_SPLITS):
    for modality_index, modality in enumerate(_MODALITIES):
      count = num_eval if split != "train" else num_wli if modality == "wli" else num_nbi
      lesions = []
      for c in range(num_classes):
        nuisance = np.full(count, -1, dtype=np.int64)
        if modality == "wli" and agreement > 0:
          rng = np.random.default_rng([seed, _STREAM_NUISANCE, split_index, c])
          nuisance = _nuisance_values(split, c, count, num_classes, agreement, rng)
        lesions += [_Planned(c, (c, split_index, modality_index, j), (modality,), split=split,
                             subtype=j % num_subtypes, nuisance=int(nuisance[j])) for j in range(count)]
      order = np.random.default_rng([seed, _STREAM_IDS, split_index, modality_index]).permutation(len(lesions))
      plan += [dataclasses.replace(lesions[i], lesion_id=f"{modality}-{split}-{new_index:05d}")
               for new_index, i in enumerate(order)]
  return plan


def generate(out_dir: str | os.PathLike[str], *, classes: Sequence[str] = DEFAULT_CLASSES,
             image_size: int = 128, lesions_per_class: int = 40, images_per_lesion: int = 3,
             paired_fraction: float = 0.0, seed: int = 0,
             wli_contrast: float = WLI_CONTRAST, **regime: Any) -> pathlib.Path:
  """Writes a synthetic WLI/NBI dataset to `out_dir` and returns the path of its manifest.

  By default each class gets `lesions_per_class` lesions per modality, each seen in `images_per_lesion`
  views, so there are 2 * C * lesions_per_class * images_per_lesion images. The first
  round(paired_fraction * lesions_per_class) lesions of a class are shared by both modalities
  (paired); the others are independent lesions of one modality. Patients hold 1 or 2 lesions.

  Regime options (keyword arguments; their defaults, REGIME_DEFAULTS, give today's data set byte for byte):

  * `wli_lesions_per_class`, `nbi_lesions_per_class` (-1: `lesions_per_class`): modality imbalance, different
    lesions in the two modalities (the paired ones count in both).
  * `eval_lesions_per_class` (0: the folds of `splits.assign_splits` split every lesion): > 0 fixes the split in
    the generator: the counts above become the *training* lesions of each class, and every class gets this many
    further validation and test lesions per modality. The manifest then has a `split` column, used with
    `config.data.splits = "manifest"`. This is what lets few WLI training lesions (e.g. 12 per class) be scored
    on enough validation and test lesions (e.g. 30 per class) -- a K-fold split keeps train : val : test fixed
    at 64 : 16 : 20 -- and lets the generator know the training lesions (for the shortcut). Validation and test
    lesions do not depend on the training counts or agreement: an oracle data set with more training lesions
    shares its test images with the regime's, byte for byte.
  * `shortcut_agreement` (0: off; needs a fixed split): WLI images carry a nuisance, a colour cast with one of C
    values (`_shortcut_cast`) per lesion. In training lesions it equals the class for round(agreement * n) of a
    class's n lesions, in validation and test every value is equally frequent in every class (independent of
    it); NBI images have none. Agreement 1 / C puts the same casts in training, independent of the class.
  * `subtypes_per_class` (1): pattern variants of each class (`_with_subtype`), sub-type = lesion index mod S,
    so every class and split mixes them.
  * `task` ("lesion"): "generic" draws instead GENERIC_CLASSES[c] (`_generic_map`) for class c on the same
    scenes, `lesions_per_class` lesions per class, every image listed as modality "wli" (train it with stage
    "baseline"), the lesions alternately drawn in the WLI and the NBI palette and optics; folds split it.

  With any regime option set, lesions.csv also lists each image's palette, sub-type and nuisance value (-1: none).

  Args:
    out_dir: output folder (created). An existing manifest is removed first, so a folder whose
      regeneration is interrupted is never taken as complete; when the folder held an earlier
      synthetic dataset, its images that the new one does not list are deleted.
    classes: class names, in label order; class c gets pattern position t = c / (C - 1).
    image_size: side of the square images, pixels.
    lesions_per_class: lesions per class and modality.
    images_per_lesion: views per lesion (small pose and lighting changes).
    paired_fraction: fraction of each class's lesions rendered in both modalities.
    seed: the only source of randomness; same arguments give the same bytes.
    wli_contrast: visibility of the class pattern in WLI (the cross-modal gap).
    **regime: the regime options above.

  Returns:
    `out_dir/manifest.csv`.
  """
  classes = tuple(classes)
  _check_args(classes, image_size, lesions_per_class, images_per_lesion, paired_fraction)
  options = _regime(regime)
  task, num_eval = options["task"], options["eval_lesions_per_class"]
  if task == "generic" and len(classes) > len(GENERIC_CLASSES):
    raise ValueError(f"task='generic' has {len(GENERIC_CLASSES)} pattern classes, got {len(classes)} class names")
  if num_eval > 0 and paired_fraction > 0:
    raise ValueError("paired_fraction > 0 needs eval_lesions_per_class = 0 (a fixed split draws unpaired lesions)")
  extended = any(options[k] != REGIME_DEFAULTS[k] for k in REGIME_DEFAULTS)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  manifest_path = out / MANIFEST_NAME
  previous_run = (out / PARAMS_NAME).exists()
  for stale in (manifest_path, out / PARAMS_NAME, out / LESIONS_NAME):
    stale.unlink(missing_ok=True)

  num_classes = len(classes)
  num_wli, num_nbi = (lesions_per_class if options[name] == -1 else options[name]
                      for name in ("wli_lesions_per_class", "nbi_lesions_per_class"))
  num_subtypes = options["subtypes_per_class"]
  if num_eval > 0:
    plan = _fixed_plan(num_classes, num_wli, num_nbi, num_eval, seed, options["shortcut_agreement"], num_subtypes)
  else:
    num_paired = int(round(paired_fraction * min(num_wli, num_nbi)))
    plan = _fold_plan(num_classes, num_wli, num_nbi, num_paired, seed, task, num_subtypes)

  def write_lesion(item: _Planned) -> list[tuple[tuple[str, ...], ...]]:
    c = item.label
    rng = np.random.default_rng([seed, _STREAM_LESION, *item.key])
    if task == "generic":
      lesion = _draw_generic(rng, c)
    else:
      lesion = _with_subtype(_draw_lesion(rng, c / (num_classes - 1)), item.subtype, num_subtypes)
    cast = None if item.nuisance < 0 else _shortcut_cast(item.nuisance, num_classes)
    written = []
    for k in range(images_per_lesion):
      view = _draw_view(np.random.default_rng([seed, _STREAM_VIEW, *item.key, k]))
      for modality in item.modalities:
        rng = np.random.default_rng([seed, _STREAM_IMAGE, *item.key, k, _MODALITIES.index(modality)])
        palette = item.palette or modality
        pixels, box = _render(lesion, view, palette, rng, image_size, wli_contrast,
                              cast if modality == "wli" else None)
        rel = f"{modality}/{classes[c]}/{item.lesion_id}__{k}.png"
        _atomic_write(out / rel, _png_bytes(pixels))
        pair_id = f"{item.lesion_id}__{k}" if len(item.modalities) == 2 else ""
        row = (rel, modality, classes[c], item.lesion_id, item.patient_id, pair_id)
        where = (rel, *(f"{x:.2f}" for x in box))
        if num_eval > 0:
          row += (item.split,)
        if extended:
          where += (palette, str(item.subtype), str(item.nuisance if modality == "wli" else -1))
        written.append((row, where))
    return written

  # Lesions are independent (own random streams), so threads change nothing in the output; NumPy
  # and PNG encoding release the GIL for most of the work.
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
    results = list(pool.map(write_lesion, plan))
  rows = sorted(row for written in results for row, _ in written)
  boxes = sorted(box for written in results for _, box in written)
  if previous_run:  # Regenerating our own folder: drop images of the earlier run.
    keep = {row[0] for row in rows}
    for modality in _MODALITIES:
      for old in (out / modality).glob("*/*.png"):
        if old.relative_to(out).as_posix() not in keep:
          old.unlink()

  params = _params(classes, image_size, lesions_per_class, images_per_lesion, paired_fraction,
                   seed, wli_contrast, options)
  _atomic_write(out / PARAMS_NAME, (json.dumps(params, indent=2) + "\n").encode())
  box_columns = ("path", "center_x", "center_y", "radius") + (("palette", "subtype", "nuisance") if extended else ())
  _atomic_write(out / LESIONS_NAME, _csv_bytes(box_columns, boxes))
  _atomic_write(manifest_path, _csv_bytes(MANIFEST_COLUMNS + (("split",) if num_eval > 0 else ()), rows))
  return manifest_path


def _csv_bytes(header: Sequence[str], rows: Sequence[Sequence[str]]) -> bytes:
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(header)
  writer.writerows(rows)
  return buf.getvalue().encode()


def ensure_generated(data_config: Mapping[str, Any] | Any) -> pathlib.Path | None:
  """Generates the synthetic dataset a data config asks for, once; returns its manifest path.

  Reads `data_config.synthetic.{enabled,out,image_size,lesions_per_class,images_per_lesion,
  paired_fraction,seed,wli_contrast}`, the regime options (REGIME_DEFAULTS), `data_config.classes` and
  `data_config.splits`. Returns None when synthetic data is disabled.
  An existing complete folder (its manifest exists) is reused when its `synthetic.json` matches
  the requested parameters; a mismatch raises ValueError rather than mixing datasets.
  """
  syn = data_config.synthetic
  if not syn.enabled:
    return None
  if not syn.out:
    raise ValueError("data.synthetic.out is empty: set the folder for the synthetic dataset")
  out = pathlib.Path(syn.out).expanduser()
  classes = tuple(data_config.classes)
  regime = {name: syn.get(name, default) for name, default in REGIME_DEFAULTS.items()}
  wli_contrast = float(syn.get("wli_contrast", WLI_CONTRAST))
  wanted = _params(classes, syn.image_size, syn.lesions_per_class, syn.images_per_lesion,
                   syn.paired_fraction, syn.seed, wli_contrast, regime)
  fixed_split = wanted.get("eval_lesions_per_class", 0) > 0
  splits_mode = data_config.get("splits", "folds")
  if fixed_split != (splits_mode == "manifest"):
    raise ValueError(
        f"data.synthetic.eval_lesions_per_class={wanted.get('eval_lesions_per_class', 0)} with "
        f"data.splits={splits_mode!r}: a synthetic data set fixes its split (eval_lesions_per_class > 0) exactly "
        "when data.splits is 'manifest'")
  manifest = out / MANIFEST_NAME
  out.mkdir(parents=True, exist_ok=True)
  # Several processes (hosts, workers) may start at once: one generates, the others wait and reuse.
  with open(out / ".generate.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if manifest.exists():
      params_path = out / PARAMS_NAME
      try:
        found = json.loads(params_path.read_text())
      except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{params_path}: missing or unreadable ({e}); delete {out} to "
                         "regenerate") from e
      if found != wanted:
        diff = {k: (found.get(k), wanted.get(k)) for k in sorted(set(wanted) | set(found))
                if found.get(k) != wanted.get(k)}
        raise ValueError(f"{out} holds a synthetic dataset generated with other parameters "
                         f"(found, wanted): {diff}; delete it or change data.synthetic.out")
      return manifest
    return generate(out, classes=classes, image_size=syn.image_size,
                    lesions_per_class=syn.lesions_per_class,
                    images_per_lesion=syn.images_per_lesion,
                    paired_fraction=syn.paired_fraction, seed=syn.seed, wli_contrast=wli_contrast, **regime)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--classes", default=",".join(DEFAULT_CLASSES),
                      help="comma-separated class names, in label order")
  parser.add_argument("--image_size", type=int, default=128)
  parser.add_argument("--lesions_per_class", type=int, default=40)
  parser.add_argument("--images_per_lesion", type=int, default=3)
  parser.add_argument("--paired_fraction", type=float, default=0.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--wli_contrast", type=float, default=WLI_CONTRAST)
  parser.add_argument("--task", default="lesion", choices=TASKS)
  for name in ("wli_lesions_per_class", "nbi_lesions_per_class", "eval_lesions_per_class", "subtypes_per_class"):
    parser.add_argument(f"--{name}", type=int, default=REGIME_DEFAULTS[name])
  parser.add_argument("--shortcut_agreement", type=float, default=0.0)
  args = parser.parse_args(argv)
  manifest = generate(args.out, classes=[c.strip() for c in args.classes.split(",")],
                      image_size=args.image_size, lesions_per_class=args.lesions_per_class,
                      images_per_lesion=args.images_per_lesion,
                      paired_fraction=args.paired_fraction, seed=args.seed,
                      wli_contrast=args.wli_contrast, **{k: getattr(args, k) for k in REGIME_DEFAULTS})
  print(manifest)


if __name__ == "__main__":
  main()
