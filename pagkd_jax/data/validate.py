"""Checks a data set before training: every problem at once, each with its manifest row and path.

  python -m pagkd_jax.data.validate configs/piccolo.py --config.data.manifest=/data/piccolo/manifest.csv
  python -m pagkd_jax.data.validate /data/piccolo/manifest.csv [--classes=a,b,c] [--image_size=448]

`train.py` runs the same check (`experiment.load_split_data`) before it trains anything. Given a config, its values
are checked first (`config_check`, as train.py does): a mistaken one exits with status 2.

Errors (training refuses to start):
  * in the manifest, found when it is read (`manifest.parse_manifest`): missing columns, empty path or
    lesion_id, unknown modality or label, duplicate paths, lesions whose rows disagree on label or patient;
  * per image, found by reading and decoding every image once (thread pool): missing or unreadable file,
    undecodable or truncated image, and, only where a size floor is set (`config.data.min_image_size` > 0), an image
    whose shorter side is below it; these are the *bad files* that `config.data.skip_bad_files=True` drops;
  * over the data set: a class without images of a modality that other classes have (or of a modality the stage
    trains on), a class without training images of such a modality, and the same image content (BLAKE2b of the
    encoded bytes) in two splits (test or validation images leaking into training).
Warnings (training goes on): a class with fewer than `group_size` (K) training images of a modality (its groups
are drawn with repetition), the same content twice within one split, inconsistent pair_ids (`pairs.find_pairs`:
two images of one modality, two lesions, labels or splits under one pair_id), which the paired stream refuses, and
images smaller than the training input on
their shorter side (`min(height, width) < config.data.image_size`): every image is resized to `image_size` x
`image_size`, so these are upsampled; one warning counts them and the report (`Report.upsampled`, printed by the
command line) names each.
"""

import collections
import concurrent.futures
import csv
import dataclasses
import hashlib
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from pagkd_jax.data import image_io
from pagkd_jax.data import manifest as manifest_lib
from pagkd_jax.data import pairs as pairs_lib
from pagkd_jax.data.records import MODALITIES, ImageRecord

SKIPPED_FILES_NAME = "skipped_files.csv"
SKIPPED_COLUMNS = ("row", "path", "record_index", "modality", "label", "problem")


@dataclasses.dataclass(frozen=True)
class Finding:
  """One problem: `text` is `where: what` (`manifest:row: path: ...` for manifest rows).

  `record` is set when the problem is the file of one record (missing, unreadable, undecodable, below the size
  floor):
  skipping that record removes the problem.
  """

  text: str
  record: ImageRecord | None = None

  def __str__(self) -> str:
    return self.text


@dataclasses.dataclass
class Report:
  """What `check_records` found in `num_images` images."""

  errors: list[Finding] = dataclasses.field(default_factory=list)
  warnings: list[Finding] = dataclasses.field(default_factory=list)
  upsampled: list[Finding] = dataclasses.field(default_factory=list)  # One per image smaller than the input.
  num_images: int = 0
  seconds: float = 0.0  # Spent reading and decoding.

  @property
  def bad_files(self) -> list[Finding]:
    """The errors that `skip_bad_files` can skip (one per record)."""
    return [f for f in self.errors if f.record is not None]

  @property
  def unskippable(self) -> list[Finding]:
    return [f for f in self.errors if f.record is None]

  def summary(self) -> str:
    return (f"{self.num_images} images checked: {len(self.errors)} error(s) ({len(self.bad_files)} bad files), "
            f"{len(self.warnings)} warning(s); read and decoded in {self.seconds:.1f} s")

  def format(self) -> str:
    """Errors, then warnings, then the summary, one finding a line."""
    lines = []
    if self.errors:
      lines += [f"ERRORS ({len(self.errors)}):"] + [f"  {f}" for f in self.errors]
    if self.warnings:
      lines += [f"WARNINGS ({len(self.warnings)}):"] + [f"  {f}" for f in self.warnings]
    if self.upsampled:
      lines += [f"UPSAMPLED ({len(self.upsampled)}):"] + [f"  {f}" for f in self.upsampled]
    lines.append(self.summary())
    return "\n".join(lines)


