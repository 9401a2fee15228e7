"""Tests of the synthetic WLI/NBI dataset generator (`pagkd_jax.data.synthetic`)."""

import csv
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from pagkd_jax import base_config
from pagkd_jax.data import manifest as manifest_lib
from pagkd_jax.data import synthetic

CLASSES = synthetic.DEFAULT_CLASSES
TINY = dict(image_size=16, lesions_per_class=2, images_per_lesion=2)


def _rows(manifest_path: pathlib.Path) -> list[dict[str, str]]:
  with open(manifest_path, newline="") as f:
    return list(csv.DictReader(f))


def _all_files(root: pathlib.Path) -> dict[str, bytes]:
  return {p.relative_to(root).as_posix(): p.read_bytes()
          for p in sorted(root.rglob("*")) if p.is_file()}


# ---- numerical building blocks against slow references ------------------------------------------
def test_frame_coords_and_waves_match_direct_evaluation():
  frame = synthetic._Frame.camera(7).map(synthetic._rotation(0.3) * 1.7, np.array([0.2, -0.1]))
  frame = frame.crop(1, 6, 2, 7)
  field = synthetic._random_field(np.random.default_rng(1), 5, 0.5, 3.0)
  x, y = frame.coords()
  expected_x = np.zeros((5, 5))
  expected_y = np.zeros((5, 5))
  expected = np.zeros((5, 5))
  for r in range(5):
    for c in range(5):
      # Pixel centre of row 1 + r, column 2 + c of a 7-pixel camera, rotated and scaled.
      px, py = (2 + c + 0.5) / 7, (1 + r + 0.5) / 7
      cos, sin = np.cos(0.3), np.sin(0.3)
      wx = 1.7 * (cos * px - sin * py) + 0.2
      wy = 1.7 * (sin * px + cos * py) - 0.1
      expected_x[r, c], expected_y[r, c] = wx, wy
      total = 0.0
      for fx, fy, phase, amp in field:
        total += amp * np.cos(2 * np.pi * (fx * wx + fy * wy) + phase)
      expected[r, c] = total / np.sqrt(0.5 * np.sum(field[:, 3]**2))
  np.testing.assert_allclose(x, expected_x, atol=1e-6)
  np.testing.assert_allclose(y, expected_y, atol=1e-6)
  np.testing.assert_allclose(synthetic._waves(field, frame), expected, atol=1e-5)


def test_gaussian_blur_is_periodic_gaussian_convolution():
  rng = np.random.default_rng(0)
  image = rng.uniform(size=(12, 10, 2))
  sigma = 2.0
  expected = np.zeros_like(image)
  h, w = image.shape[:2]
  for r in range(h):
    for c in range(w):
      for rr in range(h):
        for cc in range(w):
          weight = 0.0
          for n in range(-3, 4):  # Periodic images of the Gaussian.
            for m in range(-3, 4):
              dy, dx = r - rr + n * h, c - cc + m * w
              weight += np.exp(-(dx * dx + dy * dy) / (2 * sigma**2)) / (2 * np.pi * sigma**2)
          expected[r, c] += weight * image[rr, cc]
  np.testing.assert_allclose(synthetic._gaussian_blur(image, sigma), expected, atol=1e-6)


def test_class_changes_only_pixels_inside_the_lesion():
  """Same lesion/view/image streams, different class: only the pattern inside the lesion differs."""
  size = 64
  for modality in ("nbi", "wli"):
    images, boxes = [], []
    for t in (0.0, 0.5, 1.0):
      lesion = synthetic._draw_lesion(np.random.default_rng([3, 1]), t)
      view = synthetic._draw_view(np.random.default_rng([3, 2]))
      pixels, box = synthetic._render(lesion, view, modality, np.random.default_rng([3, 3]), size,
                                      synthetic.WLI_CONTRAST)
      images.append(pixels.astype(int))
      boxes.append(box)
    assert boxes[0] == boxes[1] == boxes[2]
    cx, cy, radius = boxes[0]
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    # Outside the lesion (plus a margin for the WLI blur), the images are identical.
    outside = np.hypot(xx - cx, yy - cy) > radius + 3
    inside = np.hypot(xx - cx, yy - cy) < 0.6 * radius
    assert outside.sum() > 0.3 * size * size
    for other in images[1:]:
      assert np.array_equal(images[0][outside], other[outside])
      assert np.abs(images[0][inside] - other[inside]).mean() > 1.0


