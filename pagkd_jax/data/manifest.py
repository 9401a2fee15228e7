"""Where the images are: CSV manifests, class folders, and the split table `train.py` writes.

Every loader returns `ImageRecord`s (see `records.py`). Bad input is reported all at once: one
`ManifestError` lists every faulty row as `file:row: path: problem`, so a user fixes a manifest in
one pass instead of one error per run.
"""

import collections
import csv
import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

from pagkd_jax.data import pairs as pairs_lib
from pagkd_jax.data.records import MODALITIES, SPLITS, ImageRecord

REQUIRED_COLUMNS = ("path", "modality", "label", "lesion_id")
OPTIONAL_COLUMNS = ("patient_id", "pair_id")
PAIRED_COLUMN = "paired"  # Written by write_records_csv (splits.csv), ignored when read.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
# Files named `<lesion>__<anything>.<ext>` in a class folder belong to lesion `<lesion>`.
LESION_SEPARATOR = "__"


class ManifestError(ValueError):
  """One or more rows of a manifest (or entries of a folder) are invalid."""

  def __init__(self, problems: Sequence[str]):
    self.problems = list(problems)
    super().__init__(
        f"{len(self.problems)} problem(s) in the image list:\n  " + "\n  ".join(self.problems))


def parse_label(value: str, classes: Sequence[str]) -> int:
  """Class index of `value`: a class name (exact, then case-insensitive) or an index in range.

  Raises:
    ValueError: naming `value` and the known classes.
  """
  value = value.strip()
  if value in classes:
    return list(classes).index(value)
  lowered = [c.lower() for c in classes]
  if value.lower() in lowered:
    return lowered.index(value.lower())
  try:
    index = int(value)
  except ValueError:
    index = None
  if index is not None and 0 <= index < len(classes):
    return index
  raise ValueError(f"unknown label {value!r} (classes: {', '.join(classes)}; or an index "
                   f"0..{len(classes) - 1})")


def _cell(row: Mapping[str, Any], name: str) -> str:
  """The stripped text of column `name` of a CSV row ("" when absent or empty)."""
  value = row.get(name)
  return value.strip() if isinstance(value, str) else ""


def _check_lesion_consistency(records: Sequence[ImageRecord], source: str) -> list[str]:
  """Problems with lesions whose rows disagree on the label or on the patient.

  A lesion has one class, and one patient: if one of its images named a patient and another did
  not, the two would fall into different split groups and could leak across splits.
  """
  by_lesion: dict[str, list[ImageRecord]] = collections.defaultdict(list)
  for record in records:
    by_lesion[record.lesion_id].append(record)
  problems = []
  for lesion, members in by_lesion.items():
    for attribute in ("label", "patient_id"):
      values = sorted({getattr(r, attribute) for r in members})
      if len(values) > 1:
        where = ", ".join(
            f"{getattr(r, attribute)!r} ({r.path}" + (f", row {r.row})" if r.row else ")")
            for r in members)
        problems.append(f"{source}: lesion {lesion!r} has several {attribute} values: {where}")
  return problems


def read_manifest(
    csv_path: str | os.PathLike[str],
    classes: Sequence[str],
    *,
    check_files: bool = True,
) -> list[ImageRecord]:
  """Reads a CSV manifest with columns `path, modality, label, lesion_id[, patient_id, pair_id, split]`.

  `path` is relative to the manifest's folder (absolute paths are kept) and is stored absolute;
  `modality` is `wli`/`nbi` in any case; `label` is a class name of `classes` or an index into it;
  `split` (optional) is `train`/`val`/`test` or empty. Other columns are ignored. `ImageRecord.row` is the
  1-based data row (the header is row 0).

  Raises:
    FileNotFoundError: the manifest does not exist.
    ManifestError: listing `file:row: path: problem` for every missing column, unknown
      modality, unknown label or split, empty path or lesion_id, duplicate path, missing file (when
      `check_files`), and lesions whose rows disagree on label or patient.
  """
  records, problems = parse_manifest(csv_path, classes, check_files=check_files)
  if problems:
    raise ManifestError(problems)
  return records


