"""The data check before training: real image files on disk, the CLI as a subprocess, train.py refusing bad data."""

import csv
import io
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pagkd_jax import experiment
from pagkd_jax.data import splits as splits_lib
from pagkd_jax.data import synthetic
from pagkd_jax.data import validate
from pagkd_jax.evaluation import evaluator
from pagkd_jax.training import trainer
from training_configs import tiny_synthetic_config

CLASSES = ("hyperplasia", "adenoma", "adenocarcinoma")
SIZE = 32  # The training input side used throughout; images are 40 x 48 unless a test says otherwise.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _image(path: pathlib.Path, seed: int, shape=(40, 48), fmt: str | None = None) -> pathlib.Path:
  """A random RGB image (distinct content per seed) of `shape` (height, width)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path, format=fmt)
  return path


def _truncated_jpeg(path: pathlib.Path, seed: int) -> pathlib.Path:
  """A JPEG cut to its first half: PIL opens its header but cannot load its pixels."""
  buffer = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
      buffer, format="JPEG", quality=95)
  data = buffer.getvalue()
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data[:len(data) // 2])
  Image.open(path)  # The header is intact: only decoding the pixels fails.
  return path


def _dataset(root: pathlib.Path, lesions_per_class: int = 6, images_per_lesion: int = 2) -> list[list[str]]:
  """PNG files under ROOT/img/: every lesion has WLI and NBI images. Returns the manifest rows."""
  rows, seed = [], 0
  for label in CLASSES:
    for lesion in range(lesions_per_class):
      for modality in ("wli", "nbi"):
        for view in range(images_per_lesion):
          name = f"img/{modality}/{label}_{lesion}_{view}.png"
          _image(root / name, seed)
          seed += 1
          rows.append([name, modality, label, f"{label}_{lesion}"])
  return rows


def _write_manifest(root: pathlib.Path, rows: list[list[str]]) -> pathlib.Path:
  path = root / "manifest.csv"
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["path", "modality", "label", "lesion_id"])
    writer.writerows(rows)
  return path


def _data_config(manifest: pathlib.Path, **overrides):
  config = tiny_synthetic_config(manifest.parent / "unused", image_size=SIZE)
  config.data.synthetic.enabled = False
  config.data.manifest = str(manifest)
  for key, value in overrides.items():
    config.data[key] = value
  return config


def _check(manifest: pathlib.Path, group_size: int = 4) -> validate.Report:
  """The CLI's check in-process: read, split, check."""
  data = _data_config(manifest, group_size=group_size).data
  records, problems, source = validate.read_records(data)
  assert not problems, problems
  splits = splits_lib.assign_splits(records, num_folds=data.num_folds, fold=data.fold,
                                    val_fraction=data.val_fraction, seed=data.split_seed)
  return validate.check_records(records, splits, classes=CLASSES, image_size=SIZE, group_size=group_size,
                                source=source)


def _texts(findings) -> list[str]:
  return [str(f) for f in findings]


def test_clean_data_set_has_no_findings(tmp_path):
  report = _check(_write_manifest(tmp_path, _dataset(tmp_path)))
  assert report.errors == [] and report.warnings == [] and report.num_images == 72


def test_truncated_jpeg_is_reported_with_its_manifest_row_and_path(tmp_path):
  rows = _dataset(tmp_path)
  path = _truncated_jpeg(tmp_path / "img" / "wli" / "broken.jpg", seed=999)
  rows.insert(4, ["img/wli/broken.jpg", "wli", "adenoma", "adenoma_0"])  # Data row 5.
  manifest = _write_manifest(tmp_path, rows)
  report = _check(manifest)
  assert len(report.errors) == 1 and report.errors[0].record.path == str(path)
  text = str(report.errors[0])
  assert text.startswith(f"{manifest}:5: {path}: cannot decode image")
  assert "truncated" in text.lower()