class DataCheckError(manifest_lib.ManifestError):
  """The data set has errors (`report.errors`, all of them listed in the message)."""

  def __init__(self, report: Report):
    self.report = report
    super().__init__([str(f) for f in report.errors])
    hint = ""
    if report.bad_files and not report.unskippable:
      hint = (f"\nTo train without the {len(report.bad_files)} bad file(s), set config.data.skip_bad_files=True "
              f"(they are then listed in WORKDIR/{SKIPPED_FILES_NAME}).")
    elif report.bad_files:
      hint = (f"\nconfig.data.skip_bad_files=True would skip the {len(report.bad_files)} bad file(s), but the other "
              f"{len(report.unskippable)} problem(s) must be fixed in the data.")
    self.args = (self.args[0] + hint,)


def describe(record: ImageRecord, source: str) -> str:
  """Where a record came from: `manifest:row: path` for manifest rows, else `path` or `shard [record i]`."""
  if record.row:
    return f"{source}:{record.row}: {record.path}"
  if record.record_index >= 0:
    return f"{record.path} [record {record.record_index}]"
  return record.path


@dataclasses.dataclass(frozen=True)
class ImageFacts:
  """What reading one image found: its content hash and size, or `problem` (why it cannot be used)."""

  digest: str = ""
  height: int = 0
  width: int = 0
  problem: str = ""


def _inspect(record: ImageRecord) -> ImageFacts:
  """Reads and decodes one image once: its content hash and size, or what is wrong with the file."""
  try:
    data = image_io.read_encoded(record)
  except FileNotFoundError:
    return ImageFacts(problem="file not found")
  except IsADirectoryError:
    return ImageFacts(problem="is a folder, not an image file")
  except OSError as e:
    return ImageFacts(problem=f"cannot read file ({type(e).__name__}: {e.strerror or e})")
  except ValueError as e:  # An ArrayRecord entry without a valid image.
    return ImageFacts(problem=str(e))
  if not data:
    return ImageFacts(problem="empty file")
  try:
    height, width = image_io.decode_image(data, "").shape[:2]
  except image_io.ImageDecodeError as e:
    return ImageFacts(problem=str(e).removeprefix(": "))
  return ImageFacts(hashlib.blake2b(data, digest_size=16).hexdigest(), height, width)


def inspect_images(records: Sequence[ImageRecord], num_threads: int | None = None) -> list[ImageFacts]:
  """Reads and decodes every record once (a thread pool; `num_threads` 0: in the calling thread), in order."""
  if num_threads == 0 or len(records) < 16:
    return [_inspect(r) for r in records]
  workers = num_threads or min(16, (os.cpu_count() or 1) + 2)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    return list(pool.map(_inspect, records, chunksize=8))


