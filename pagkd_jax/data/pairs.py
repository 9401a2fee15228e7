"""Pairs of a WLI and an NBI image of the same lesion, the data of the paired stream ("PaGKD (all)", spec 8).

A pair is exactly one WLI and one NBI record with the same non-empty `pair_id` (`ImageRecord.pair_id`, the
manifest's `pair_id` column). A lesion seen in several views gives one pair per view: view k of the two modalities
shares a pair_id (the synthetic generator's `paired_fraction` writes `<lesion_id>__<k>`), so a pair_id never names
two images of one modality. The two images are of one lesion: they share the `lesion_id`, hence (the manifest
check) the label, the patient and the split.

Every pair_id of the data is checked, whatever its split; a problem is an error naming the pair_id and its images:
two images of one modality, two lesions, two labels, two splits. A pair_id on a single image (its partner absent,
e.g. left out as a bad file) is no error: that image is simply unpaired (`PairSearch.unmatched`).

The release's split of the training pool (spec 8): the paired stream draws the pairs of the training split
(`training_pairs`); the unpaired class-group stream draws the training WLI images that are in no pair and ALL
training NBI images, the paired ones included (`unpaired_stream_records`).
"""

import collections
import dataclasses
from collections.abc import Sequence

from pagkd_jax.data import image_io
from pagkd_jax.data.records import ImageRecord

TRAIN = "train"


class PairError(ValueError):
  """The pair_ids of the data are inconsistent; `problems` has one line per faulty pair_id."""

  def __init__(self, problems: Sequence[str]):
    self.problems = list(problems)
    super().__init__(f"{len(self.problems)} inconsistent pair_id(s) (a pair is one WLI and one NBI image of one "
                     "lesion):\n  " + "\n  ".join(self.problems))


@dataclasses.dataclass(frozen=True)
class Pair:
  """One WLI and one NBI image of the same lesion and view."""

  pair_id: str
  wli: ImageRecord
  nbi: ImageRecord

  @property
  def label(self) -> int:
    return self.wli.label


@dataclasses.dataclass(frozen=True)
class PairSearch:
  """What `find_pairs` found.

  Attributes:
    pairs: the consistent pairs of the training split, sorted by pair_id.
    problems: one line per inconsistent pair_id (any split), naming it and its images.
    unmatched: pair_ids carried by a single image (no partner in the data), sorted.
  """

  pairs: tuple[Pair, ...]
  problems: tuple[str, ...]
  unmatched: tuple[str, ...]


def _label_name(label: int, classes: Sequence[str] | None) -> str:
  return repr(classes[label]) if classes is not None and 0 <= label < len(classes) else str(label)


def find_pairs(records: Sequence[ImageRecord], splits: Sequence[str],
               classes: Sequence[str] | None = None) -> PairSearch:
  """The pairs of the training split and the problems of every pair_id, without raising on them.

  Args:
    records: every record of the data set, (N,).
    splits: the split of each record ("train", "val", "test"), (N,).
    classes: class names, for the messages (labels are shown as indices without them).
  """
  if len(records) != len(splits):
    raise ValueError(f"{len(records)} records but {len(splits)} split names")
  members: dict[str, list[tuple[ImageRecord, str]]] = collections.defaultdict(list)
  for record, split in zip(records, splits):
    if record.pair_id:
      members[record.pair_id].append((record, split))
  pairs, problems, unmatched = [], [], []
  for pair_id in sorted(members):
    group = members[pair_id]
    by_modality = {m: [(r, s) for r, s in group if r.modality == m] for m in ("wli", "nbi")}
    crowded = [m for m in ("wli", "nbi") if len(by_modality[m]) > 1]
    if crowded:
      for modality in crowded:
        problems.append(
            f"pair_id {pair_id!r}: {len(by_modality[modality])} {modality.upper()} images ("
            + ", ".join(image_io.describe(r) for r, _ in by_modality[modality])
            + "); a pair has one image of each modality: give each view its own pair_id, e.g. <lesion>__<view>")
      continue
    if len(group) == 1:
      unmatched.append(pair_id)
      continue
    (wli, wli_split), = by_modality["wli"]
    (nbi, nbi_split), = by_modality["nbi"]
    where = f"the WLI image {image_io.describe(wli)} and the NBI image {image_io.describe(nbi)}"
    found = []
    if wli.lesion_id != nbi.lesion_id:
      found.append(f"lesions {wli.lesion_id!r} and {nbi.lesion_id!r}")
    if wli.label != nbi.label:
      found.append(f"labels {_label_name(wli.label, classes)} and {_label_name(nbi.label, classes)}")
    if wli_split != nbi_split:
      found.append(f"splits {wli_split!r} and {nbi_split!r}")
    if found:
      problems.append(f"pair_id {pair_id!r}: {where} have different " + ", ".join(found))
    elif wli_split == TRAIN:
      pairs.append(Pair(pair_id, wli, nbi))
  return PairSearch(tuple(pairs), tuple(problems), tuple(unmatched))


def training_pairs(records: Sequence[ImageRecord], splits: Sequence[str],
                   classes: Sequence[str] | None = None) -> list[Pair]:
  """The pairs of the training split, sorted by pair_id (possibly none).

  Raises:
    PairError: listing every inconsistent pair_id of the data (any split).
  """
  search = find_pairs(records, splits, classes)
  if search.problems:
    raise PairError(search.problems)
  return list(search.pairs)


def require_pairs(pairs: Sequence[Pair], batch_size: int) -> None:
  """Checks that the paired stream has at least one full batch of `batch_size` pairs per epoch.

  Raises:
    ValueError: naming the number of training pairs found, what makes a pair, and the batch size.
  """
  if batch_size < 1:
    raise ValueError(f"the paired batch size must be >= 1, got {batch_size}")
  if len(pairs) < batch_size:
    raise ValueError(
        f"the paired stream needs at least data.paired_batch_size={batch_size} pairs in the training split, found "
        f"{len(pairs)}: a pair is a WLI and an NBI training image of one lesion with the same non-empty pair_id "
        "(manifest column pair_id; the synthetic data's data.synthetic.paired_fraction > 0)"
        + ("" if not pairs else "; lower data.paired_batch_size or add pairs"))


def paired_images(pairs: Sequence[Pair]) -> set[tuple[str, int]]:
  """The (path, record_index) of every image of `pairs`."""
  return {(r.path, r.record_index) for pair in pairs for r in (pair.wli, pair.nbi)}


def unpaired_stream_records(records: Sequence[ImageRecord], splits: Sequence[str],
                            pairs: Sequence[Pair]) -> list[ImageRecord]:
  """The training records of the unpaired class-group stream next to the paired one (the release's split):
  the training WLI images in none of `pairs` and every training NBI image (paired ones included), in the order of
  `records`."""
  if len(records) != len(splits):
    raise ValueError(f"{len(records)} records but {len(splits)} split names")
  paired_wli = {(p.wli.path, p.wli.record_index) for p in pairs}
  return [r for r, s in zip(records, splits)
          if s == TRAIN and (r.modality == "nbi" or (r.path, r.record_index) not in paired_wli)]


def paired_flags(records: Sequence[ImageRecord], splits: Sequence[str]) -> list[bool]:
  """Per record, whether it is an image of a consistent training pair (the column `paired` of splits.csv).

  Inconsistent pair_ids count as unpaired here (`training_pairs` reports them as errors).
  """
  members = paired_images(find_pairs(records, splits).pairs)
  return [(r.path, r.record_index) in members for r in records]