def test_missing_and_unreadable_files_are_bad_files(tmp_path):
  rows = _dataset(tmp_path)
  manifest = _write_manifest(tmp_path, rows)
  os.remove(tmp_path / rows[2][0])
  (tmp_path / rows[7][0]).write_bytes(b"")
  os.remove(tmp_path / rows[9][0])
  (tmp_path / rows[9][0]).mkdir()
  report = _check(manifest)
  assert _texts(report.errors) == [
      f"{manifest}:3: {tmp_path / rows[2][0]}: file not found",
      f"{manifest}:8: {tmp_path / rows[7][0]}: empty file",
      f"{manifest}:10: {tmp_path / rows[9][0]}: is a folder, not an image file",
  ]
  assert len(report.bad_files) == 3 and not report.unskippable


def test_images_smaller_than_the_training_input_are_upsampled_with_a_warning_that_counts_and_names_them(tmp_path):
  rows = _dataset(tmp_path)
  _image(tmp_path / rows[0][0], 500, shape=(SIZE - 1, 200))  # Short side 31 < 32: upsampled.
  _image(tmp_path / rows[1][0], 501, shape=(200, SIZE))  # Short side exactly 32: not.
  _image(tmp_path / rows[2][0], 502, shape=(20, 20))
  manifest = _write_manifest(tmp_path, rows)
  report = _check(manifest)
  assert not report.errors
  assert _texts(report.upsampled) == [f"{manifest}:1: {tmp_path / rows[0][0]}: 200 x 31 pixels",
                                      f"{manifest}:3: {tmp_path / rows[2][0]}: 20 x 20 pixels"]
  assert _texts(report.warnings) == [
      f"{manifest}: 2 of 72 image(s) are smaller than the 32 x 32 training input (config.data.image_size) on their "
      f"shorter side and are upsampled (e.g. {manifest}:1: {tmp_path / rows[0][0]}: 200 x 31 pixels, {manifest}:3: "
      f"{tmp_path / rows[2][0]}: 20 x 20 pixels); config.data.min_image_size sets a floor below which an image is "
      "an error"]
  formatted = report.format()
  assert "UPSAMPLED (2):" in formatted and f"  {manifest}:3: {tmp_path / rows[2][0]}: 20 x 20 pixels" in formatted


def test_images_below_an_explicit_size_floor_are_errors(tmp_path):
  rows = _dataset(tmp_path)
  _image(tmp_path / rows[0][0], 500, shape=(SIZE - 1, 200))
  _image(tmp_path / rows[1][0], 501, shape=(200, 24))  # Below 32 but at the floor of 24: upsampled.
  _image(tmp_path / rows[2][0], 502, shape=(20, 30))
  manifest = _write_manifest(tmp_path, rows)
  records, _, _ = validate.read_records(_data_config(manifest).data)
  report = validate.check_records(records, None, classes=CLASSES, image_size=SIZE, group_size=4,
                                  source=str(manifest), min_image_size=24)
  assert _texts(report.errors) == [
      f"{manifest}:3: {tmp_path / rows[2][0]}: image is 30 x 20 pixels, below the size floor "
      "config.data.min_image_size=24 on its shorter side"]
  assert len(report.bad_files) == 1 and len(report.upsampled) == 2


def test_class_absent_from_one_modality_is_an_error(tmp_path):
  rows = [r for r in _dataset(tmp_path) if not (r[1] == "nbi" and r[2] == "adenocarcinoma")]
  manifest = _write_manifest(tmp_path, rows)
  report = _check(manifest)
  assert _texts(report.errors) == [f"{manifest}: class 'adenocarcinoma' has no readable NBI images"]
  # A modality no class has is fine for a stage that does not train on it, an error for one that does.
  wli_only = [r for r in rows if r[1] == "wli"]
  manifest = _write_manifest(tmp_path, wli_only)
  data = _data_config(manifest).data
  records, _, source = validate.read_records(data)
  kwargs = dict(classes=CLASSES, image_size=SIZE, group_size=4, source=source)
  assert not validate.check_records(records, None, required_modalities=("wli",), **kwargs).errors
  assert len(validate.check_records(records, None, required_modalities=("wli", "nbi"), **kwargs).errors) == 3