# ---- the written dataset -------------------------------------------------------------------------
def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
  a = synthetic.generate(tmp_path / "a", seed=5, **TINY).parent
  b = synthetic.generate(tmp_path / "b", seed=5, **TINY).parent
  c = synthetic.generate(tmp_path / "c", seed=6, **TINY).parent
  files_a, files_b, files_c = _all_files(a), _all_files(b), _all_files(c)
  assert files_a == files_b
  images_a = {k: v for k, v in files_a.items() if k.endswith(".png")}
  images_c = {k: v for k, v in files_c.items() if k.endswith(".png")}
  assert len(images_a) == len(images_c) == 2 * 3 * 2 * 2
  assert set(images_a.values()).isdisjoint(images_c.values())


def test_manifest_columns_counts_and_files(tmp_path):
  manifest = synthetic.generate(tmp_path, classes=CLASSES, image_size=24, lesions_per_class=3,
                                images_per_lesion=2)
  assert manifest == tmp_path / "manifest.csv"
  with open(manifest, newline="") as f:
    header = next(csv.reader(f))
  assert header == ["path", "modality", "label", "lesion_id", "patient_id", "pair_id"]
  rows = _rows(manifest)
  assert len(rows) == 2 * 3 * 3 * 2
  for modality in ("wli", "nbi"):
    for name in CLASSES:
      sel = [r for r in rows if r["modality"] == modality and r["label"] == name]
      assert len(sel) == 3 * 2
      assert len({r["lesion_id"] for r in sel}) == 3
  for row in rows:
    assert row["path"] == f"{row['modality']}/{row['label']}/{row['lesion_id']}__" \
        f"{row['path'].rsplit('__', 1)[1]}"
    with Image.open(tmp_path / row["path"]) as image:
      assert image.format == "PNG"
      assert image.mode == "RGB"
      assert image.size == (24, 24)
  params = json.loads((tmp_path / "synthetic.json").read_text())
  assert params["image_size"] == 24 and params["classes"] == list(CLASSES)
  with open(tmp_path / "lesions.csv", newline="") as f:
    boxes = list(csv.DictReader(f))
  assert sorted(b["path"] for b in boxes) == sorted(r["path"] for r in rows)


def test_modalities_use_independent_lesions_and_patients_group_lesions(tmp_path):
  rows = _rows(synthetic.generate(tmp_path, lesions_per_class=5, image_size=16,
                                  images_per_lesion=1))
  wli = {r["lesion_id"] for r in rows if r["modality"] == "wli"}
  nbi = {r["lesion_id"] for r in rows if r["modality"] == "nbi"}
  assert len(wli) == len(nbi) == 15
  assert wli.isdisjoint(nbi)
  assert all(r["pair_id"] == "" for r in rows)
  lesions_of_patient = {}
  patient_of_lesion = {}
  for r in rows:
    lesions_of_patient.setdefault(r["patient_id"], set()).add(r["lesion_id"])
    assert patient_of_lesion.setdefault(r["lesion_id"], r["patient_id"]) == r["patient_id"]
  assert all(1 <= len(v) <= 2 for v in lesions_of_patient.values())
  assert any(len(v) == 2 for v in lesions_of_patient.values())


