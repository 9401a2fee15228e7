"""predict.py on real image files with real tiny trained checkpoints: folders, CSVs, single images, unreadable files,
the model a workdir predicts with, CAM overlays, and the command line on several devices."""

import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from pagkd_jax import exported_model
from pagkd_jax.data import augment
from pagkd_jax.data import image_io
from pagkd_jax.data.normalization import normalize_images
from pagkd_jax.data.records import ImageRecord
from pagkd_jax.evaluation import calibration
from pagkd_jax.evaluation import evaluator
from pagkd_jax.evaluation import model_export
from pagkd_jax.evaluation import prediction
from pagkd_jax.training import trainer
from subprocess_env import env_with_xla_flags
from training_configs import tiny_synthetic_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A tiny NBI teacher and a stage-2 student distilled from it (a few steps each, 32 px, real PNGs)."""
  root = tmp_path_factory.mktemp("predict_runs")
  data_dir = root / "data"
  teacher = tiny_synthetic_config(data_dir, stage="teacher", num_steps=3)
  trainer.train_and_evaluate(teacher, str(root / "teacher"))
  student = tiny_synthetic_config(data_dir, stage="pagkd", num_steps=3)
  student.teacher.workdir = str(root / "teacher")
  student.distill.warmup_epochs = 0.0
  trainer.train_and_evaluate(student, str(root / "student"))
  return {"teacher": str(root / "teacher"), "student": str(root / "student"), "data": data_dir}


def _split_images(workdir, modality, n):
  with open(os.path.join(workdir, "splits.csv"), newline="") as f:
    return [row["path"] for row in csv.DictReader(f) if row["modality"] == modality][:n]


def _reference_probs(predictor, paths):
  """softmax(model(normalise(resize(decode(file))))) image by image, without the batching code under test."""
  size = predictor.config.data.image_size
  variables = jax.device_get(predictor.variables)
  out = []
  for path in paths:
    image = augment.preprocess_eval(image_io.read_image(ImageRecord(path, "wli", 0, path)), size)
    logits, _ = predictor.model.apply(variables, normalize_images(jnp.asarray(image[None]), "imagenet"), train=False)
    out.append(np.asarray(jax.nn.softmax(logits / predictor.temperature))[0])
  return np.stack(out)


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_folder_csv_and_image_inputs_with_unreadable_files(tmp_path, runs):
  sources = _split_images(runs["teacher"], "nbi", 7)
  folder = tmp_path / "frames"
  (folder / "day2" / "deeper").mkdir(parents=True)
  shutil.copy(sources[0], folder / "a.png")
  shutil.copy(sources[1], folder / "day2" / "b.png")
  Image.open(sources[2]).convert("RGB").save(folder / "day2" / "deeper" / "c.JPG", quality=95)
  (folder / "day2" / "broken.png").write_bytes(b"not an image at all")
  (folder / "day2" / "truncated.png").write_bytes(open(sources[3], "rb").read()[:200])
  (folder / "notes.txt").write_text("not listed: not an image extension")
  (folder / ".hidden.png").write_bytes(open(sources[4], "rb").read())
  listed = tmp_path / "list"
  listed.mkdir()
  shutil.copy(sources[5], listed / "d.png")
  with open(listed / "images.csv", "w", newline="") as f:
    csv.writer(f).writerows([["path", "comment"], ["d.png", "relative"], ["missing.png", "gone"],
                             [sources[6], "absolute"]])
  out = tmp_path / "out" / "preds.csv"

  paths = prediction.collect_image_paths([str(folder), str(listed / "images.csv"), sources[0]])
  result = prediction.predict(prediction.load_predictor(runs["teacher"]), paths, str(out))

  # A folder's files (sorted by name) come before those of its subfolders.
  expected_paths = [str(folder / "a.png"), str(folder / "day2" / "b.png"), str(folder / "day2" / "broken.png"),
                    str(folder / "day2" / "truncated.png"), str(folder / "day2" / "deeper" / "c.JPG"),
                    str(listed / "d.png"), str(listed / "missing.png"), sources[6], sources[0]]
  rows = _read_csv(out)
  assert [r["path"] for r in rows] == expected_paths
  classes = result.classes
  assert list(rows[0]) == ["path", "predicted", *(f"prob_{c}" for c in classes), "error"]
  bad = {r["path"]: r["error"] for r in rows if r["error"]}
  assert set(bad) == {str(folder / "day2" / "broken.png"), str(folder / "day2" / "truncated.png"),
                      str(listed / "missing.png")}
  assert "cannot decode image" in bad[str(folder / "day2" / "broken.png")]
  assert "cannot decode image" in bad[str(folder / "day2" / "truncated.png")]
  assert bad[str(listed / "missing.png")] == "file not found"
  for r in rows:
    if r["error"]:
      assert r["predicted"] == "" and all(r[f"prob_{c}"] == "" for c in classes)

  good = [i for i, r in enumerate(rows) if not r["error"]]
  probs = np.array([[float(rows[i][f"prob_{c}"]) for c in classes] for i in good])
  reference = _reference_probs(prediction.load_predictor(runs["teacher"]), [expected_paths[i] for i in good])
  np.testing.assert_allclose(probs, reference, atol=2e-6)  # The CSV's 6 decimals.
  assert [rows[i]["predicted"] for i in good] == [classes[k] for k in reference.argmax(-1)]
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  # The same image given twice (in the folder and on its own) gets the same row.
  assert rows[0]["predicted"] == rows[-1]["predicted"] and rows[0]["prob_" + classes[0]] == rows[-1][
      "prob_" + classes[0]]


def test_missing_input_and_csv_without_path_column_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="--input .*nowhere: no such file or folder"):
    prediction.collect_image_paths([str(tmp_path / "nowhere")])
  bad_csv = tmp_path / "list.csv"
  bad_csv.write_text("file,label\na.png,adenoma\n")
  with pytest.raises(ValueError, match=r"list.csv: no 'path' column \(found: \['file', 'label'\]\)"):
    prediction.collect_image_paths([str(bad_csv)])
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="empty: no images in this folder"):
    prediction.collect_image_paths([str(tmp_path / "empty")])


def test_a_stage_two_workdir_predicts_with_its_student_not_its_teacher(tmp_path, runs):
  paths = _split_images(runs["student"], "wli", 5)
  student = prediction.load_predictor(runs["student"])
  teacher = prediction.load_predictor(runs["teacher"])
  assert prediction.model_description(student.config.stage) == "WLI PaGKD student"
  assert prediction.model_description(teacher.config.stage) == "NBI teacher"
  got = prediction.predict_paths(student, paths, batch_size=2).probs  # 3 batches, the last one padded.
  np.testing.assert_allclose(got, _reference_probs(student, paths), atol=1e-6)
  assert not np.allclose(got, _reference_probs(teacher, paths), atol=1e-3)

  result = prediction.predict_paths(student, paths)
  prediction.write_cams(student, result, str(tmp_path / "cams"))
  names = sorted(os.listdir(tmp_path / "cams"))
  assert names == [f"{i:05d}_{os.path.splitext(os.path.basename(p))[0]}.png" for i, p in enumerate(paths)]
  assert all(os.path.getsize(tmp_path / "cams" / n) > 1000 for n in names)
  prediction.write_csv(result, str(tmp_path / "p.csv"))
  assert [r["cam"] for r in _read_csv(tmp_path / "p.csv")] == [str(tmp_path / "cams" / n) for n in names]


def test_command_line_on_three_devices_matches_one(tmp_path, runs, repo_root):
  paths = _split_images(runs["student"], "wli", 7)
  folder = tmp_path / "new"
  folder.mkdir()
  for i, p in enumerate(paths):
    shutil.copy(p, folder / f"img{i}.png")
  out = tmp_path / "preds.csv"
  env = env_with_xla_flags("--xla_force_host_platform_device_count=3", PYTHONPATH=str(repo_root))
  result = subprocess.run([sys.executable, "predict.py", f"--workdir={runs['student']}", f"--input={folder}",
                           f"--out={out}", "--batch_size=4", f"--cams={tmp_path / 'cams'}"],
                          cwd=repo_root, capture_output=True, text=True, timeout=600, env=env)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "predicting with the WLI PaGKD student (stage pagkd, best checkpoint" in result.stderr
  assert "predicted 7 / 7 images" in result.stderr
  rows = _read_csv(out)
  assert len(rows) == 7 and not any(r["error"] for r in rows)
  student = prediction.load_predictor(runs["student"])
  probs = np.array([[float(r[f"prob_{c}"]) for c in student.classes] for r in rows])
  # Three devices sum in another order than one: float32 rounding, far below the CSV's 6 decimals' 5e-7.
  np.testing.assert_allclose(probs, _reference_probs(student, [str(folder / f"img{i}.png") for i in range(7)]),
                             atol=2e-6)
  assert len(os.listdir(tmp_path / "cams")) == 7

  # A workdir's config.json with a mistaken value stops before any model is loaded, with status 2.
  broken = tmp_path / "broken"
  broken.mkdir()
  config = json.load(open(os.path.join(runs["student"], "config.json")))
  config["data"]["image_size"] = 0
  (broken / "config.json").write_text(json.dumps(config))
  result = subprocess.run([sys.executable, "predict.py", f"--workdir={broken}", f"--input={folder}",
                           f"--out={out}"], cwd=repo_root, capture_output=True, text=True, timeout=600, env=env)
  assert result.returncode == 2 and "data.image_size=0: expected an integer >= 32" in result.stderr


LOADER_SCRIPT = """
import importlib.util, sys
import numpy as np
spec = importlib.util.spec_from_file_location("exported_model", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
model = module.ExportedModel(sys.argv[2])
images = np.load(sys.argv[3])
np.save(sys.argv[4], np.concatenate([model(images[:1]), model(images[1:])]))  # Batches of 1 and of N - 1.
np.save(sys.argv[5], model([images[0], images[1, :20, :27]]))  # A list of two sizes.
loaded = sorted(m.split(".")[0] for m in sys.modules if m.split(".")[0] in ("flax", "optax", "orbax", "pagkd_jax",
                                                                            "grain", "PIL", "ml_collections"))
print("PROJECT_MODULES", sorted(set(loaded)))
"""


def test_exported_model_gives_predict_probabilities_at_any_batch_size(tmp_path, runs):
  predictor = prediction.load_predictor(runs["student"])
  out_dir = tmp_path / "exported"
  model_export.export_predictor(predictor, str(out_dir))
  info = json.load(open(out_dir / "model.json"))
  assert info["classes"] == list(predictor.classes) and info["input_size"] == 32 and info["temperature"] == 1.0
  assert info["model"] == "WLI PaGKD student" and info["checkpoint_step"] == predictor.step

  # Images at the input size, as they are: the exported program and predict.py must agree to float32 rounding.
  paths = _split_images(runs["student"], "wli", 6)
  images = np.stack([image_io.read_image(ImageRecord(p, "wli", 0, p)) for p in paths])
  assert images.shape == (6, 32, 32, 3)
  np.save(tmp_path / "images.npy", images)
  loader = os.path.join(os.path.dirname(prediction.__file__), "..", "exported_model.py")
  result = subprocess.run([sys.executable, "-c", LOADER_SCRIPT, loader, str(out_dir), str(tmp_path / "images.npy"),
                           str(tmp_path / "probs.npy"), str(tmp_path / "list_probs.npy")],
                          capture_output=True, text=True, timeout=600, env=env_with_xla_flags())
  assert result.returncode == 0, result.stderr[-4000:]
  # The loader needs jax and numpy only: no other library of the project's, and no project module but its own file.
  assert "PROJECT_MODULES []" in result.stdout, result.stdout
  exported_probs = np.load(tmp_path / "probs.npy")
  predicted = prediction.predict_paths(predictor, paths).probs
  np.testing.assert_allclose(exported_probs, predicted, atol=1e-6)
  list_probs = np.load(tmp_path / "list_probs.npy")
  np.testing.assert_allclose(list_probs[0], predicted[0], atol=1e-6)

  # Other sizes (upsampled and downsampled): the program resizes in float arithmetic, predict.py with PIL's fixed
  # point; the resized images differ by at most one grey level (measured: in 10-20% of the pixels).
  sizes = [(45, 57), (20, 24), (70, 100)]
  resized_paths = []
  for i, (h, w) in enumerate(sizes):
    path = tmp_path / f"resized{i}.png"
    Image.fromarray(images[i]).resize((w, h), Image.Resampling.BICUBIC).save(path)
    resized_paths.append(str(path))
    source = np.asarray(Image.open(path))
    difference = np.abs(augment.resize(source, 32).astype(int)
                        - np.asarray(model_export.resize_images(jnp.asarray(source[None]), 32))[0].astype(int))
    assert difference.max() <= 1
  got = exported_model.ExportedModel(str(out_dir))([np.asarray(Image.open(p)) for p in resized_paths])
  want = prediction.predict_paths(predictor, resized_paths).probs
  # One grey level is 1/255 / 0.226 = 0.017 of a normalised input: measured 1.4e-4 in probability with this nearly
  # untrained model (a trained one is more sensitive); the resize itself is compared with PIL's pixel by pixel above.
  np.testing.assert_allclose(got, want, atol=1e-2)


def test_calibration_fits_on_validation_and_predict_and_export_apply_it(tmp_path, runs):
  workdir = tmp_path / "teacher"
  shutil.copytree(runs["teacher"], workdir)
  report = evaluator.evaluate([str(workdir)], overrides={"eval.calibrate": True, "eval.calibration_bins": 10})
  record = json.load(open(workdir / "calibration.json"))
  with open(workdir / "splits.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  val = [r["path"] for r in rows if r["split"] == "val" and r["modality"] == "nbi"]
  assert record["fitted_on"] == "val" and record["n_images"] == len(val) > 0
  assert record["checkpoint_step"] == report["checkpoint_step"]

  # The temperature is the NumPy fit on the validation images' log-probabilities (and not on the test images').
  uncalibrated = prediction.load_predictor(runs["teacher"])
  assert uncalibrated.temperature == 1.0
  val_probs = _reference_probs(uncalibrated, val)
  labels = np.array([uncalibrated.classes.index(r["label"]) for r in rows if r["split"] == "val"
                     and r["modality"] == "nbi"])
  expected = calibration.fit_temperature(np.log(val_probs), labels)
  assert record["temperature"] == pytest.approx(expected, rel=1e-4)
  # This nearly untrained model is best at the largest T (its probabilities are near uniform), so the NLL before the
  # fit is what shows the images used: the validation images' mean -log p(true class).
  assert record["val_nll_before"] == pytest.approx(-np.mean(np.log(val_probs[np.arange(len(labels)), labels])),
                                                   rel=1e-5)
  assert record["val_nll_after"] <= record["val_nll_before"] + 1e-9

  saved = json.load(open(workdir / "eval" / "metrics.json"))
  assert saved["temperature"] == record["temperature"] and 0 <= saved["ece"] <= 1
  assert 0 <= saved["ece_uncalibrated"] <= 1
  assert os.path.getsize(workdir / "eval" / "reliability.png") > 1000

  # predict.py and the export give softmax(logits / T).
  calibrated = prediction.load_predictor(str(workdir))
  assert calibrated.temperature == record["temperature"]
  test = [r["path"] for r in rows if r["split"] == "test" and r["modality"] == "nbi"][:4]
  got = prediction.predict_paths(calibrated, test).probs
  np.testing.assert_allclose(got, calibration.apply_temperature(np.log(_reference_probs(uncalibrated, test)),
                                                                record["temperature"]), atol=2e-6)
  model_export.export_predictor(calibrated, str(tmp_path / "exported"))
  assert json.load(open(tmp_path / "exported" / "model.json"))["temperature"] == record["temperature"]
  images = np.stack([image_io.read_image(ImageRecord(p, "nbi", 0, p)) for p in test])
  np.testing.assert_allclose(exported_model.ExportedModel(str(tmp_path / "exported"))(images), got, atol=1e-6)


def test_eval_py_takes_eval_overrides_and_checks_them(tmp_path, runs, repo_root):
  result = subprocess.run([sys.executable, "eval.py", f"--workdir={runs['teacher']}",
                           "--config.eval.calibration_bins=0"], cwd=repo_root, capture_output=True, text=True,
                          timeout=600, env=env_with_xla_flags(PYTHONPATH=str(repo_root)))
  assert result.returncode == 2, result.stderr[-3000:]
  assert "eval.calibration_bins=0: expected an integer >= 1" in result.stderr
