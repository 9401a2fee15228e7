"""The synthetic generator's regime options (modality imbalance, fixed split, WLI shortcut, sub-types, generic
task), the manifest split mode and the configs/transfer.py presets, measured on generated images."""

import collections
import csv
import hashlib
import importlib.util
import pathlib

import numpy as np
import pytest
from PIL import Image

from pagkd_jax import base_config
from pagkd_jax.data import manifest as manifest_lib
from pagkd_jax.data import splits as splits_lib
from pagkd_jax.data import synthetic

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASSES = synthetic.DEFAULT_CLASSES


def _rows(path: pathlib.Path) -> list[dict[str, str]]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _digest(root: pathlib.Path) -> str:
  """SHA-256 over every file's name and content, PNGs by their decoded pixels (independent of zlib's version)."""
  h = hashlib.sha256()
  for p in sorted(root.rglob("*")):
    if not p.is_file() or p.name.startswith("."):
      continue
    h.update(p.relative_to(root).as_posix().encode())
    h.update(np.asarray(Image.open(p)).tobytes() if p.suffix == ".png" else p.read_bytes())
  return h.hexdigest()


def _preset(arg=None):
  spec = importlib.util.spec_from_file_location("transfer_preset", REPO_ROOT / "configs" / "transfer.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, module.get_config(arg)


# ---- defaults: today's data set ------------------------------------------------------------------
# Digests of data sets written by the generator before the regime options existed (same arguments).
_BEFORE = {
    "a": "f28f0b96ab67439212546dffca7cef2040a43adee66dc205ed0207bf495a630e",
    "b": "4115aaa5d36c276fc55dced643f25c8b60f4cbc895185d2971af49f1ca4628d1",
}


@pytest.mark.parametrize("explicit_defaults", [False, True])
def test_default_data_set_is_unchanged(tmp_path, explicit_defaults):
  regime = dict(synthetic.REGIME_DEFAULTS) if explicit_defaults else {}
  synthetic.generate(tmp_path / "a", image_size=24, lesions_per_class=3, images_per_lesion=2, paired_fraction=0.34,
                     seed=7, **regime)
  synthetic.generate(tmp_path / "b", classes=("x", "y"), image_size=16, lesions_per_class=2, images_per_lesion=1,
                     seed=0, **regime)
  assert _digest(tmp_path / "a") == _BEFORE["a"]
  assert _digest(tmp_path / "b") == _BEFORE["b"]


def test_config_defaults_are_the_generator_defaults():
  config = base_config.get_config()
  syn = config.data.synthetic
  assert {k: syn[k] for k in synthetic.REGIME_DEFAULTS} == synthetic.REGIME_DEFAULTS
  assert syn.wli_contrast == synthetic.WLI_CONTRAST
  assert config.data.splits == "folds"


# ---- modality imbalance and the fixed split --------------------------------------------------------
def test_modality_imbalance_with_folds(tmp_path):
  rows = _rows(synthetic.generate(tmp_path, image_size=16, images_per_lesion=1, wli_lesions_per_class=2,
                                  nbi_lesions_per_class=5, paired_fraction=0.5))
  for name in CLASSES:
    wli = {r["lesion_id"] for r in rows if r["modality"] == "wli" and r["label"] == name}
    nbi = {r["lesion_id"] for r in rows if r["modality"] == "nbi" and r["label"] == name}
    assert len(wli) == 2 and len(nbi) == 5
    assert len(wli & nbi) == 1  # round(0.5 * min(2, 5)) paired lesions.
  assert "split" not in rows[0]


def test_fixed_split_counts_and_manifest_split_mode(tmp_path):
  manifest = synthetic.generate(tmp_path, image_size=16, images_per_lesion=2, wli_lesions_per_class=2,
                                nbi_lesions_per_class=4, eval_lesions_per_class=3)
  rows = _rows(manifest)
  lesions = collections.defaultdict(set)
  for r in rows:
    lesions[(r["modality"], r["split"], r["label"])].add(r["lesion_id"])
    assert r["lesion_id"].startswith(f"{r['modality']}-{r['split']}-") and r["pair_id"] == "" == r["patient_id"]
  expected = {"wli": {"train": 2, "val": 3, "test": 3}, "nbi": {"train": 4, "val": 3, "test": 3}}
  assert {k: len(v) for k, v in lesions.items()} == {
      (m, s, c): n for m, per_split in expected.items() for s, n in per_split.items() for c in CLASSES}
  all_ids = [i for v in lesions.values() for i in v]
  assert len(all_ids) == len(set(all_ids))  # Unpaired: no lesion in two modalities, splits or classes.

  data = base_config.get_config().data
  records = manifest_lib.read_manifest(manifest, CLASSES)
  by_path = {str((tmp_path / r["path"]).resolve()): r["split"] for r in rows}
  assert [r.split for r in records] == [by_path[r.path] for r in records]
  data.splits = "manifest"
  assert splits_lib.split_records(records, data) == [by_path[r.path] for r in records]
  data.splits = "folds"  # The folds ignore the column.
  folds = splits_lib.split_records(records, data)
  assert folds == splits_lib.assign_splits(records, num_folds=5, fold=0, val_fraction=0.2, seed=0)


def test_manifest_split_mode_errors(tmp_path):
  manifest = synthetic.generate(tmp_path, image_size=16, images_per_lesion=2, lesions_per_class=2)
  records = manifest_lib.read_manifest(manifest, CLASSES)
  data = base_config.get_config().data
  data.splits = "manifest"
  with pytest.raises(ValueError, match="split column"):
    splits_lib.split_records(records, data)
  first = records[0]
  mixed = [r.__class__(**{**r.__dict__, "split": "train"}) for r in records]
  twin = next(i for i, r in enumerate(mixed) if r.group_key == first.group_key and r.path != first.path)
  mixed[twin] = mixed[twin].__class__(**{**mixed[twin].__dict__, "split": "test"})
  with pytest.raises(ValueError, match="spans splits"):
    splits_lib.split_records(mixed, data)
  data.splits = "kfold"
  with pytest.raises(ValueError, match="data.splits"):
    splits_lib.split_records(records, data)
  bad = tmp_path / "bad.csv"
  bad.write_text("path,modality,label,lesion_id,split\n"
                 f"{next((tmp_path / 'wli').rglob('*.png'))},wli,adenoma,L1,training\n")
  with pytest.raises(manifest_lib.ManifestError, match="unknown split 'training'"):
    manifest_lib.read_manifest(bad, CLASSES)


def test_oracle_and_regime_share_their_evaluation_images(tmp_path):
  common = dict(image_size=16, images_per_lesion=2, nbi_lesions_per_class=2, eval_lesions_per_class=3,
                subtypes_per_class=3, seed=4)
  regime = synthetic.generate(tmp_path / "regime", wli_lesions_per_class=2, shortcut_agreement=0.9, **common)
  oracle = synthetic.generate(tmp_path / "oracle", wli_lesions_per_class=20, shortcut_agreement=1 / 3, **common)

  def files(manifest, split):
    return {r["path"]: (manifest.parent / r["path"]).read_bytes() for r in _rows(manifest) if r["split"] == split}

  for split in ("val", "test"):
    assert files(regime, split) == files(oracle, split) and len(files(regime, split)) == 2 * 3 * 3 * 2
  train = [{p for p, _ in files(m, "train").items() if p.startswith("wli/")} for m in (regime, oracle)]
  assert (len(train[0]), len(train[1])) == (3 * 2 * 2, 3 * 20 * 2)


# ---- the WLI shortcut --------------------------------------------------------------------------------
def _cast_of_image(pixels: np.ndarray, reference: np.ndarray, num_values: int) -> int:
  """The shortcut value whose cast direction best matches the image's mean colour relative to `reference`."""
  log_ratio = np.log(pixels.reshape(-1, 3).astype(np.float64).mean(0) + 1.0) - np.log(reference + 1.0)
  scores = [log_ratio @ synthetic._shortcut_cast(v, num_values) for v in range(num_values)]
  return int(np.argmax(scores))


def test_shortcut_agrees_with_the_class_in_wli_training_images_only(tmp_path):
  manifest = synthetic.generate(tmp_path, image_size=32, images_per_lesion=1, wli_lesions_per_class=20,
                                nbi_lesions_per_class=3, eval_lesions_per_class=12, shortcut_agreement=0.9)
  rows = _rows(manifest)
  nuisance = {r["path"]: int(r["nuisance"]) for r in _rows(tmp_path / "lesions.csv")}
  pixels = {r["path"]: np.asarray(Image.open(tmp_path / r["path"])) for r in rows}
  wli = [r for r in rows if r["modality"] == "wli"]
  reference = np.mean([pixels[r["path"]].reshape(-1, 3).mean(0) for r in wli], axis=0)
  # The cast is in the pixels: its value is read back from an image's mean colour.
  read = {r["path"]: _cast_of_image(pixels[r["path"]], reference, 3) for r in wli}
  assert np.mean([read[p] == nuisance[p] for p in read]) >= 0.9
  agreement = {}
  for split in ("train", "val", "test"):
    sel = [r for r in wli if r["split"] == split]
    agreement[split] = np.mean([read[r["path"]] == CLASSES.index(r["label"]) for r in sel])
    listed = np.mean([nuisance[r["path"]] == CLASSES.index(r["label"]) for r in sel])
    if split == "train":
      assert listed == 18 / 20  # round(0.9 * 20) of every class's 20 lesions.
    else:  # Every value equally often in every class: independent of it.
      assert listed == pytest.approx(1 / 3)
      for name in CLASSES:
        values = collections.Counter(nuisance[r["path"]] for r in sel if r["label"] == name)
        assert values == {0: 4, 1: 4, 2: 4}
  assert agreement["train"] >= 0.8 and agreement["val"] <= 0.5 and agreement["test"] <= 0.5, agreement
  assert all(nuisance[r["path"]] == -1 for r in rows if r["modality"] == "nbi")


def test_shortcut_cast_changes_only_the_colour_balance():
  """Same scene with and without a cast: the WLI image's channel means move along the cast's direction."""
  lesion = synthetic._draw_lesion(np.random.default_rng([5, 1]), 0.5)
  view = synthetic._draw_view(np.random.default_rng([5, 2]))
  plain, box = synthetic._render(lesion, view, "wli", np.random.default_rng([5, 3]), 48, synthetic.WLI_CONTRAST)
  for value in range(3):
    cast = synthetic._shortcut_cast(value, 3)
    np.testing.assert_allclose(np.linalg.norm(cast), synthetic.SHORTCUT_CAST)
    assert abs(cast.sum()) < 1e-12  # No brightness change, only colour.
    tinted, tinted_box = synthetic._render(lesion, view, "wli", np.random.default_rng([5, 3]), 48,
                                           synthetic.WLI_CONTRAST, cast)
    assert tinted_box == box
    inside = plain.astype(float).mean(-1) > 40  # Away from the black border of the field of view.
    ratio = tinted[inside].astype(float).mean(0) / plain[inside].astype(float).mean(0) - 1
    # A gain on the scene: highlights, noise and rounding keep it from being exact.
    np.testing.assert_allclose(ratio, cast, atol=0.015)


# ---- sub-types -----------------------------------------------------------------------------------------
def _dominant_frequency(pattern: np.ndarray) -> float:
  power = np.abs(np.fft.fft2(pattern - pattern.mean()))**2
  fy = np.fft.fftfreq(pattern.shape[0])[:, None]
  fx = np.fft.fftfreq(pattern.shape[1])[None, :]
  radius = np.hypot(fx, fy)
  power[radius < 0.02] = 0
  return float((power * radius).sum() / power.sum())


def test_subtypes_are_pattern_variants_mixed_within_each_class(tmp_path):
  lesion = synthetic._draw_lesion(np.random.default_rng([2, 1]), 0.0)
  frame = synthetic._Frame.camera(256).map(np.eye(2) * 0.6)
  frequency = [_dominant_frequency(synthetic._vessel_map(synthetic._with_subtype(lesion, s, 3), frame))
               for s in range(3)]
  # The sub-types' lattices differ by SUBTYPE_PERIOD: coarse, the class's own, fine.
  assert synthetic._with_subtype(lesion, 1, 3).period == pytest.approx(lesion.period)
  assert frequency[0] / frequency[1] == pytest.approx(synthetic.SUBTYPE_PERIOD, rel=0.15)
  assert frequency[1] / frequency[2] == pytest.approx(synthetic.SUBTYPE_PERIOD, rel=0.15)
  assert synthetic._with_subtype(lesion, 0, 1) is lesion

  synthetic.generate(tmp_path, image_size=16, images_per_lesion=1, wli_lesions_per_class=6, nbi_lesions_per_class=6,
                     eval_lesions_per_class=3, subtypes_per_class=3)
  rows = {r["path"]: r for r in _rows(tmp_path / "manifest.csv")}
  counts = collections.Counter((rows[b["path"]]["modality"], rows[b["path"]]["split"], rows[b["path"]]["label"],
                                b["subtype"]) for b in _rows(tmp_path / "lesions.csv"))
  for (modality, split, label, subtype), n in counts.items():
    assert n == (2 if split == "train" else 1), (modality, split, label, subtype)
  assert len(counts) == 2 * 3 * 3 * 3


# ---- the generic task ----------------------------------------------------------------------------------
def test_generic_task_has_its_classes_on_both_palettes(tmp_path):
  classes = synthetic.GENERIC_CLASSES
  manifest = synthetic.generate(tmp_path, classes=classes, task="generic", image_size=32, lesions_per_class=4,
                                images_per_lesion=1)
  rows = _rows(manifest)
  palette = {b["path"]: b["palette"] for b in _rows(tmp_path / "lesions.csv")}
  assert len(classes) == 10 and sorted({r["label"] for r in rows}) == sorted(classes)
  assert {r["modality"] for r in rows} == {"wli"} and {r["patient_id"] for r in rows} == {""}
  for name in classes:
    sel = [r["path"] for r in rows if r["label"] == name]
    assert collections.Counter(palette[p] for p in sel) == {"wli": 2, "nbi": 2}
  for path in palette:  # WLI palette reddish, NBI palette teal: read back from the pixels.
    red, green, _ = np.asarray(Image.open(tmp_path / path)).reshape(-1, 3).astype(float).mean(0)
    assert (red > green) == (palette[path] == "wli"), path
  # Every class draws its own pattern on the same scene.
  scene = np.random.default_rng([1, 1])
  frame = synthetic._Frame.camera(96).map(np.eye(2) * 0.4, -0.2)
  maps = [synthetic._generic_map(synthetic._draw_generic(np.random.default_rng([1, 1]), c), frame)
          for c in range(len(classes))]
  del scene
  for i in range(len(maps)):
    assert 0.0 <= maps[i].min() and maps[i].max() <= 1.0 and maps[i].std() > 0.1, classes[i]
    for j in range(i):
      assert np.abs(maps[i] - maps[j]).mean() > 0.1, (classes[i], classes[j])


# ---- bad options and the config path -------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(shortcut_agreement=0.9), "eval_lesions_per_class > 0"),
    (dict(shortcut_agreement=1.5, eval_lesions_per_class=2), "shortcut_agreement"),
    (dict(wli_lesions_per_class=0), "wli_lesions_per_class"),
    (dict(eval_lesions_per_class=-1), "eval_lesions_per_class"),
    (dict(subtypes_per_class=0), "subtypes_per_class"),
    (dict(task="shapes"), "task"),
    (dict(task="generic", subtypes_per_class=2), "generic"),
    (dict(eval_lesions_per_class=2, paired_fraction=0.5), "paired_fraction"),
    (dict(colour_cast=1), "unknown synthetic option"),
])
def test_bad_regime_options(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    synthetic.generate(tmp_path, image_size=16, lesions_per_class=2, images_per_lesion=1, **kwargs)
  assert not (tmp_path / "manifest.csv").exists()


def test_ensure_generated_passes_the_regime_and_checks_the_split_mode(tmp_path):
  data = base_config.get_config().data
  syn = data.synthetic
  syn.update(enabled=True, out=str(tmp_path / "syn"), image_size=16, images_per_lesion=1, wli_lesions_per_class=2,
             nbi_lesions_per_class=3, eval_lesions_per_class=3, shortcut_agreement=0.5, subtypes_per_class=2)
  with pytest.raises(ValueError, match="data.splits"):
    synthetic.ensure_generated(data)
  data.splits = "manifest"
  manifest = synthetic.ensure_generated(data)
  direct = synthetic.generate(tmp_path / "direct", image_size=16, lesions_per_class=40, images_per_lesion=1,
                              wli_lesions_per_class=2, nbi_lesions_per_class=3, eval_lesions_per_class=3,
                              shortcut_agreement=0.5, subtypes_per_class=2)
  assert _digest(manifest.parent) == _digest(direct.parent)
  syn.shortcut_agreement = 0.9
  with pytest.raises(ValueError, match="shortcut_agreement"):
    synthetic.ensure_generated(data)


def test_cli_regime_options(tmp_path):
  synthetic.main(["--out", str(tmp_path), "--image_size", "16", "--images_per_lesion", "1",
                  "--wli_lesions_per_class", "2", "--nbi_lesions_per_class", "1", "--eval_lesions_per_class", "3",
                  "--shortcut_agreement", "0.5"])
  rows = _rows(tmp_path / "manifest.csv")
  assert collections.Counter((r["modality"], r["split"]) for r in rows) == {
      ("wli", "train"): 6, ("nbi", "train"): 3, ("wli", "val"): 9, ("nbi", "val"): 9, ("wli", "test"): 9,
      ("nbi", "test"): 9}


# ---- configs/transfer.py --------------------------------------------------------------------------------
def test_transfer_presets():
  module, regime = _preset()
  s = regime.data.synthetic
  assert (s.wli_lesions_per_class, s.nbi_lesions_per_class, s.eval_lesions_per_class) == (12, 150, 30)
  assert (s.shortcut_agreement, s.subtypes_per_class, regime.data.splits) == (0.9, 3, "manifest")
  assert regime.data.image_size == 64 and regime.stage == "pagkd"
  # Set by the headroom check (docs/RESULTS.md): the WLI pattern's contrast, the generic pretraining's size and steps.
  assert s.wli_contrast == 1.0 and regime.train.num_steps == 600
  _, oracle = _preset("oracle")
  o = oracle.data.synthetic
  assert oracle.stage == "baseline" and o.wli_lesions_per_class == module.ORACLE_LESION_FACTOR * 12
  assert o.shortcut_agreement == pytest.approx(1 / len(oracle.data.classes))
  # Only the WLI training lesions and their casts differ, so both are tested on the same images.
  differ = {k for k in s if s[k] != o[k]}
  assert differ == {"wli_lesions_per_class", "shortcut_agreement", "out"}
  _, pretrain = _preset("pretrain")
  p = pretrain.data.synthetic
  assert (p.task, pretrain.stage, pretrain.data.splits) == ("generic", "baseline", "folds")
  assert tuple(pretrain.data.classes) == synthetic.GENERIC_CLASSES
  assert all(p[k] == v for k, v in synthetic.REGIME_DEFAULTS.items() if k != "task")
  assert (p.lesions_per_class, p.images_per_lesion, pretrain.train.num_steps) == (80, 2, 1500)
  assert p.wli_contrast == s.wli_contrast  # The generic task's WLI-palette half as faint as the lesions' WLI.
  outs = {a: _preset(a)[1].data.synthetic.out
          for a in (None, "oracle", "pretrain", "smoke", "oracle,smoke", "pretrain,smoke")}
  assert len(set(outs.values())) == len(outs)
  for arg in ("bogus", "oracle,pretrain", "smoke,smoke"):
    with pytest.raises(ValueError, match="configs/transfer.py"):
      _preset(arg)


# ---- the class pattern stays recoverable in WLI at the training resolution -------------------------------
def _spectral_features(pixels: np.ndarray, box: tuple[float, float, float], size: int) -> np.ndarray:
  """Grey-level (cast-blind) features of the lesion centre after resizing to `size` px: log share of the power in
  11 radial frequency bands and the orientation coherence of each band."""
  scale = size / pixels.shape[0]
  grey = np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR)).astype(np.float64).mean(-1)
  cx, cy, radius = (v * scale for v in box)
  half = max(int(0.7 * radius), 4)
  x0, y0 = int(round(cx)), int(round(cy))
  crop = grey[max(y0 - half, 0):y0 + half, max(x0 - half, 0):x0 + half]
  crop = crop - crop.mean()
  window = np.hanning(crop.shape[0])[:, None] * np.hanning(crop.shape[1])[None, :]
  power = np.abs(np.fft.fft2(crop * window, s=(32, 32)))**2
  fy, fx = np.fft.fftfreq(32)[:, None], np.fft.fftfreq(32)[None, :]
  band = np.digitize(np.hypot(fx, fy), np.linspace(0.03, 0.5, 12))
  angle = np.exp(2j * np.arctan2(fy, fx))
  share = [np.log(power[band == b].sum() / power.sum() + 1e-9) for b in range(1, 12)]
  coherence = [abs((power * angle)[band == b].sum()) / (power[band == b].sum() + 1e-9) for b in range(1, 12)]
  return np.array(share + coherence)