def test_paired_subset_shares_lesion_pair_ids_and_pose(tmp_path):
  manifest = synthetic.generate(tmp_path, lesions_per_class=4, image_size=32, images_per_lesion=2,
                                paired_fraction=0.5)
  rows = _rows(manifest)
  with open(tmp_path / "lesions.csv", newline="") as f:
    boxes = {b["path"]: b for b in csv.DictReader(f)}
  wli = {r["lesion_id"] for r in rows if r["modality"] == "wli"}
  nbi = {r["lesion_id"] for r in rows if r["modality"] == "nbi"}
  shared = wli & nbi
  assert len(wli) == len(nbi) == 12
  assert len(shared) == 3 * 2  # round(0.5 * 4) paired lesions per class.
  for modality in ("wli", "nbi"):
    pair_ids = [r["pair_id"] for r in rows if r["modality"] == modality and r["pair_id"]]
    assert len(pair_ids) == len(set(pair_ids)) == 6 * 2
  by_pair = {}
  for r in rows:
    assert bool(r["pair_id"]) == (r["lesion_id"] in shared)
    if r["pair_id"]:
      by_pair.setdefault(r["pair_id"], []).append(r)
  for members in by_pair.values():
    assert sorted(m["modality"] for m in members) == ["nbi", "wli"]
    assert len({(m["lesion_id"], m["label"], m["patient_id"]) for m in members}) == 1
    # A pair is the same view of the lesion: same place in both images.
    first, second = (boxes[m["path"]] for m in members)
    assert first == {**second, "path": first["path"]}


def test_project_readers_accept_manifest_and_folder(tmp_path):
  manifest = synthetic.generate(tmp_path, paired_fraction=0.5, **TINY)
  records = manifest_lib.read_manifest(manifest, CLASSES)
  rows = _rows(manifest)
  assert len(records) == len(rows)
  assert {(r.modality, CLASSES[r.label], r.lesion_id) for r in records} == {
      (r["modality"], r["label"], r["lesion_id"]) for r in rows}
  folder = manifest_lib.records_from_folder(tmp_path, CLASSES)
  assert sorted((r.path, r.label, r.lesion_id, r.pair_id) for r in folder) == sorted(
      (r.path, r.label, r.lesion_id, r.pair_id) for r in records)
  assert any(r.pair_id for r in folder)  # The folder layout names the pairs as the manifest does.


@pytest.mark.parametrize("classes", [("benign", "malignant"), ("a", "b", "c", "d")])
def test_any_number_of_classes(tmp_path, classes):
  rows = _rows(synthetic.generate(tmp_path, classes=classes, **TINY))
  assert sorted({r["label"] for r in rows}) == sorted(classes)
  assert len(rows) == 2 * len(classes) * 2 * 2


def test_regeneration_replaces_the_previous_run(tmp_path):
  synthetic.generate(tmp_path, lesions_per_class=3, image_size=16, images_per_lesion=1)
  manifest = synthetic.generate(tmp_path, lesions_per_class=1, image_size=16, images_per_lesion=1)
  listed = {r["path"] for r in _rows(manifest)}
  on_disk = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")}
  assert on_disk == listed and len(listed) == 6


