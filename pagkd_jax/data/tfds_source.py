"""Reads TFDS datasets prepared as ArrayRecord (the builders in data/) without TensorFlow.

A prepared dataset folder (e.g. `~/tensorflow_datasets/piccolo/1.0.0`, the versioned folder that
holds `dataset_info.json`) contains ArrayRecord shards of serialized `tf.train.Example` protos.
This module needs neither TensorFlow nor tensorflow-datasets: the shards are opened with
`grain.sources.ArrayRecordDataSource` (array_record comes with grain) and the few protobuf
messages involved (Example > Features > Feature > Bytes/Float/Int64List) are decoded by
`parse_example` here.

Each image becomes an `ImageRecord` with `path` = the absolute shard file and `record_index` = the
example's index inside it; `read_encoded` returns the image bytes exactly as the builder stored
them (original JPEG/PNG encoding). Opened shards are cached per process (re-opened after a fork),
so grain worker processes can call `read_encoded` directly.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
import threading
from typing import Iterator, Sequence

from pagkd_jax.data.records import MODALITIES, ImageRecord

INFO_NAME = "dataset_info.json"
LABEL_FEATURE = "label"
_DEFAULT_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"

# ---- protobuf wire format (just what tf.train.Example needs) ----------------------------------
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


class ExampleParseError(ValueError):
  """A record is not a valid serialized tf.train.Example."""


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
  value, shift = 0, 0
  while True:
    if pos >= len(data):
      raise ExampleParseError("truncated varint")
    byte = data[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    if not byte & 0x80:
      return value, pos
    shift += 7
    if shift > 63:
      raise ExampleParseError("varint longer than 10 bytes")


def _fields(data: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
  """(field number, wire type, value) of a message; value is an int or a memoryview slice."""
  pos = 0
  while pos < len(data):
    key, pos = _read_varint(data, pos)
    number, wire = key >> 3, key & 7
    if wire == _VARINT:
      value, pos = _read_varint(data, pos)
    elif wire == _LENGTH_DELIMITED:
      size, pos = _read_varint(data, pos)
      if pos + size > len(data):
        raise ExampleParseError(f"field {number}: length {size} runs past the end")
      value, pos = data[pos:pos + size], pos + size
    elif wire in (_FIXED32, _FIXED64):
      size = 4 if wire == _FIXED32 else 8
      if pos + size > len(data):
        raise ExampleParseError(f"field {number}: truncated fixed-size value")
      value, pos = data[pos:pos + size], pos + size
    else:
      raise ExampleParseError(f"field {number}: unsupported wire type {wire}")
    yield number, wire, value


def _signed64(value: int) -> int:
  return value - (1 << 64) if value >= 1 << 63 else value


def _parse_feature(data: memoryview) -> list[bytes] | list[float] | list[int]:
  """A tf.train.Feature: bytes_list = 1, float_list = 2, int64_list = 3 (packed or not)."""
  values: list = []
  for kind, wire, payload in _fields(data):
    if wire != _LENGTH_DELIMITED:
      raise ExampleParseError(f"Feature field {kind} has wire type {wire}")
    for number, item_wire, item in _fields(payload):
      if number != 1:
        continue
      if kind == 1 and item_wire == _LENGTH_DELIMITED:
        values.append(bytes(item))
      elif kind == 2 and item_wire == _LENGTH_DELIMITED:  # Packed floats.
        if len(item) % 4:
          raise ExampleParseError("packed float list of odd length")
        values.extend(struct.unpack(f"<{len(item) // 4}f", item))
      elif kind == 2 and item_wire == _FIXED32:
        values.append(struct.unpack("<f", item)[0])
      elif kind == 3 and item_wire == _LENGTH_DELIMITED:  # Packed varints.
        pos = 0
        while pos < len(item):
          value, pos = _read_varint(item, pos)
          values.append(_signed64(value))
      elif kind == 3 and item_wire == _VARINT:
        values.append(_signed64(item))
      else:
        raise ExampleParseError(f"Feature kind {kind} with item wire type {item_wire}")
  return values


def parse_example(data: bytes) -> dict[str, list[bytes] | list[float] | list[int]]:
  """Decodes a serialized tf.train.Example into {feature name: list of values}.

  Raises:
    ExampleParseError: the bytes are not a well-formed Example.
  """
  features: dict[str, list] = {}
  for number, wire, message in _fields(memoryview(data)):
    if number != 1 or wire != _LENGTH_DELIMITED:  # Example.features
      continue
    for entry_number, entry_wire, entry in _fields(message):
      if entry_number != 1 or entry_wire != _LENGTH_DELIMITED:  # Features.feature map entries.
        continue
      key, value = None, memoryview(b"")
      for part, part_wire, payload in _fields(entry):
        if part == 1 and part_wire == _LENGTH_DELIMITED:
          key = bytes(payload).decode("utf-8")
        elif part == 2 and part_wire == _LENGTH_DELIMITED:
          value = payload
      if key is None:
        raise ExampleParseError("feature map entry without a key")
      features[key] = _parse_feature(value)
  return features


# ---- prepared dataset folders ------------------------------------------------------------------
def _not_a_dataset_message(folder: pathlib.Path) -> str:
  candidates = sorted(str(p.parent) for depth in ("*", "*/*", "*/*/*")
                      for p in folder.glob(f"{depth}/{INFO_NAME}"))[:5]
  hint = f"; prepared datasets below it: {', '.join(candidates)}" if candidates else ""
  return (f"{folder} is not a prepared TFDS dataset folder (no {INFO_NAME}; give the versioned "
          f"folder, e.g. ~/tensorflow_datasets/piccolo/1.0.0){hint}")


def shard_paths(tfds_dir: str | os.PathLike[str]) -> list[pathlib.Path]:
  """The ArrayRecord shard files of every split of a prepared dataset, in split/shard order.

  Raises:
    FileNotFoundError: the folder, its dataset_info.json or a shard is missing.
    ValueError: the dataset is not stored as ArrayRecord.
  """
  folder = pathlib.Path(tfds_dir).expanduser()
  if not folder.is_dir():
    raise FileNotFoundError(f"TFDS dataset folder not found: {folder}")
  info_path = folder / INFO_NAME
  if not info_path.is_file():
    raise FileNotFoundError(_not_a_dataset_message(folder))
  try:
    info = json.loads(info_path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{info_path}: not valid JSON ({e})") from e
  file_format = info.get("fileFormat", "tfrecord")
  if file_format != "array_record":
    raise ValueError(f"{info_path}: the dataset is stored as {file_format!r}; rebuild it with "
                     "file_format='array_record' (the builders in data/ do by default)")
  paths = []
  for split in info.get("splits", []):
    lengths = split.get("shardLengths", [])
    template = split.get("filepathTemplate") or _DEFAULT_TEMPLATE
    for i in range(len(lengths)):
      name = (template.replace("{DATASET}", info["name"]).replace("{SPLIT}", split["name"])
              .replace("{FILEFORMAT}", "array_record")
              .replace("{SHARD_X_OF_Y}", f"{i:05d}-of-{len(lengths):05d}")
              .replace("{SHARD_INDEX}", f"{i:05d}").replace("{NUM_SHARDS}", f"{len(lengths):05d}"))
      path = folder / name
      if not path.is_file():
        raise FileNotFoundError(f"{info_path}: shard {name} of split {split['name']!r} is missing")
      paths.append(path.resolve())
  if not paths:
    raise ValueError(f"{info_path}: the dataset has no shards")
  return paths


def _class_names(folder: pathlib.Path) -> list[str]:
  labels_path = folder / f"{LABEL_FEATURE}.labels.txt"
  if not labels_path.is_file():
    raise FileNotFoundError(f"{labels_path} not found: the dataset needs a ClassLabel feature "
                            f"{LABEL_FEATURE!r} with class names")
  return [line.strip() for line in labels_path.read_text().splitlines() if line.strip()]


def _class_index(dataset_classes: Sequence[str], classes: Sequence[str]) -> dict[int, int]:
  """Dataset label index -> index in `classes`, matching names (exact, then case-insensitive).

  Dataset classes absent from `classes` map to -1 (an error if an image uses them).
  """
  lowered = [c.lower() for c in classes]
  mapping = {}
  for i, name in enumerate(dataset_classes):
    if name in classes:
      mapping[i] = list(classes).index(name)
    elif name.lower() in lowered:
      mapping[i] = lowered.index(name.lower())
    else:
      mapping[i] = -1
  return mapping


def _text(features: dict, name: str) -> str:
  values = features.get(name) or [b""]
  return values[0].decode("utf-8") if isinstance(values[0], bytes) else str(values[0])


def load_records(tfds_dir: str | os.PathLike[str], classes: Sequence[str]) -> list[ImageRecord]:
  """Records of every image of a prepared dataset folder (all splits).

  Labels are mapped by class **name** onto the order of `classes`. `path` is the shard file,
  `record_index` the example index inside it; records come in shard order.

  Raises:
    FileNotFoundError: the folder, dataset_info.json, label names or a shard is missing.
    ValueError: naming every dataset class used by an image but absent from `classes`, or the
      shard and index of an example with a bad modality, empty lesion_id or no image.
  """
  folder = pathlib.Path(tfds_dir).expanduser()
  paths = shard_paths(folder)
  dataset_classes = _class_names(folder)
  mapping = _class_index(dataset_classes, classes)
  records, problems, unknown = [], [], {}
  for path in paths:
    source = _source(str(path))
    for index in range(len(source)):
      where = f"{path} [record {index}]"
      try:
        features = parse_example(source[index])
      except ExampleParseError as e:
        problems.append(f"{where}: {e}")
        continue
      labels = features.get(LABEL_FEATURE) or []
      if len(labels) != 1 or not 0 <= int(labels[0]) < len(dataset_classes):
        problems.append(f"{where}: bad label {labels}")
        continue
      label = mapping[int(labels[0])]
      if label < 0:
        unknown.setdefault(dataset_classes[int(labels[0])], where)
        continue
      modality = _text(features, "modality").lower()
      lesion_id = _text(features, "lesion_id")
      if modality not in MODALITIES:
        problems.append(f"{where}: unknown modality {modality!r} (expected one of {MODALITIES})")
      if not lesion_id:
        problems.append(f"{where}: empty lesion_id")
      if not features.get("image"):
        problems.append(f"{where}: no image")
      if modality in MODALITIES and lesion_id and features.get("image"):
        records.append(ImageRecord(
            path=str(path), modality=modality, label=label, lesion_id=lesion_id,
            patient_id=_text(features, "patient_id"), pair_id=_text(features, "pair_id"),
            record_index=index))
  if unknown:
    problems.insert(0, f"{folder}: dataset classes not in the configured classes "
                    f"{list(classes)}: " + ", ".join(f"{name!r} (first at {where})"
                                                    for name, where in unknown.items()))
  if problems:
    raise ValueError(f"{len(problems)} problem(s) in {folder}:\n  " + "\n  ".join(problems))
  return records


# ---- per-process source cache ------------------------------------------------------------------
_LOCK = threading.Lock()
_SOURCES: dict[str, object] = {}
_SOURCES_PID = os.getpid()


def _source(path: str):
  """The opened ArrayRecord data source of `path`, cached per process."""
  global _SOURCES_PID
  with _LOCK:
    if _SOURCES_PID != os.getpid():  # A forked worker: do not share the parent's readers.
      _SOURCES.clear()
      _SOURCES_PID = os.getpid()
    source = _SOURCES.get(path)
    if source is None:
      if not os.path.isfile(path):
        raise FileNotFoundError(f"ArrayRecord shard not found: {path}")
      import grain  # pylint: disable=g-import-not-at-top

      source = grain.sources.ArrayRecordDataSource(path)
      _SOURCES[path] = source
    return source


def read_encoded(record: ImageRecord) -> bytes:
  """The encoded image bytes of a record from `load_records`, as the builder stored them.

  Raises:
    FileNotFoundError: the shard is missing.
    ValueError: naming shard and index, for an index out of range or a record without image.
  """
  source = _source(record.path)
  where = f"{record.path} [record {record.record_index}]"
  if not 0 <= record.record_index < len(source):
    raise ValueError(f"{where}: index out of range (the shard has {len(source)} records)")
  try:
    features = parse_example(source[record.record_index])
  except ExampleParseError as e:
    raise ValueError(f"{where}: {e}") from e
  images = features.get("image")
  if not images or not isinstance(images[0], bytes):
    raise ValueError(f"{where}: the record has no encoded image")
  return images[0]