def check_records(
    records: Sequence[ImageRecord],
    splits: Sequence[str] | None,
    *,
    classes: Sequence[str],
    image_size: int,
    group_size: int,
    required_modalities: Sequence[str] = MODALITIES,
    source: str = "",
    num_threads: int | None = None,
    min_image_size: int = 0,
) -> Report:
  """Reads and decodes every record once and checks the data set (see the module docstring).

  Args:
    records: the images, e.g. from `manifest.parse_manifest`.
    splits: the split of each record ("train"/"val"/"test", from `splits.assign_splits`), or None when the
      data could not be split (then only the per-image and per-class checks run).
    classes: the class names (`record.label` indexes them).
    image_size: the side of the training input; images whose shorter side is smaller are upsampled (a warning
      counts them, `Report.upsampled` names each).
    group_size: K, images per class per step; fewer training images of a class give a warning.
    required_modalities: modalities the run trains on; every class needs images of each of them.
    source: the manifest (or folder) name used in messages for manifest rows.
    num_threads: decoding threads (None: a few per core; 0: in the calling thread).
    min_image_size: a floor on the shorter side: smaller images are errors (bad files); 0: none.

  Returns:
    The `Report`: file errors first (in record order), then data-set errors; warnings.
  """
  if splits is not None and len(splits) != len(records):
    raise ValueError(f"{len(records)} records but {len(splits)} split names")
  report = Report(num_images=len(records))
  start = time.perf_counter()
  facts = inspect_images(records, num_threads)
  report.seconds = time.perf_counter() - start
  good = []
  for i, (record, fact) in enumerate(zip(records, facts)):
    where = describe(record, source)
    if fact.problem:
      report.errors.append(Finding(f"{where}: {fact.problem}", record))
    elif min(fact.height, fact.width) < min_image_size:
      report.errors.append(Finding(
          f"{where}: image is {fact.width} x {fact.height} pixels, below the size floor "
          f"config.data.min_image_size={min_image_size} on its shorter side", record))
    else:
      good.append(i)
      if min(fact.height, fact.width) < image_size:
        report.upsampled.append(Finding(f"{where}: {fact.width} x {fact.height} pixels", record))
  if report.upsampled:
    shown = ", ".join(f.text for f in report.upsampled[:3])
    report.warnings.append(Finding(
        f"{source or 'data set'}: {len(report.upsampled)} of {len(records)} image(s) are smaller than the "
        f"{image_size} x {image_size} training input (config.data.image_size) on their shorter side and are "
        f"upsampled (e.g. {shown}); config.data.min_image_size sets a floor below which an image is an error"))

  # Classes per modality, over the images that can be read.
  name = lambda label: classes[label] if 0 <= label < len(classes) else str(label)
  counts = collections.Counter((records[i].modality, records[i].label) for i in good)
  present = {m for m, _ in counts}
  place = source or "data set"
  for modality in MODALITIES:
    if modality not in present and modality not in required_modalities:
      continue
    for label in range(len(classes)):
      if not counts[modality, label]:
        report.errors.append(Finding(f"{place}: class {classes[label]!r} has no readable {modality.upper()} images"))
  if splits is None:
    return report

  train_counts = collections.Counter(
      (records[i].modality, records[i].label) for i in good if splits[i] == "train")
  for modality in MODALITIES:
    if modality not in present and modality not in required_modalities:
      continue
    for label in range(len(classes)):
      n = train_counts[modality, label]
      if counts[modality, label] and not n:
        report.errors.append(Finding(
            f"{place}: class {classes[label]!r} has no readable {modality.upper()} images in the training split"))
      elif 0 < n < group_size:
        report.warnings.append(Finding(
            f"{place}: class {name(label)!r} has {n} training {modality.upper()} image(s), fewer than "
            f"data.group_size={group_size}: its groups are drawn with repetition"))

  # The same encoded bytes under several records.
  by_digest: dict[str, list[int]] = collections.defaultdict(list)
  for i in good:
    by_digest[facts[i].digest].append(i)
  for members in by_digest.values():
    if len(members) < 2:
      continue
    for i in members:
      others = "; ".join(f"{describe(records[j], source)} ({splits[j]})" for j in members if j != i)
      text = f"{describe(records[i], source)} ({splits[i]}): same image content as {others}"
      if len({splits[j] for j in members}) > 1:
        report.errors.append(Finding(text + ": one image in two splits leaks it between training and evaluation"))
      else:
        report.warnings.append(Finding(text))

  for problem in pairs_lib.find_pairs(records, splits, classes).problems:
    report.warnings.append(Finding(f"{place}: {problem} (the paired stream refuses such data)"))
  return report


