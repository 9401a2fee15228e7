"""Tests for manifests, class folders, data-source selection and the split table."""

import os
import pathlib
import sys
import types

import ml_collections
import numpy as np
import pytest
from PIL import Image

from pagkd_jax.data import manifest
from pagkd_jax.data.records import ImageRecord

CLASSES = ("hyperplasia", "adenoma", "adenocarcinoma")


def _png(path: pathlib.Path) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
  return path


def _write_csv(path: pathlib.Path, lines: list[str]) -> pathlib.Path:
  path.write_text("\n".join(lines) + "\n")
  return path


def test_read_manifest_parses_rows(tmp_path):
  _png(tmp_path / "img" / "a.png")
  absolute = _png(tmp_path / "elsewhere" / "b.jpg")
  _png(tmp_path / "img" / "c.png")
  csv_path = _write_csv(tmp_path / "m.csv", [
      "path,modality,label,lesion_id,patient_id,pair_id,notes",
      "img/a.png,WLI,adenoma,L1,P1,pair7,x",
      f"{absolute},nbi,2,L2,,,",
      "img/c.png, Nbi ,ADENOMA,L1,P1,pair7,",
  ])
  records = manifest.read_manifest(csv_path, CLASSES)
  assert records == [
      ImageRecord(path=str(tmp_path / "img" / "a.png"), modality="wli", label=1, lesion_id="L1",
                  patient_id="P1", pair_id="pair7", row=1),
      ImageRecord(path=str(absolute), modality="nbi", label=2, lesion_id="L2", row=2),
      ImageRecord(path=str(tmp_path / "img" / "c.png"), modality="nbi", label=1,
                  lesion_id="L1", patient_id="P1", pair_id="pair7", row=3),
  ]


def test_read_manifest_lesion_with_two_labels_is_an_error(tmp_path):
  _png(tmp_path / "a.png")
  _png(tmp_path / "b.png")
  csv_path = _write_csv(tmp_path / "m.csv", [
      "path,modality,label,lesion_id", "a.png,wli,adenoma,L1", "b.png,nbi,hyperplasia,L1"])
  with pytest.raises(manifest.ManifestError, match=r"lesion 'L1' has several label values"):
    manifest.read_manifest(csv_path, CLASSES)


def test_read_manifest_lesion_with_and_without_patient_is_an_error(tmp_path):
  _png(tmp_path / "a.png")
  _png(tmp_path / "b.png")
  csv_path = _write_csv(tmp_path / "m.csv", [
      "path,modality,label,lesion_id,patient_id", "a.png,wli,adenoma,L1,P1",
      "b.png,nbi,adenoma,L1,"])
  with pytest.raises(manifest.ManifestError, match=r"lesion 'L1' has several patient_id"):
    manifest.read_manifest(csv_path, CLASSES)


def test_read_manifest_reports_every_bad_row_with_file_row_and_path(tmp_path):
  _png(tmp_path / "ok.png")
  _png(tmp_path / "ok2.png")
  _png(tmp_path / "ok3.png")
  _png(tmp_path / "ok4.png")
  csv_path = _write_csv(tmp_path / "bad.csv", [
      "path,modality,label,lesion_id",
      "ok.png,wli,adenoma,L1",
      "missing.png,wli,adenoma,L2",
      "ok2.png,xray,adenoma,L3",
      "ok3.png,nbi,polyp,L4",
      "ok.png,wli,adenoma,",
      "ok4.png,nbi,7,L6",
  ])
  with pytest.raises(manifest.ManifestError) as info:
    manifest.read_manifest(csv_path, CLASSES)
  message = str(info.value)
  assert f"{csv_path}:2: missing.png: file not found" in message
  assert f"{csv_path}:3: ok2.png: unknown modality 'xray'" in message
  assert f"{csv_path}:4: ok3.png: unknown label 'polyp'" in message
  assert f"{csv_path}:5: ok.png: empty lesion_id" in message
  assert f"{csv_path}:5: ok.png: duplicate path (also row 1)" in message
  assert f"{csv_path}:6: ok4.png: unknown label '7'" in message
  assert ":1:" not in message  # The good row is not reported.
  assert len(info.value.problems) == 6


def test_read_manifest_missing_column_and_missing_manifest(tmp_path):
  csv_path = _write_csv(tmp_path / "m.csv", ["path,modality,lesion_id", "a.png,wli,L1"])
  with pytest.raises(manifest.ManifestError, match="missing column 'label'"):
    manifest.read_manifest(csv_path, CLASSES)
  with pytest.raises(FileNotFoundError, match="nope.csv"):
    manifest.read_manifest(tmp_path / "nope.csv", CLASSES)
  empty = _write_csv(tmp_path / "empty.csv", ["path,modality,label,lesion_id"])
  with pytest.raises(manifest.ManifestError, match="no data rows"):
    manifest.read_manifest(empty, CLASSES)


def test_read_manifest_without_file_check(tmp_path):
  csv_path = _write_csv(tmp_path / "m.csv", ["path,modality,label,lesion_id", "x.png,nbi,1,L"])
  (record,) = manifest.read_manifest(csv_path, CLASSES, check_files=False)
  assert record.path == str(tmp_path / "x.png") and record.label == 1


