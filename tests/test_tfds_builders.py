"""TFDS builders of data/ and the TensorFlow-free reader `pagkd_jax.data.tfds_source`.

The reader tests at the top need only array_record (a grain dependency) and run everywhere; the
builder tests need the `tfds` extra (tensorflow-datasets + TensorFlow) and are marked `tfds`.
"""

import csv
import io
import json
import multiprocessing
import pathlib
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pagkd_jax.data import image_io
from pagkd_jax.data import synthetic
from pagkd_jax.data import tfds_source
from pagkd_jax.data.records import ImageRecord

REPO = pathlib.Path(__file__).resolve().parents[1]


# ---- a slow, obviously-correct protobuf encoder for tf.train.Example ----------------------------
def _varint(value: int) -> bytes:
  if value < 0:
    value += 1 << 64
  out = bytearray()
  while True:
    low, value = value & 0x7F, value >> 7
    out.append(low | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _field(number: int, wire: int, payload: bytes | int) -> bytes:
  key = _varint(number << 3 | wire)
  if wire == 0:
    return key + _varint(payload)
  if wire == 2:
    return key + _varint(len(payload)) + payload
  return key + payload  # Fixed-size payloads are given as bytes.


def _encode_feature(values, packed: bool = True) -> bytes:
  if all(isinstance(v, bytes) for v in values):
    inner = b"".join(_field(1, 2, v) for v in values)
    return _field(1, 2, inner)
  if all(isinstance(v, float) for v in values):
    if packed:
      inner = _field(1, 2, b"".join(struct.pack("<f", v) for v in values))
    else:
      inner = b"".join(_field(1, 5, struct.pack("<f", v)) for v in values)
    return _field(2, 2, inner)
  if packed:
    inner = _field(1, 2, b"".join(_varint(v) for v in values))
  else:
    inner = b"".join(_field(1, 0, v) for v in values)
  return _field(3, 2, inner)


def _encode_example(features: dict, packed: bool = True) -> bytes:
  entries = b"".join(
      _field(1, 2, _field(1, 2, key.encode()) + _field(2, 2, _encode_feature(values, packed)))
      for key, values in features.items())
  return _field(1, 2, entries)


def _png(seed: int, size: int = 8) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def _write_prepared_dataset(folder: pathlib.Path, class_names, shards, file_format="array_record"):
  """A prepared-dataset folder as TFDS writes it: dataset_info.json, labels, ArrayRecord shards.

  `shards`: list of lists of feature dicts.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  folder.mkdir(parents=True)
  info = {"name": "toy", "fileFormat": file_format, "splits": [{
      "name": "train", "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
      "shardLengths": [str(len(s)) for s in shards]}]}
  (folder / "dataset_info.json").write_text(json.dumps(info))
  (folder / "label.labels.txt").write_text("\n".join(class_names) + "\n")
  for i, examples in enumerate(shards):
    path = folder / f"toy-train.array_record-{i:05d}-of-{len(shards):05d}"
    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for example in examples:
      writer.write(_encode_example(example))
    writer.close()


def _toy_example(image: bytes, label: int, modality: str = "wli", lesion: str = "L1",
                 patient: str = "", pair: str = "") -> dict:
  return {"image": [image], "label": [label], "modality": [modality.encode()],
          "lesion_id": [lesion.encode()], "patient_id": [patient.encode()],
          "pair_id": [pair.encode()], "filename": [b"x.png"]}


# ---- reader tests (no TensorFlow, no tensorflow-datasets) ----------------------------------------
@pytest.mark.parametrize("packed", [True, False])
def test_parse_example_decodes_all_value_kinds(packed):
  features = {"image": [b"\x89PNG\x00\xff", b""], "label": [2], "many": [0, -1, 7, 2**40, -2**63],
              "floats": [0.5, -1.25, 3.0], "text": ["läsion".encode()], "empty": [b""]}
  parsed = tfds_source.parse_example(_encode_example(features, packed=packed))
  assert parsed == features


def test_parse_example_rejects_truncated_bytes():
  data = _encode_example({"image": [b"0123456789"]})
  with pytest.raises(tfds_source.ExampleParseError):
    tfds_source.parse_example(data[:-3])


def test_load_records_maps_labels_by_name_and_reads_bytes(tmp_path):
  images = [_png(i) for i in range(5)]
  # Dataset order (B, a, C) differs from the configured order (c, b, a) and in case.
  _write_prepared_dataset(tmp_path / "ds", ["B", "a", "C"], [
      [_toy_example(images[0], 0, "wli", "L1", "P1"), _toy_example(images[1], 2, "NBI", "L2")],
      [_toy_example(images[2], 1, "nbi", "L3", pair="p"), _toy_example(images[3], 1, "wli", "L3",
                                                                      pair="p"),
       _toy_example(images[4], 2, "wli", "L4")],
  ])
  records = tfds_source.load_records(tmp_path / "ds", ("c", "b", "a"))
  shard0 = str((tmp_path / "ds" / "toy-train.array_record-00000-of-00002").resolve())
  shard1 = str((tmp_path / "ds" / "toy-train.array_record-00001-of-00002").resolve())
  assert records == [
      ImageRecord(shard0, "wli", 1, "L1", "P1", "", 0),
      ImageRecord(shard0, "nbi", 0, "L2", "", "", 1),
      ImageRecord(shard1, "nbi", 2, "L3", "", "p", 0),
      ImageRecord(shard1, "wli", 2, "L3", "", "p", 1),
      ImageRecord(shard1, "wli", 0, "L4", "", "", 2),
  ]
  assert [tfds_source.read_encoded(r) for r in records] == images
  # The project's image reader goes through tfds_source for ArrayRecord entries.
  np.testing.assert_array_equal(image_io.read_image(records[2]),
                                np.asarray(Image.open(io.BytesIO(images[2]))))
  with pytest.raises(ValueError, match=r"\[record 7\]: index out of range"):
    tfds_source.read_encoded(ImageRecord(shard0, "wli", 0, "L1", record_index=7))


def test_load_records_errors_name_the_fault(tmp_path):
  image = _png(0)
  _write_prepared_dataset(tmp_path / "unknown", ["adenoma", "serrated"],
                          [[_toy_example(image, 0), _toy_example(image, 1)]])
  with pytest.raises(ValueError, match="'serrated'"):
    tfds_source.load_records(tmp_path / "unknown", ("adenoma", "hyperplasia"))
  _write_prepared_dataset(tmp_path / "modality", ["a"], [[_toy_example(image, 0, "xray")]])
  with pytest.raises(ValueError, match=r"record 0\]: unknown modality 'xray'"):
    tfds_source.load_records(tmp_path / "modality", ("a",))
  _write_prepared_dataset(tmp_path / "tfrecord" / "toy" / "1.0.0", ["a"], [[]],
                          file_format="tfrecord")
  with pytest.raises(ValueError, match="array_record"):
    tfds_source.load_records(tmp_path / "tfrecord" / "toy" / "1.0.0", ("a",))
  # The dataset's parent folder: the error points at the versioned folder below it.
  with pytest.raises(FileNotFoundError, match=r"toy/1\.0\.0"):
    tfds_source.load_records(tmp_path / "tfrecord", ("a",))
  with pytest.raises(FileNotFoundError, match="not found"):
    tfds_source.load_records(tmp_path / "missing", ("a",))
  (tmp_path / "modality" / "toy-train.array_record-00000-of-00001").unlink()
  with pytest.raises(FileNotFoundError, match="00000-of-00001"):
    tfds_source.load_records(tmp_path / "modality", ("a",))


def _read_in_child(record: ImageRecord) -> bytes:
  return tfds_source.read_encoded(record)


def test_read_encoded_in_worker_processes(tmp_path):
  """Records travel to spawned workers (as grain's do) and are read there."""
  images = [_png(i) for i in range(3)]
  _write_prepared_dataset(tmp_path / "ds", ["a"], [[_toy_example(b, 0) for b in images]])
  records = tfds_source.load_records(tmp_path / "ds", ("a",))
  assert tfds_source.read_encoded(records[0]) == images[0]  # The parent has the shard open.
  with multiprocessing.get_context("spawn").Pool(1) as pool:
    assert pool.map(_read_in_child, records, chunksize=1) == images


def test_reader_does_not_import_tensorflow(tmp_path):
  _write_prepared_dataset(tmp_path / "ds", ["a"], [[_toy_example(_png(0), 0)]])
  code = (
      "import sys\n"
      "from pagkd_jax.data import tfds_source\n"
      f"records = tfds_source.load_records({str(tmp_path / 'ds')!r}, ('a',))\n"
      "assert tfds_source.read_encoded(records[0])[:4] == b'\\x89PNG'\n"
      "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')]\n"
      "assert not bad, bad\n")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


# ---- builder tests (need the tfds extra) -------------------------------------------------------
TINY = dict(image_size=16, lesions_per_class=2, images_per_lesion=1)


@pytest.fixture(scope="module")
def build_tfds():
  pytest.importorskip("tensorflow_datasets")
  sys.path.insert(0, str(REPO / "data"))
  try:
    import build_tfds as module  # pylint: disable=g-import-not-at-top
    yield module
  finally:
    sys.path.remove(str(REPO / "data"))


def _pixels(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"))


def _assert_same_images(records, classes, source_dir: pathlib.Path, with_ids: bool = True):
  """Every record decodes to the pixels of exactly one source image of the same metadata
  (modality, class, lesion; and patient and pair ids when `with_ids`)."""
  with open(source_dir / "manifest.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(records) == len(rows)
  unused = {r["path"]: r for r in rows}
  for record in records:
    pixels = _pixels(tfds_source.read_encoded(record))
    match = [path for path, row in unused.items()
             if (row["modality"], row["label"], row["lesion_id"]) == (
                 record.modality, classes[record.label], record.lesion_id)
             and (not with_ids or (row["patient_id"], row["pair_id"]) == (
                 record.patient_id, record.pair_id))
             and np.array_equal(_pixels((source_dir / path).read_bytes()), pixels)]
    assert len(match) == 1, record
    del unused[match[0]]
  assert not unused


@pytest.mark.tfds
def test_synthetic_builder_generates_and_round_trips(build_tfds, tmp_path):
  builder_cls = build_tfds.builder_class("pagkd_synthetic")
  config = sys.modules[builder_cls.__module__].SyntheticConfig(
      name="tiny", paired_fraction=0.5, **TINY)
  prepared = build_tfds.build("pagkd_synthetic", data_dir=str(tmp_path / "tfds"), config=config)
  assert (prepared / "dataset_info.json").is_file()
  assert json.loads((prepared / "dataset_info.json").read_text())["fileFormat"] == "array_record"
  # The reference: the same generator call written to a plain folder.
  source = synthetic.generate(tmp_path / "plain", paired_fraction=0.5, **TINY).parent
  classes = synthetic.DEFAULT_CLASSES
  records = tfds_source.load_records(prepared, classes)
  assert len({r.pair_id for r in records if r.pair_id}) == 3
  _assert_same_images(records, classes, source)

  # Reference decoder for the records: tensorflow-datasets' own protobuf classes.
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top

  raw = tfds_source._source(records[0].path)[records[0].record_index]
  example = tf_example_pb2.Example.FromString(raw)
  parsed = tfds_source.parse_example(raw)
  assert set(parsed) == set(example.features.feature)
  for key, feature in example.features.feature.items():
    kind = feature.WhichOneof("kind")
    assert parsed[key] == list(getattr(feature, kind).value)

  # TFDS's own reader sees the same examples (decoded pixels and metadata), record by record.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  tfds_source_of_split = tfds.builder_from_directory(str(prepared)).as_data_source(split="train")
  assert len(tfds_source_of_split) == len(records)
  by_key = {}
  for example in tfds_source_of_split:
    key = (example["modality"].decode(), int(example["label"]), example["lesion_id"].decode())
    by_key.setdefault(key, []).append(np.asarray(example["image"]))
  for record in records:
    candidates = by_key[(record.modality, record.label, record.lesion_id)]
    pixels = _pixels(tfds_source.read_encoded(record))
    assert any(np.array_equal(pixels, c) for c in candidates)

  # The same images packaged from the existing folder (manual dir) give the same dataset.
  prepared_again = build_tfds.build("pagkd_synthetic", data_dir=str(tmp_path / "tfds2"),
                                    config=config, manual_dir=str(source))
  _assert_same_images(tfds_source.load_records(prepared_again, classes), classes, source)


@pytest.mark.tfds
def test_manual_builders_read_folders_and_manifests(build_tfds, tmp_path):
  # PICCOLO from the class-folder layout (no manifest): copy a synthetic set without it.
  source = synthetic.generate(tmp_path / "syn3", **TINY).parent
  folder = tmp_path / "piccolo_manual"
  for modality in ("wli", "nbi"):
    shutil.copytree(source / modality, folder / modality)
  prepared = build_tfds.build("piccolo", data_dir=str(tmp_path / "tfds"), manual_dir=str(folder))
  # Configured in another order: labels follow the names.
  classes = ("adenocarcinoma", "hyperplasia", "adenoma")
  records = tfds_source.load_records(prepared, classes)
  assert all(r.patient_id == "" and r.pair_id == "" for r in records)
  _assert_same_images(records, classes, source, with_ids=False)

  # PolypSet (2 classes) from a manifest.
  polyp_classes = ("hyperplastic", "adenomatous")
  source2 = synthetic.generate(tmp_path / "syn2", classes=polyp_classes, **TINY).parent
  prepared2 = build_tfds.build("polypset", data_dir=str(tmp_path / "tfds"),
                               manual_dir=str(source2))
  _assert_same_images(tfds_source.load_records(prepared2, polyp_classes), polyp_classes, source2)
  with pytest.raises(ValueError, match="adenomatous"):
    tfds_source.load_records(prepared2, ("hyperplastic", "adenoma"))