def read_records(data_config: Any, manifest_path: str | None = None) -> tuple[list[ImageRecord], list[str], str]:
  """The records of `data_config` (or of the CSV `manifest_path`) for checking, without raising on bad rows.

  Returns:
    records: the valid rows (missing files are left to `check_records`). A given `manifest_path` (the synthetic
      data's, or the CLI's) is read instead of `data_config`'s source.
    problems: `ManifestError`-style lines for invalid rows or folder entries.
    source: the manifest or folder, for messages.

  Raises:
    FileNotFoundError, ValueError: no data source, or one that cannot be opened at all.
  """
  classes = tuple(data_config.classes)
  from_config = not manifest_path
  manifest_path = manifest_path or str(data_config.get("manifest", "") or "")
  if manifest_path:
    if from_config and (data_config.get("root") or data_config.get("tfds_dir")):
      manifest_lib.load_records(data_config, check_files=False)  # Raises: several sources set.
    records, problems = manifest_lib.parse_manifest(manifest_path, classes, check_files=False)
    return records, problems, str(manifest_path)
  source = str(data_config.get("root", "") or data_config.get("tfds_dir", "") or "")
  try:
    return manifest_lib.load_records(data_config, check_files=False), [], source
  except manifest_lib.ManifestError as e:
    return [], e.problems, source


def check_data(data_config: Any, *, manifest_path: str | None = None,
               required_modalities: Sequence[str] = MODALITIES,
               num_threads: int | None = None) -> tuple[list[ImageRecord], list[str] | None, Report]:
  """Reads, splits (`splits.split_records`: `data_config`'s folds or the manifest's split column) and checks a
  data set.

  Invalid manifest rows are errors of the report, listed before the problems of the other rows' images.

  Returns:
    The valid records, their splits (None when they cannot be split: then that is an error of the report), and
    the `Report`.

  Raises:
    FileNotFoundError, ValueError: no data source, or one that cannot be opened at all.
  """
  from pagkd_jax.data import splits as splits_lib  # pylint: disable=g-import-not-at-top

  records, problems, source = read_records(data_config, manifest_path)
  splits = None
  if records:
    try:
      splits = splits_lib.split_records(records, data_config)
    except ValueError as e:
      problems.append(f"{source}: cannot split the data: {e}")
  report = check_records(records, splits, classes=tuple(data_config.classes), image_size=data_config.image_size,
                         group_size=data_config.group_size, required_modalities=required_modalities,
                         source=source, num_threads=num_threads,
                         min_image_size=int(data_config.get("min_image_size", 0)))
  report.errors[:0] = [Finding(p) for p in problems]
  return records, splits, report


def drop_bad_files(records: Sequence[ImageRecord], splits: Sequence[str],
                   report: Report) -> tuple[list[ImageRecord], list[str]]:
  """`records` and `splits` without the records of `report.bad_files` (the others keep their split)."""
  bad = {f.record for f in report.bad_files}
  kept = [(r, s) for r, s in zip(records, splits) if r not in bad]
  return [r for r, _ in kept], [s for _, s in kept]


def write_skipped_files(path: str | os.PathLike[str], report: Report, classes: Sequence[str]) -> None:
  """Writes `row, path, record_index, modality, label, problem`, one line per skipped file."""
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(SKIPPED_COLUMNS)
    for finding in report.bad_files:
      r = finding.record
      writer.writerow([r.row, r.path, r.record_index, r.modality, classes[r.label], finding.text])


def read_skipped_files(path: str | os.PathLike[str]) -> set[tuple[str, int]]:
  """The `(path, record_index)` pairs listed by `write_skipped_files`; empty when the file does not exist."""
  if not os.path.exists(path):
    return set()
  with open(path, newline="", encoding="utf-8") as f:
    return {(row["path"], int(row["record_index"])) for row in csv.DictReader(f)}


# ---- command line ------------------------------------------------------------------------------------------
def _is_config_file(arg: str) -> bool:
  return arg.split(":", 1)[0].endswith(".py")