@pytest.mark.parametrize("kwargs, match", [
    (dict(paired_fraction=1.5), "paired_fraction"),
    (dict(classes=("a", "a")), "duplicate"),
    (dict(classes=("a",)), "at least 2"),
    (dict(classes=("a", "b/c")), "b/c"),
    (dict(image_size=4), "image_size"),
    (dict(lesions_per_class=0), "lesions_per_class"),
    (dict(images_per_lesion=0), "images_per_lesion"),
])
def test_bad_arguments(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    synthetic.generate(tmp_path, **kwargs)
  assert not (tmp_path / "manifest.csv").exists()


def test_cli_writes_dataset(tmp_path, capsys):
  synthetic.main(["--out", str(tmp_path), "--image_size", "16", "--lesions_per_class", "1",
                  "--images_per_lesion", "1", "--classes", "x,y", "--seed", "3"])
  assert capsys.readouterr().out.strip() == str(tmp_path / "manifest.csv")
  rows = _rows(tmp_path / "manifest.csv")
  assert len(rows) == 4 and {r["label"] for r in rows} == {"x", "y"}
  assert json.loads((tmp_path / "synthetic.json").read_text())["seed"] == 3


def test_ensure_generated_generates_once_and_reuses(tmp_path, monkeypatch):
  data = base_config.get_config().data
  assert synthetic.ensure_generated(data) is None  # Disabled by default.
  data.synthetic.enabled = True
  with pytest.raises(ValueError, match="synthetic.out"):
    synthetic.ensure_generated(data)
  data.synthetic.out = str(tmp_path / "syn")
  data.synthetic.image_size = 16
  data.synthetic.lesions_per_class = 2
  data.synthetic.images_per_lesion = 1
  manifest = synthetic.ensure_generated(data)
  assert manifest == tmp_path / "syn" / "manifest.csv" and manifest.exists()
  before = _all_files(tmp_path / "syn")
  assert len(_rows(manifest)) == 2 * 3 * 2

  def fail(*args, **kwargs):
    raise AssertionError("generate() called although the dataset exists")

  monkeypatch.setattr(synthetic, "generate", fail)
  assert synthetic.ensure_generated(data) == manifest
  assert _all_files(tmp_path / "syn") == before
  data.synthetic.seed = 1
  with pytest.raises(ValueError, match="seed"):
    synthetic.ensure_generated(data)


# ---- the cross-modal gap -------------------------------------------------------------------------
def _texture_features(image: np.ndarray, cx: float, cy: float, radius: float) -> np.ndarray:
  """Contrast-invariant texture features of the lesion centre: orientation coherence, spectral
  peakiness (regular lattices have sharp peaks) and kurtosis of the high-passed grey levels."""
  grey = image.astype(np.float64).mean(-1)
  half = max(int(0.7 * radius), 4)
  x0, y0 = int(round(cx)), int(round(cy))
  crop = grey[max(y0 - half, 0):y0 + half, max(x0 - half, 0):x0 + half]
  crop = crop - crop.mean()
  h, w = crop.shape
  padded = np.pad(crop, 1, mode="edge")
  local_mean = sum(padded[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9
  high = crop - local_mean
  gy, gx = np.gradient(crop)
  jxx, jxy, jyy = (gx * gx).mean(), (gx * gy).mean(), (gy * gy).mean()
  coherence = np.sqrt((jxx - jyy)**2 + 4 * jxy**2) / (jxx + jyy + 1e-9)
  window = np.hanning(h)[:, None] * np.hanning(w)[None, :]
  power = np.abs(np.fft.fft2(crop * window))**2
  power[0, 0] = 0.0
  peakiness = np.sort(power.ravel())[-4:].sum() / power.sum()
  kurtosis = (high**4).mean() / ((high**2).mean()**2 + 1e-12)
  return np.array([coherence, peakiness, kurtosis])


def _leave_one_out_nearest_centroid(features: np.ndarray, labels: np.ndarray) -> float:
  features = (features - features.mean(0)) / (features.std(0) + 1e-12)
  correct = 0
  for i in range(len(labels)):
    rest = np.arange(len(labels)) != i
    distances = {c: np.sum((features[i] - features[rest & (labels == c)].mean(0))**2)
                 for c in np.unique(labels)}
    correct += min(distances, key=distances.get) == labels[i]
  return correct / len(labels)


def test_class_signal_is_stronger_in_nbi_than_in_wli(tmp_path):
  manifest = synthetic.generate(tmp_path, image_size=96, lesions_per_class=12, images_per_lesion=1,
                                seed=0)
  rows = _rows(manifest)
  with open(tmp_path / "lesions.csv", newline="") as f:
    boxes = {b["path"]: b for b in csv.DictReader(f)}
  accuracy = {}
  for modality in ("nbi", "wli"):
    sel = [r for r in rows if r["modality"] == modality]
    features = np.stack([
        _texture_features(np.asarray(Image.open(tmp_path / r["path"])),
                          *(float(boxes[r["path"]][k]) for k in ("center_x", "center_y", "radius")))
        for r in sel])
    labels = np.array([CLASSES.index(r["label"]) for r in sel])
    accuracy[modality] = _leave_one_out_nearest_centroid(features, labels)
  # Chance is 1/3. NBI texture is readable by hand-made features; WLI much less so.
  assert accuracy["nbi"] >= 0.7, accuracy
  assert accuracy["nbi"] >= accuracy["wli"] + 0.15, accuracy
