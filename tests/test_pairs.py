"""Pair discovery, the release's split of the training pool and the `paired` column of splits.csv (spec 8).

Real files: the synthetic generator with `paired_fraction` (view k of a paired lesion is `<lesion>__<k>` in both
modalities), split by the project's folds.
"""

import collections
import csv
import dataclasses

import pytest

from pagkd_jax.data import image_io, manifest, pairs, splits, synthetic, validate
from pagkd_jax.data.records import ImageRecord

CLASSES = ("hyperplasia", "adenoma", "adenocarcinoma")
VIEWS = 2


@pytest.fixture(scope="module")
def split_data(tmp_path_factory):
  """(records, splits) of a tiny synthetic set: 4 lesions per class and modality, 2 of them paired, 3 folds."""
  path = synthetic.generate(tmp_path_factory.mktemp("synthetic"), image_size=16, lesions_per_class=4,
                            images_per_lesion=VIEWS, paired_fraction=0.5, seed=1)
  records = manifest.read_manifest(path, CLASSES)
  return records, splits.assign_splits(records, num_folds=3, fold=0, val_fraction=0.0, seed=0)


def test_pairs_are_the_views_of_the_training_lesions_seen_in_both_modalities(split_data):
  records, split_of = split_data
  found = pairs.training_pairs(records, split_of, CLASSES)
  train = [r for r, s in zip(records, split_of) if s == "train"]
  modalities = collections.defaultdict(set)
  for r in train:
    modalities[r.lesion_id].add(r.modality)
  both = sorted(lesion for lesion, m in modalities.items() if m == {"wli", "nbi"})
  assert both and len(both) < len(modalities)  # Some training lesions paired, some not.
  assert [p.pair_id for p in found] == sorted(f"{lesion}__{k}" for lesion in both for k in range(VIEWS))
  for pair in found:
    assert (pair.wli.modality, pair.nbi.modality) == ("wli", "nbi")
    assert pair.wli.lesion_id == pair.nbi.lesion_id == pair.pair_id.rsplit("__", 1)[0]
    assert pair.wli.label == pair.nbi.label == pair.label
    assert pair.wli.path.endswith(f"/wli/{CLASSES[pair.label]}/{pair.pair_id}.png")
    assert pair.nbi.path.endswith(f"/nbi/{CLASSES[pair.label]}/{pair.pair_id}.png")
  # Pairs of the test split exist in the data but are not training pairs.
  assert any(r.pair_id for r, s in zip(records, split_of) if s == "test")


def test_release_split_of_the_training_pool(split_data):
  """Unpaired WLI = training WLI minus the paired ones; unpaired NBI = all training NBI (paired ones included)."""
  records, split_of = split_data
  found = pairs.training_pairs(records, split_of, CLASSES)
  stream = pairs.unpaired_stream_records(records, split_of, found)
  train_wli = [r for r, s in zip(records, split_of) if s == "train" and r.modality == "wli"]
  train_nbi = [r for r, s in zip(records, split_of) if s == "train" and r.modality == "nbi"]
  paired_wli = {p.wli.path for p in found}
  assert [r for r in stream if r.modality == "nbi"] == train_nbi
  assert {p.nbi.path for p in found} <= {r.path for r in stream}
  assert [r for r in stream if r.modality == "wli"] == [r for r in train_wli if r.path not in paired_wli]
  assert len(train_wli) - len(paired_wli) == sum(r.modality == "wli" for r in stream) > 0
  assert not any(r.pair_id for r in stream if r.modality == "wli")  # Synthetic: every paired WLI is in a pair.
  # Without pairs the stream is the whole training split.
  assert pairs.unpaired_stream_records(records, split_of, []) == [r for r, s in zip(records, split_of)
                                                                   if s == "train"]


def test_splits_csv_says_which_images_are_paired(split_data, tmp_path):
  records, split_of = split_data
  out = tmp_path / "splits.csv"
  manifest.write_records_csv(records, split_of, out, CLASSES)
  with open(out, newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["path"] for r in rows] == [r.path for r in records]
  found = pairs.training_pairs(records, split_of, CLASSES)
  members = {r.path for p in found for r in (p.wli, p.nbi)}
  assert len(members) == 2 * len(found) > 0
  for row in rows:
    assert row["paired"] == ("1" if row["path"] in members else "0")
    if row["paired"] == "1":
      assert row["split"] == "train" and row["pair_id"]
  # Paired images of other splits (pair_id set, not training) are marked 0.
  assert any(row["pair_id"] and row["split"] == "test" and row["paired"] == "0" for row in rows)
  # The file is still a manifest: the project reads it back (the extra column is ignored).
  assert [r.pair_id for r in manifest.read_manifest(out, CLASSES)] == [r.pair_id for r in records]


def _record(path, modality, label=0, lesion="L1", pair_id="p1", row=0):
  return ImageRecord(path=f"/data/{path}", modality=modality, label=label, lesion_id=lesion, pair_id=pair_id, row=row)