def _main(argv: Sequence[str]) -> int:
  from absl import flags  # pylint: disable=g-import-not-at-top

  from pagkd_jax import base_config  # pylint: disable=g-import-not-at-top

  fl = flags.FLAGS
  if len(argv) != (1 if fl.config is not None else 2):
    print(__doc__.split("\n\n")[0], file=sys.stderr)
    print("usage: python -m pagkd_jax.data.validate CONFIG.py[:ARG] [--config.data.X=...] | MANIFEST.csv "
          "[--classes=a,b,c] [--image_size=N] [--group_size=K] [--stage=pagkd] [--fold=F] ...", file=sys.stderr)
    return 2
  if fl.config is not None:
    from pagkd_jax import config_check  # pylint: disable=g-import-not-at-top
    config = base_config.from_command_line(fl.config)
    config_check.exit_on_problems(config_check.find_problems(config))  # Exit status 2, before any data is read.
    data, stage, manifest_path = config.data, config.stage, None
    if data.synthetic.enabled:
      from pagkd_jax.data import synthetic  # pylint: disable=g-import-not-at-top
      manifest_path = str(synthetic.ensure_generated(data))
  else:
    config = base_config.get_config()
    data, stage, manifest_path = config.data, fl.stage, argv[1]
    if fl.classes:
      data.classes = base_config.split_class_names(fl.classes)
    for name in ("image_size", "min_image_size", "group_size", "num_folds", "fold", "val_fraction", "split_seed"):
      if fl[name].value is not None:
        data[name] = fl[name].value
  from pagkd_jax import methods  # pylint: disable=g-import-not-at-top  (the command line only: the stage table)
  required = methods.get(stage).data_modalities
  try:
    _, _, report = check_data(data, manifest_path=manifest_path, required_modalities=required)
  except (FileNotFoundError, ValueError) as e:
    print(f"ERROR: {e}", file=sys.stderr)
    return 1
  source = manifest_path or data.manifest or data.root or data.tfds_dir
  print(f"Checked {source} (classes {', '.join(data.classes)}; image_size {data.image_size}; group_size "
        f"{data.group_size}; fold {data.fold} of {data.num_folds}):")
  print(report.format())
  return 1 if report.errors else 0


def main() -> None:
  """`python -m pagkd_jax.data.validate CONFIG_OR_MANIFEST [flags]`; exit status 1 when there are errors."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from pagkd_jax import methods  # pylint: disable=g-import-not-at-top  (the command line only: the stage table)

  config_flags.DEFINE_config_file("config", None, "Configuration file (configs/<name>.py[:arg]); the positional "
                                  "argument when it names a .py file.")
  flags.DEFINE_string("classes", None, "Manifest mode: comma-separated class names (default: the base config's).")
  flags.DEFINE_integer("image_size", None, "Manifest mode: training input side (default: the base config's).")
  flags.DEFINE_integer("min_image_size", None, "Manifest mode: shorter sides below this are errors (default 0: "
                       "none; smaller images are upsampled, with a warning).")
  flags.DEFINE_integer("group_size", None, "Manifest mode: K, images per class per step.")
  flags.DEFINE_integer("num_folds", None, "Manifest mode: cross-validation folds.")
  flags.DEFINE_integer("fold", None, "Manifest mode: test fold.")
  flags.DEFINE_float("val_fraction", None, "Manifest mode: validation fraction.")
  flags.DEFINE_integer("split_seed", None, "Manifest mode: split seed.")
  flags.DEFINE_enum("stage", "pagkd", list(methods.STAGES),
                    "Manifest mode: the stage (which modalities every class needs).")
  argv = list(sys.argv)
  # A positional config file becomes --config=..., so that --config.data.X=... overrides apply to it.
  positional = [a for a in argv[1:] if not a.startswith("-")]
  if positional and _is_config_file(positional[0]):
    argv[argv.index(positional[0])] = f"--config={positional[0]}"
  app.run(lambda args: sys.exit(_main(args)), argv=argv)


if __name__ == "__main__":
  main()