def test_wli_class_pattern_is_recoverable_at_64_px(tmp_path):
  """A linear probe on cast-blind spectral features of WLI lesions, downsized to 64 px as in training, separates
  the classes of unseen test lesions across sub-types (chance: 1/3 accuracy, 0.5 AUC)."""
  from sklearn import linear_model, metrics, preprocessing  # pylint: disable=g-import-not-at-top
  manifest = synthetic.generate(tmp_path, image_size=96, images_per_lesion=1, wli_lesions_per_class=30,
                                nbi_lesions_per_class=1, eval_lesions_per_class=15, shortcut_agreement=0.9,
                                subtypes_per_class=3, seed=2)
  rows = {r["path"]: r for r in _rows(manifest) if r["modality"] == "wli" and r["split"] != "val"}
  boxes = {b["path"]: tuple(float(b[k]) for k in ("center_x", "center_y", "radius"))
           for b in _rows(tmp_path / "lesions.csv")}
  paths = sorted(rows)
  features = np.stack([_spectral_features(np.asarray(Image.open(tmp_path / p)), boxes[p], 64) for p in paths])
  labels = np.array([CLASSES.index(rows[p]["label"]) for p in paths])
  train = np.array([rows[p]["split"] == "train" for p in paths])
  scaler = preprocessing.StandardScaler().fit(features[train])
  probe = linear_model.LogisticRegression(max_iter=2000).fit(scaler.transform(features[train]), labels[train])
  scores = probe.predict_proba(scaler.transform(features[~train]))
  auc = metrics.roc_auc_score(labels[~train], scores, multi_class="ovr")
  accuracy = (scores.argmax(1) == labels[~train]).mean()
  assert auc >= 0.75 and accuracy >= 0.55, (auc, accuracy)