def parse_manifest(
    csv_path: str | os.PathLike[str],
    classes: Sequence[str],
    *,
    check_files: bool = True,
) -> tuple[list[ImageRecord], list[str]]:
  """`read_manifest` without raising on row problems: the records of the valid rows, and one
  `file:row: path: problem` line per problem (as `ManifestError.problems`).

  Raises:
    FileNotFoundError: the manifest does not exist.
    ManifestError: the header lacks a required column (no row can be read).
  """
  csv_path = pathlib.Path(csv_path)
  if not csv_path.is_file():
    raise FileNotFoundError(f"manifest not found: {csv_path}")
  base = csv_path.resolve().parent
  with open(csv_path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f, skipinitialspace=True)
    header = [(name or "").strip().lower() for name in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
      raise ManifestError([f"{csv_path}:0: header: missing column {c!r} (found: {header})"
                           for c in missing])
    rows = [{(k or "").strip().lower(): v for k, v in raw.items()} for raw in reader]

  records, problems = [], []
  first_row_of_path: dict[str, int] = {}
  for row_number, row in enumerate(rows, start=1):
    raw_path = _cell(row, "path")
    where = f"{csv_path}:{row_number}: {raw_path or '<empty path>'}"
    row_problems = []
    if not raw_path:
      row_problems.append("empty path")
    modality = _cell(row, "modality").lower()
    if modality not in MODALITIES:
      row_problems.append(
          f"unknown modality {_cell(row, 'modality')!r} (expected one of {MODALITIES})")
    try:
      label = parse_label(_cell(row, "label"), classes)
    except ValueError as e:
      row_problems.append(str(e))
      label = -1
    lesion_id = _cell(row, "lesion_id")
    if not lesion_id:
      row_problems.append("empty lesion_id")
    split = _cell(row, "split").lower()
    if split not in ("",) + SPLITS:
      row_problems.append(f"unknown split {_cell(row, 'split')!r} (expected one of {SPLITS} or empty)")
    path = os.path.normpath(os.path.join(base, raw_path)) if raw_path else ""
    if path:
      if path in first_row_of_path:
        row_problems.append(f"duplicate path (also row {first_row_of_path[path]})")
      else:
        first_row_of_path[path] = row_number
      if check_files and not os.path.isfile(path):
        row_problems.append(f"file not found: {path}")
    problems.extend(f"{where}: {p}" for p in row_problems)
    if not row_problems:
      records.append(ImageRecord(
          path=path, modality=modality, label=label, lesion_id=lesion_id,
          patient_id=_cell(row, "patient_id"), pair_id=_cell(row, "pair_id"), row=row_number, split=split))
  if not rows:
    problems.append(f"{csv_path}:0: header: the manifest has no data rows")
  problems.extend(_check_lesion_consistency(records, str(csv_path)))
  return records, problems


def records_from_folder(root: str | os.PathLike[str], classes: Sequence[str]) -> list[ImageRecord]:
  """Lists `ROOT/<modality>/<class>/*.{jpg,jpeg,png,tif,tiff}` (case-insensitive names).

  Modality folders are `wli` and `nbi` (any case); class folders are names of `classes`. Each
  image is its own lesion, `lesion_id = "<modality>/<class>/<stem>"`, unless its name is
  `<lesion>__<anything>.<ext>`: then `lesion_id = "<lesion>"`, shared by every file with that
  prefix in any modality or class folder (so `wli/adenoma/L7__a.png` and `nbi/adenoma/L7__b.png`
  are one lesion and always land in the same split). A pair is named alike in both modalities: a
  `<lesion>__<view>` name (without extension) found under `wli/` and under `nbi/` is the `pair_id` of both
  files (`wli/adenoma/L7__0.png` and `nbi/adenoma/L7__0.png`: pair `L7__0`, the synthetic data's layout);
  other files have none. Hidden files and other extensions are skipped. Records are sorted by path; `row` is 0.

  Raises:
    FileNotFoundError: `root` is not a folder.
    ManifestError: unknown modality or class folders (named), no images at all, or a lesion
      prefix used under two classes.
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"image folder not found: {root}")
  class_of_folder = {c.lower(): i for i, c in enumerate(classes)}
  records, problems = [], []
  for modality_dir in sorted(p for p in root.iterdir() if not p.name.startswith(".")):
    if not modality_dir.is_dir():
      continue
    modality = modality_dir.name.lower()
    if modality not in MODALITIES:
      problems.append(f"{modality_dir}: unknown modality folder {modality_dir.name!r} "
                      f"(expected {MODALITIES})")
      continue
    for class_dir in sorted(p for p in modality_dir.iterdir() if not p.name.startswith(".")):
      if not class_dir.is_dir():
        continue
      label = class_of_folder.get(class_dir.name.lower())
      if label is None:
        problems.append(f"{class_dir}: unknown class folder {class_dir.name!r} "
                        f"(classes: {', '.join(classes)})")
        continue
      for image_path in sorted(class_dir.iterdir()):
        if (image_path.name.startswith(".") or not image_path.is_file()
            or image_path.suffix.lower() not in IMAGE_EXTENSIONS):
          continue
        stem = image_path.stem
        if LESION_SEPARATOR in stem and stem.split(LESION_SEPARATOR, 1)[0]:
          lesion_id = stem.split(LESION_SEPARATOR, 1)[0]
        else:
          lesion_id = f"{modality}/{classes[label]}/{stem}"
        records.append(ImageRecord(path=str(image_path.resolve()), modality=modality,
                                   label=label, lesion_id=lesion_id))
  records = _pair_by_name(records)
  if not records and not problems:
    problems.append(f"{root}: no images found under <modality>/<class>/ "
                    f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
  problems.extend(_check_lesion_consistency(records, str(root)))
  if problems:
    raise ManifestError(problems)
  return records


def _pair_by_name(records: Sequence[ImageRecord]) -> list[ImageRecord]:
  """Folder records with `pair_id = <lesion>__<view>` where that file name (without extension) is in both
  modalities (see `records_from_folder`)."""
  stems = [pathlib.Path(r.path).stem for r in records]
  named = [LESION_SEPARATOR in s and bool(s.split(LESION_SEPARATOR, 1)[0]) for s in stems]
  of_modality = lambda m: {s for r, s, n in zip(records, stems, named) if n and r.modality == m}
  in_both = of_modality("wli") & of_modality("nbi")
  return [dataclasses.replace(r, pair_id=s) if n and s in in_both else r for r, s, n in zip(records, stems, named)]


def load_records(data_config: Any, *, check_files: bool = True) -> list[ImageRecord]:
  """Records of `config.data`: from exactly one of `manifest`, `root` or `tfds_dir`.

  `check_files=False` leaves missing manifest files to the caller (`validate.check_records`
  reports them with the other unreadable files).

  Raises:
    ValueError: none or several of the three are set.
  """
  classes = tuple(data_config.classes)
  sources = {
      "manifest": str(data_config.get("manifest", "") or ""),
      "root": str(data_config.get("root", "") or ""),
      "tfds_dir": str(data_config.get("tfds_dir", "") or ""),
  }
  chosen = [name for name, value in sources.items() if value]
  if not chosen:
    raise ValueError("no data given: set config.data.manifest (CSV), config.data.root (folder "
                     "<modality>/<class>/images) or config.data.tfds_dir")
  if len(chosen) > 1:
    raise ValueError("set only one data source; got " +
                     ", ".join(f"config.data.{n}={sources[n]!r}" for n in chosen))
  if chosen[0] == "manifest":
    records = read_manifest(sources["manifest"], classes, check_files=check_files)
  elif chosen[0] == "root":
    records = records_from_folder(sources["root"], classes)
  else:
    from pagkd_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
    records = tfds_source.load_records(sources["tfds_dir"], classes)
  counts = collections.Counter((r.modality, classes[r.label]) for r in records)
  logging.info("Loaded %d images from %s: %s", len(records), sources[chosen[0]],
               ", ".join(f"{m}/{c}={n}" for (m, c), n in sorted(counts.items())))
  return records


def write_records_csv(
    records: Sequence[ImageRecord],
    splits: Sequence[str],
    path: str | os.PathLike[str],
    classes: Sequence[str],
) -> None:
  """Writes `path, modality, label, lesion_id, split, patient_id, pair_id, paired`, one row per record.

  Labels are written as class names and paths absolute, so the file is itself a valid manifest
  for `read_manifest` (its `split` column is used with `config.data.splits = "manifest"` only; `paired` is
  ignored there). `paired` is 1 for the images of the training split's pairs (`pairs.find_pairs`: one WLI and
  one NBI training image with the same pair_id; the paired stream's data, left out of the unpaired WLI stream
  when that stream runs) and 0 for every other image.

  Raises:
    ValueError: `records` and `splits` differ in length.
  """
  if len(records) != len(splits):
    raise ValueError(f"{len(records)} records but {len(splits)} split names")
  paired = pairs_lib.paired_flags(records, splits)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(REQUIRED_COLUMNS + ("split",) + OPTIONAL_COLUMNS + (PAIRED_COLUMN,))
    for record, split, in_pair in zip(records, splits, paired):
      writer.writerow([record.path, record.modality, classes[record.label], record.lesion_id,
                       split, record.patient_id, record.pair_id, int(in_pair)])