def test_same_image_in_two_splits_is_an_error_and_within_one_split_a_warning(tmp_path):
  rows = _dataset(tmp_path)
  manifest = _write_manifest(tmp_path, rows)
  data = _data_config(manifest).data
  records, _, _ = validate.read_records(data)
  splits = splits_lib.assign_splits(records, num_folds=data.num_folds, fold=data.fold,
                                    val_fraction=data.val_fraction, seed=data.split_seed)
  train = next(i for i, s in enumerate(splits) if s == "train")
  test = next(i for i, s in enumerate(splits) if s == "test")
  other_train = next(i for i, s in enumerate(splits) if s == "train" and records[i].lesion_id
                     != records[train].lesion_id)
  assert records[train].lesion_id != records[test].lesion_id
  shutil.copyfile(records[train].path, records[test].path)
  report = _check(manifest)
  assert _texts(report.errors) == [
      f"{manifest}:{records[i].row}: {records[i].path} ({splits[i]}): same image content as "
      f"{manifest}:{records[j].row}: {records[j].path} ({splits[j]}): one image in two splits leaks it between "
      "training and evaluation" for i, j in sorted([(train, test), (test, train)])]
  assert not report.bad_files  # Not skippable: the data set must be fixed.

  _image(pathlib.Path(records[test].path), 12345)  # Undo the leak ...
  shutil.copyfile(records[train].path, records[other_train].path)  # ... and duplicate within training.
  report = _check(manifest)
  assert report.errors == [] and len(report.warnings) == 2
  assert "same image content as" in str(report.warnings[0])


def test_class_with_fewer_than_k_training_images_is_only_a_warning(tmp_path):
  manifest = _write_manifest(tmp_path, _dataset(tmp_path))
  report = _check(manifest, group_size=64)
  assert report.errors == []
  assert len(report.warnings) == 6  # Every class, both modalities.
  assert all("fewer than data.group_size=64: its groups are drawn with repetition" in w for w in
             _texts(report.warnings))