def test_records_from_folder(tmp_path):
  _png(tmp_path / "wli" / "adenoma" / "img1.PNG")
  _png(tmp_path / "wli" / "adenoma" / "L9__view1.jpg")
  _png(tmp_path / "NBI" / "Adenoma" / "L9__view2.tiff")
  _png(tmp_path / "nbi" / "hyperplasia" / "other.jpeg")
  (tmp_path / "nbi" / "hyperplasia" / "notes.txt").write_text("ignored")
  records = manifest.records_from_folder(tmp_path, CLASSES)
  by_name = {os.path.basename(r.path): r for r in records}
  assert set(by_name) == {"img1.PNG", "L9__view1.jpg", "L9__view2.tiff", "other.jpeg"}
  assert by_name["img1.PNG"] == ImageRecord(
      path=str(tmp_path / "wli" / "adenoma" / "img1.PNG"), modality="wli", label=1,
      lesion_id="wli/adenoma/img1")
  assert by_name["L9__view1.jpg"].lesion_id == by_name["L9__view2.tiff"].lesion_id == "L9"
  assert by_name["L9__view2.tiff"].modality == "nbi"
  assert by_name["other.jpeg"].label == 0
  assert [r.path for r in records] == sorted(r.path for r in records)
  assert all(r.pair_id == "" for r in records)  # L9's two files have different view names: no pair.


def test_records_from_folder_pairs_files_named_alike_in_both_modalities(tmp_path):
  for name in ("wli/adenoma/L1__0.png", "nbi/adenoma/L1__0.jpg", "wli/adenoma/L1__1.png", "nbi/adenoma/L1__2.png",
               "wli/hyperplasia/x.png", "nbi/hyperplasia/x.png", "wli/hyperplasia/__v.png", "nbi/hyperplasia/__v.png"):
    _png(tmp_path / name)
  records = manifest.records_from_folder(tmp_path, CLASSES)
  pair_of = {os.path.relpath(r.path, tmp_path): r.pair_id for r in records}
  assert pair_of == {
      "wli/adenoma/L1__0.png": "L1__0", "nbi/adenoma/L1__0.jpg": "L1__0",  # The same view of lesion L1.
      "wli/adenoma/L1__1.png": "", "nbi/adenoma/L1__2.png": "",  # Views seen in one modality only.
      # Without a lesion prefix every file is its own lesion (wli/hyperplasia/x and nbi/hyperplasia/x): no pair.
      "wli/hyperplasia/x.png": "", "nbi/hyperplasia/x.png": "", "wli/hyperplasia/__v.png": "",
      "nbi/hyperplasia/__v.png": ""}


def test_records_from_folder_unknown_class_folder_is_named(tmp_path):
  _png(tmp_path / "wli" / "adenoma" / "a.png")
  _png(tmp_path / "wli" / "serrated" / "b.png")
  with pytest.raises(manifest.ManifestError, match="unknown class folder 'serrated'"):
    manifest.records_from_folder(tmp_path, CLASSES)
  with pytest.raises(FileNotFoundError, match="absent"):
    manifest.records_from_folder(tmp_path / "absent", CLASSES)


def _data_config(**values) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(manifest="", root="", classes=CLASSES))
  config.update(values)
  return config


def test_load_records_picks_the_configured_source(tmp_path, monkeypatch):
  _png(tmp_path / "root" / "wli" / "adenoma" / "a.png")
  _png(tmp_path / "a.png")
  csv_path = _write_csv(tmp_path / "m.csv",
                        ["path,modality,label,lesion_id", "a.png,nbi,adenocarcinoma,L"])
  from_folder = manifest.load_records(_data_config(root=str(tmp_path / "root")))
  assert [(r.modality, r.label) for r in from_folder] == [("wli", 1)]
  from_csv = manifest.load_records(_data_config(manifest=str(csv_path)))
  assert [(r.modality, r.label, r.row) for r in from_csv] == [("nbi", 2, 1)]

  calls = []
  fake = types.ModuleType("pagkd_jax.data.tfds_source")
  fake.load_records = lambda tfds_dir, classes: calls.append((tfds_dir, classes)) or from_csv
  monkeypatch.setitem(sys.modules, "pagkd_jax.data.tfds_source", fake)
  import pagkd_jax.data  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(pagkd_jax.data, "tfds_source", fake, raising=False)
  assert manifest.load_records(_data_config(tfds_dir="/data/tfds")) == from_csv
  assert calls == [("/data/tfds", CLASSES)]


def test_load_records_needs_exactly_one_source(tmp_path):
  with pytest.raises(ValueError, match="no data given"):
    manifest.load_records(_data_config())
  with pytest.raises(ValueError, match="set only one"):
    manifest.load_records(_data_config(manifest="m.csv", root=str(tmp_path)))


def test_write_records_csv_round_trips_through_read_manifest(tmp_path):
  records = [
      ImageRecord(path=str(_png(tmp_path / "i" / "a.png")), modality="wli", label=2,
                  lesion_id="L1", patient_id="P1"),
      ImageRecord(path=str(_png(tmp_path / "i" / "b.png")), modality="nbi", label=0,
                  lesion_id="L2", pair_id="q"),
  ]
  out = tmp_path / "work" / "splits.csv"
  manifest.write_records_csv(records, ["train", "test"], out, CLASSES)
  lines = out.read_text().splitlines()
  assert lines[0] == "path,modality,label,lesion_id,split,patient_id,pair_id,paired"
  assert lines[1] == f"{records[0].path},wli,adenocarcinoma,L1,train,P1,,0"
  assert lines[2].endswith(",q,0")  # A pair_id without its partner: not a pair (tests/test_pairs.py has pairs).
  again = manifest.read_manifest(out, CLASSES)
  # The split column comes back as `ImageRecord.split` (used only with config.data.splits = "manifest").
  assert again == [r.__class__(**{**r.__dict__, "row": i + 1, "split": s})
                   for i, (r, s) in enumerate(zip(records, ["train", "test"]))]
  with pytest.raises(ValueError, match="2 records but 1"):
    manifest.write_records_csv(records, ["train"], out, CLASSES)