def test_inconsistent_pairs_are_errors_naming_the_pair_id_and_images():
  records = [
      _record("a.png", "wli", pair_id="two_wli", row=1), _record("b.png", "wli", pair_id="two_wli", row=2),
      _record("c.png", "nbi", pair_id="two_wli", row=3),
      _record("d.png", "wli", label=0, lesion="L2", pair_id="labels"),
      _record("e.png", "nbi", label=2, lesion="L2", pair_id="labels"),
      _record("f.png", "wli", lesion="L3", pair_id="splits"), _record("g.png", "nbi", lesion="L3", pair_id="splits"),
      _record("h.png", "wli", lesion="L4", pair_id="lesions"), _record("i.png", "nbi", lesion="L5", pair_id="lesions"),
      _record("j.png", "wli", lesion="L6", pair_id="good"), _record("k.png", "nbi", lesion="L6", pair_id="good"),
  ]
  split_of = ["train"] * len(records)
  split_of[6] = "val"
  with pytest.raises(pairs.PairError) as error:
    pairs.training_pairs(records, split_of, CLASSES)
  assert error.value.problems == [
      "pair_id 'labels': the WLI image /data/d.png and the NBI image /data/e.png have different labels "
      "'hyperplasia' and 'adenocarcinoma'",
      "pair_id 'lesions': the WLI image /data/h.png and the NBI image /data/i.png have different lesions 'L4' and "
      "'L5'",
      "pair_id 'splits': the WLI image /data/f.png and the NBI image /data/g.png have different splits 'train' and "
      "'val'",
      "pair_id 'two_wli': 2 WLI images (/data/a.png (manifest row 1), /data/b.png (manifest row 2)); a pair has one "
      "image of each modality: give each view its own pair_id, e.g. <lesion>__<view>",
  ]
  assert str(error.value).startswith("4 inconsistent pair_id(s)")
  # Without the class names, labels are named by index; the consistent pair is still found by the lenient search.
  search = pairs.find_pairs(records, split_of)
  assert "different labels 0 and 2" in search.problems[0]
  assert [p.pair_id for p in search.pairs] == ["good"]


def test_one_image_of_a_pair_id_is_unpaired_not_an_error_and_other_splits_are_checked():
  records = [
      _record("a.png", "wli", pair_id="alone"),  # Its partner was left out (e.g. a bad file).
      _record("b.png", "wli", lesion="L2", pair_id="p_test"), _record("c.png", "nbi", lesion="L2", pair_id="p_test"),
      _record("d.png", "wli", lesion="L3", pair_id="p_train"), _record("e.png", "nbi", lesion="L3",
                                                                       pair_id="p_train"),
      _record("f.png", "nbi", lesion="L4", pair_id=""),
  ]
  split_of = ["train", "test", "test", "train", "train", "train"]
  search = pairs.find_pairs(records, split_of)
  assert search.problems == () and search.unmatched == ("alone",)
  assert [p.pair_id for p in search.pairs] == ["p_train"]
  assert [r.path for r in pairs.unpaired_stream_records(records, split_of, search.pairs)] == [
      "/data/a.png", "/data/e.png", "/data/f.png"]
  assert pairs.paired_flags(records, split_of) == [False, False, False, True, True, False]
  # A broken pair in the test split is an error too.
  records.append(_record("g.png", "nbi", lesion="L2", pair_id="p_test"))
  split_of.append("test")
  with pytest.raises(pairs.PairError, match=r"pair_id 'p_test': 2 NBI images \(/data/c.png, /data/g.png\)"):
    pairs.training_pairs(records, split_of)


def test_required_pairs_error_names_the_count_found():
  with pytest.raises(ValueError, match=r"at least data.paired_batch_size=24 pairs in the training split, found 0: "
                                       r"a pair is a WLI and an NBI training image"):
    pairs.require_pairs([], 24)
  few = [pairs.Pair(f"p{i}", _record(f"w{i}.png", "wli"), _record(f"n{i}.png", "nbi")) for i in range(5)]
  with pytest.raises(ValueError, match=r"found 5: .*; lower data.paired_batch_size or add pairs"):
    pairs.require_pairs(few, 24)
  pairs.require_pairs(few, 5)
  with pytest.raises(ValueError, match="records but"):
    pairs.find_pairs([few[0].wli], [])


def test_the_data_check_warns_of_inconsistent_pair_ids(split_data):
  records, split_of = split_data
  assert not validate.check_records(records, split_of, classes=CLASSES, image_size=16, group_size=1,
                                    source="m.csv").warnings
  # A second WLI view given the pair_id of the first: the check names the pair_id and goes on (a warning).
  first = next(i for i, (r, s) in enumerate(zip(records, split_of)) if r.pair_id and r.modality == "wli")
  twin = next(i for i, r in enumerate(records) if r.modality == "wli" and r.lesion_id == records[first].lesion_id
              and i != first)
  broken = list(records)
  broken[twin] = dataclasses.replace(records[twin], pair_id=records[first].pair_id)
  report = validate.check_records(broken, split_of, classes=CLASSES, image_size=16, group_size=1, source="m.csv")
  assert not report.errors
  assert [w.text for w in report.warnings] == [
      f"m.csv: pair_id {records[first].pair_id!r}: 2 WLI images ("
      + ", ".join(image_io.describe(broken[i]) for i in sorted((first, twin)))
      + "); a pair has one image of each modality: give each view its own pair_id, e.g. <lesion>__<view> "
      "(the paired stream refuses such data)"]