def _cli(args, cwd=REPO_ROOT):
  return subprocess.run([sys.executable, "-m", "pagkd_jax.data.validate", *args], cwd=cwd, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_cli_lists_every_problem_with_row_and_path_and_exits_non_zero(tmp_path):
  rows = _dataset(tmp_path)
  broken = _truncated_jpeg(tmp_path / "img" / "nbi" / "broken.jpg", seed=7)
  rows += [
      ["img/nbi/broken.jpg", "nbi", "adenoma", "adenoma_1"],  # Row 73: truncated JPEG.
      ["img/wli/missing.png", "wli", "adenoma", "adenoma_1"],  # Row 74: missing file.
      [rows[0][0], "wli", "hyperplasia", "hyperplasia_0"],  # Row 75: duplicate of row 1.
      [rows[1][0].replace("_1.png", "_x.png"), "xray", "hyperplasia", "hyperplasia_0"],  # Row 76.
      [rows[1][0], "wli", "polyp", "hyperplasia_0"],  # Row 77: unknown label (and a duplicate path).
  ]
  manifest = _write_manifest(tmp_path, rows)
  result = _cli([str(manifest), f"--image_size={SIZE}", "--group_size=4"])
  assert result.returncode == 1, result.stderr
  out = result.stdout
  errors = out.split("ERRORS (6):")[1].split("images checked")[0]
  assert f"{manifest}:75: {rows[0][0]}: duplicate path (also row 1)" in errors
  assert f"{manifest}:76: {rows[75][0]}: unknown modality 'xray'" in errors
  assert f"{manifest}:77: {rows[1][0]}: unknown label 'polyp'" in errors
  assert f"{manifest}:77: {rows[1][0]}: duplicate path (also row 2)" in errors
  assert f"{manifest}:73: {broken}: cannot decode image" in errors
  assert f"{manifest}:74: {tmp_path / 'img/wli/missing.png'}: file not found" in errors
  assert "WARNINGS" not in out
  assert "74 images checked: 6 error(s) (2 bad files), 0 warning(s)" in out


def test_cli_accepts_a_config_with_overrides_and_exits_zero_on_clean_data(tmp_path):
  manifest = _write_manifest(tmp_path, _dataset(tmp_path))
  result = _cli(["configs/piccolo.py", f"--config.data.manifest={manifest}", f"--config.data.image_size={SIZE}",
                 "--config.data.group_size=64"])
  assert result.returncode == 0, result.stdout + result.stderr
  # K = 64 is more than the training images of every class: warnings, printed apart.
  assert "WARNINGS (6):" in result.stdout and "ERRORS" not in result.stdout
  assert "72 images checked: 0 error(s) (0 bad files), 6 warning(s)" in result.stdout
  # Class names as a comma-separated list on the command line (here in another order: label indices follow it).
  result = _cli(["configs/piccolo.py", f"--config.data.manifest={manifest}", f"--config.data.image_size={SIZE}",
                 "--config.data.classes=adenocarcinoma,adenoma,hyperplasia"])
  assert result.returncode == 0, result.stdout + result.stderr
  assert "(classes adenocarcinoma, adenoma, hyperplasia;" in result.stdout
  # The same data at the preset's 448 px: every image is upsampled, a warning; with a floor above them, errors.
  result = _cli(["configs/piccolo.py", f"--config.data.manifest={manifest}"])
  assert result.returncode == 0, result.stdout + result.stderr
  assert "72 of 72 image(s) are smaller than the 448 x 448 training input" in result.stdout
  assert "UPSAMPLED (72):" in result.stdout
  result = _cli(["configs/piccolo.py", f"--config.data.manifest={manifest}", "--config.data.min_image_size=41"])
  # 72 bad files, and the 6 (modality, class) pairs left without readable images.
  assert result.returncode == 1 and "72 images checked: 78 error(s) (72 bad files)" in result.stdout
  assert "below the size floor config.data.min_image_size=41" in result.stdout


def test_synthetic_config_passes_the_check(tmp_path):
  result = _cli(["configs/synthetic.py:smoke", f"--config.data.synthetic.out={tmp_path / 'syn'}",
                 "--config.data.synthetic.lesions_per_class=10", "--config.data.synthetic.image_size=32",
                 "--config.data.image_size=32", "--config.data.synthetic.images_per_lesion=2"])
  assert result.returncode == 0, result.stdout + result.stderr
  assert "120 images checked: 0 error(s)" in result.stdout


@pytest.fixture(scope="module")
def learnable_manifest(tmp_path_factory):
  """A small synthetic data set (real PNGs) as a plain manifest, plus a truncated JPEG in one of its rows."""
  root = tmp_path_factory.mktemp("learnable")
  manifest = synthetic.generate(root, classes=CLASSES, image_size=SIZE, lesions_per_class=10, images_per_lesion=2)
  with open(manifest, newline="") as f:
    rows = list(csv.reader(f))
  header, rows = rows[0], rows[1:]
  nbi_row = next(i for i, r in enumerate(rows) if r[header.index("modality")] == "nbi")
  broken = _truncated_jpeg(root / "broken.jpg", seed=3)
  rows[nbi_row][header.index("path")] = str(broken)
  with open(manifest, "w", newline="") as f:
    csv.writer(f).writerows([header] + rows)
  return manifest, nbi_row + 1, broken


def test_train_py_refuses_to_start_and_lists_the_problems(tmp_path, learnable_manifest):
  manifest, row, broken = learnable_manifest
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "train.py", "--config=configs/synthetic.py:smoke", f"--workdir={workdir}",
       "--config.data.synthetic.enabled=False", f"--config.data.manifest={manifest}",
       f"--config.data.image_size={SIZE}", "--config.data.group_size=4", "--config.train.num_steps=2"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode != 0
  assert "DataCheckError: 1 problem(s) in the image list" in result.stderr
  assert f"{manifest}:{row}: {broken}: cannot decode image" in result.stderr
  assert "config.data.skip_bad_files=True" in result.stderr
  for stage_dir in (workdir, workdir / "teacher"):  # The pagkd preset starts with the teacher.
    assert not (stage_dir / "checkpoints").exists() and not (stage_dir / "splits.csv").exists()


def test_skip_bad_files_trains_and_lists_the_skipped_file(tmp_path, learnable_manifest):
  manifest, row, broken = learnable_manifest
  config = _data_config(manifest, skip_bad_files=True)
  config.train.num_steps = 2
  workdir = tmp_path / "run"
  trainer.train_and_evaluate(config, str(workdir))
  with open(workdir / validate.SKIPPED_FILES_NAME, newline="") as f:
    skipped = list(csv.DictReader(f))
  assert [(s["row"], s["path"], s["modality"]) for s in skipped] == [(str(row), str(broken), "nbi")]
  assert skipped[0]["problem"].startswith(f"{manifest}:{row}: {broken}: cannot decode image")
  with open(workdir / "splits.csv", newline="") as f:
    listed = [r["path"] for r in csv.DictReader(f)]
  assert str(broken) not in listed and len(listed) == 119
  assert (workdir / "checkpoints" / "best").exists()
  # Evaluation leaves out the same file without decoding the data set again.
  data = experiment.load_split_data(evaluator.load_config(str(workdir)), skipped_files_of=str(workdir))
  assert len(data.records) == 119 and str(broken) not in {r.path for r in data.records}
  evaluator.evaluate_workdir(str(workdir))
  assert (workdir / "eval" / "metrics.json").exists()


def test_class_folder_source_names_the_bad_file_by_path(tmp_path):
  root = tmp_path / "images"
  seed = 0
  for modality in ("wli", "nbi"):
    for label in CLASSES:
      for lesion in range(5):
        _image(root / modality / label / f"{label}{lesion}__{modality}.png", seed)
        seed += 1
  broken = _truncated_jpeg(root / "wli" / "adenoma" / "adenoma0__extra.jpg", seed=1)
  config = _data_config(tmp_path / "unused.csv")
  config.data.manifest, config.data.root = "", str(root)
  records, problems, source = validate.read_records(config.data)
  assert not problems and source == str(root) and len(records) == 31
  report = validate.check_records(records, None, classes=CLASSES, image_size=SIZE, group_size=4, source=source)
  assert len(report.errors) == 1 and str(report.errors[0]).startswith(f"{broken}: cannot decode image")


def test_training_data_load_lists_row_and_file_problems_together_and_skips_only_bad_files(tmp_path):
  rows = _dataset(tmp_path)
  broken = _truncated_jpeg(tmp_path / "img" / "wli" / "broken.jpg", seed=5)
  rows += [["img/wli/broken.jpg", "wli", "adenoma", "adenoma_2"], [rows[3][0], "wli", "polyp", "x"]]
  manifest = _write_manifest(tmp_path, rows)
  for skip in (False, True):
    config = _data_config(manifest, skip_bad_files=skip)
    with pytest.raises(validate.DataCheckError) as raised:
      experiment.load_split_data(config, str(tmp_path / f"run_{skip}"))
    errors = [str(f) for f in raised.value.report.errors]
    assert errors[:2] == [
        f"{manifest}:74: {rows[3][0]}: unknown label 'polyp' (classes: hyperplasia, adenoma, adenocarcinoma; "
        "or an index 0..2)",
        f"{manifest}:74: {rows[3][0]}: duplicate path (also row 4)"]
    assert len(errors) == 3 and errors[2].startswith(f"{manifest}:73: {broken}: cannot decode image (OSError: "
                                                     "image file is truncated")
    assert "the other 2 problem(s) must be fixed in the data" in str(raised.value)
    assert not (tmp_path / f"run_{skip}" / "splits.csv").exists()
