"""Tests for the paired stream's batches (spec 8): B pairs a step, one random draw per pair, exact resume.

Two kinds of real image files:
* marked images, 16 x 16: a constant colour that names the pair (red = class, green = pair number) with a white
  bar in one corner, and the SAME file content for the WLI and the NBI image of a pair. Rotation about the centre
  and flips keep the centre pixels, so the centre says which pair a row holds; the bar shows the draw, and the two
  images of a pair are equal after augmentation exactly when they got the same draw.
* the synthetic generator with `paired_fraction` (different WLI and NBI renderings of one lesion and view).
"""

import collections
import csv
import pickle

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from pagkd_jax.data import augment, class_groups, image_io, manifest, pair_batches, pairs, splits, synthetic

CLASSES = ("hyperplasia", "adenoma", "adenocarcinoma")
SIZE = 16
NUM_PAIRS = 10
B = 4
AUG = dict(rotate=True, hflip=True, vflip=True, random_resized_crop=False, color_jitter=0.0)
NO_AUG = dict(rotate=False, hflip=False, vflip=False, random_resized_crop=False, color_jitter=0.0)


def _marked_image(label: int, number: int) -> np.ndarray:
  image = np.full((SIZE, SIZE, 3), (60 * label + 10, 10 * number + 5, 100), np.uint8)
  image[2:5, 2:7] = 255  # The bar: far enough from the centre that the centre 2x2 stays the background.
  return image


@pytest.fixture(scope="module")
def marked_pairs(tmp_path_factory) -> list[pairs.Pair]:
  """NUM_PAIRS pairs (labels i mod 3) read back from a manifest CSV, plus one unpaired WLI image."""
  root = tmp_path_factory.mktemp("marked")
  rows = [("path", "modality", "label", "lesion_id", "pair_id")]
  for i in range(NUM_PAIRS):
    for modality in ("wli", "nbi"):
      (root / modality).mkdir(exist_ok=True)
      Image.fromarray(_marked_image(i % 3, i)).save(root / modality / f"{i:02d}.png")
      rows.append((f"{modality}/{i:02d}.png", modality, CLASSES[i % 3], f"L{i:02d}", f"L{i:02d}__0"))
  Image.fromarray(_marked_image(0, 20)).save(root / "wli" / "alone.png")
  rows.append(("wli/alone.png", "wli", CLASSES[0], "L99", ""))
  with open(root / "manifest.csv", "w", newline="") as f:
    csv.writer(f).writerows(rows)
  records = manifest.read_manifest(root / "manifest.csv", CLASSES)
  found = pairs.training_pairs(records, ["train"] * len(records), CLASSES)
  assert len(found) == NUM_PAIRS
  return found


def _iterator(found, **overrides):
  kwargs = dict(classes=CLASSES, batch_size=B, image_size=SIZE, aug_config=AUG, seed=0)
  kwargs.update(overrides)
  return pair_batches.make_paired_iterator(found, **kwargs)


def _pair_numbers(batch) -> np.ndarray:
  """(B,) pair number of each row, from the centre colour, after checking that the row is one pair."""
  centre = batch["wli"][:, SIZE // 2 - 1:SIZE // 2 + 1, SIZE // 2 - 1:SIZE // 2 + 1]
  assert np.all(centre == centre[:, :1, :1])
  colour = centre[:, 0, 0].astype(int)
  numbers = (colour[:, 1] - 5) // 10
  np.testing.assert_array_equal(colour[:, 0], 60 * (numbers % 3) + 10)
  np.testing.assert_array_equal(batch["label"], numbers % 3)
  return numbers


def _assert_batches_equal(first, second):
  assert first.keys() == second.keys()
  for key in first:
    assert first[key].dtype == second[key].dtype
    np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def test_batches_have_fixed_shapes_and_the_two_images_of_a_pair_one_draw(marked_pairs):
  it = _iterator(marked_pairs)
  for _ in range(6):
    batch = next(it)
    assert set(batch) == {"wli", "nbi", "label"}
    assert batch["wli"].shape == batch["nbi"].shape == (B, SIZE, SIZE, 3)
    assert batch["wli"].dtype == batch["nbi"].dtype == np.uint8
    assert batch["label"].shape == (B,) and batch["label"].dtype == np.int32
    _pair_numbers(batch)
    # Same file content, same rotation and flips: the two images of every pair are equal, bit for bit.
    np.testing.assert_array_equal(batch["wli"], batch["nbi"])
    # Different pairs, different draws: the bar lies elsewhere in every row.
    bars = batch["wli"].astype(int).sum(-1) > 600
    assert bars.any(axis=(1, 2)).all()
    assert len({b.tobytes() for b in bars}) == B


def test_without_augmentation_the_rows_are_the_pairs_files(marked_pairs):
  loader = pair_batches.PairBatchLoader(marked_pairs, classes=CLASSES, batch_size=B, image_size=SIZE,
                                        aug_config=NO_AUG, seed=0)
  batch = loader[0]
  for row, number in enumerate(_pair_numbers(batch)):
    np.testing.assert_array_equal(batch["wli"][row], _marked_image(number % 3, number))
    np.testing.assert_array_equal(batch["nbi"][row], _marked_image(number % 3, number))


def test_each_epoch_is_a_fresh_permutation_and_the_remainder_is_dropped(marked_pairs):
  """10 pairs in batches of 4: 2 steps an epoch show 8 distinct pairs; the 2 left out change with the epoch."""
  assert pair_batches.steps_per_epoch(marked_pairs, B) == NUM_PAIRS // B == 2
  it = _iterator(marked_pairs, seed=3)
  epochs = []
  for _ in range(12):
    epochs.append(np.concatenate([_pair_numbers(next(it)) for _ in range(2)]).tolist())
  left_out = set()
  for shown in epochs:
    assert len(set(shown)) == len(shown) == 8, "a pair twice in one epoch"
    left_out.add(frozenset(range(NUM_PAIRS)) - frozenset(shown))
  assert len({tuple(e) for e in epochs}) == len(epochs), "the pairs are not reshuffled every epoch"
  assert len(left_out) > 1 and set().union(*left_out) != set()
  counts = collections.Counter(n for shown in epochs for n in shown)
  assert set(counts) == set(range(NUM_PAIRS)), "some pair is never shown"


def test_seed_decides_the_batches(marked_pairs):
  first = [next(it) for it in [_iterator(marked_pairs, seed=1)] for _ in range(3)]
  again, other = _iterator(marked_pairs, seed=1), _iterator(marked_pairs, seed=2)
  differs = False
  for batch in first:
    _assert_batches_equal(batch, next(again))
    differs |= not np.array_equal(batch["wli"], next(other)["wli"])
  assert differs


def test_resumed_mid_epoch_the_iterator_gives_the_uninterrupted_batches(marked_pairs):
  """State taken after 3 steps (mid-epoch 1); the next 5 steps cross two epoch boundaries."""
  it = _iterator(marked_pairs, seed=4)
  for _ in range(3):
    next(it)
  state = it.get_state()
  assert state == {"step": 3}
  expected = [next(it) for _ in range(5)]
  restored = _iterator(marked_pairs, seed=4)
  restored.set_state(state)
  for batch in expected:
    _assert_batches_equal(batch, next(restored))
  assert restored.get_state() == {"step": 8}


def test_both_streams_resume_from_one_orbax_checkpoint(marked_pairs, tmp_path):
  """How the trainer keeps both positions: two items of one checkpoint, each stream restoring exactly."""
  group_records = [p.wli for p in marked_pairs] + [p.nbi for p in marked_pairs]

  def streams():
    groups = class_groups.make_train_iterator(group_records, classes=CLASSES, modalities=("wli", "nbi"),
                                              group_size=2, image_size=SIZE, aug_config=AUG, seed=5)
    return groups, _iterator(marked_pairs, seed=5)

  groups, paired = streams()
  for _ in range(3):
    next(paired)
  next(groups)  # The streams stand at different steps (e.g. one ran out first in an epoch).
  with ocp.CheckpointManager(tmp_path / "ckpt") as checkpoints:
    checkpoints.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(groups),
                                                paired_data_iter=grain.checkpoint.CheckpointSave(paired)))
    checkpoints.wait_until_finished()
    expected = [(next(groups), next(paired)) for _ in range(3)]
    groups2, paired2 = streams()
    checkpoints.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(groups2),
                                                   paired_data_iter=grain.checkpoint.CheckpointRestore(paired2)))
  assert (groups2.get_state(), paired2.get_state()) == ({"step": 1}, {"step": 3})
  for group_batch, pair_batch in expected:
    _assert_batches_equal(group_batch, next(groups2))
    _assert_batches_equal(pair_batch, next(paired2))


def test_two_processes_together_give_the_single_process_batch(marked_pairs):
  single = _iterator(marked_pairs, seed=6)
  parts = [_iterator(marked_pairs, seed=6, process_index=p, process_count=2) for p in range(2)]
  for _ in range(3):
    batch = next(single)
    halves = [next(part) for part in parts]
    for key in ("wli", "nbi", "label"):
      assert halves[0][key].shape[0] == B // 2
      np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), batch[key])


def test_the_loader_pickles_for_worker_processes(marked_pairs):
  loader = pair_batches.PairBatchLoader(marked_pairs, classes=CLASSES, batch_size=B, image_size=SIZE,
                                        aug_config=AUG, seed=7)
  _assert_batches_equal(pickle.loads(pickle.dumps(loader))[5], loader[5])


def test_invalid_arguments_are_rejected(marked_pairs):
  with pytest.raises(ValueError, match=r"at least data.paired_batch_size=24 pairs in the training split, found 10"):
    _iterator(marked_pairs, batch_size=24)
  with pytest.raises(ValueError, match=r"found 10"):
    pair_batches.steps_per_epoch(marked_pairs, 11)
  with pytest.raises(ValueError, match="paired batch size 4 is not divisible by process_count 3"):
    _iterator(marked_pairs, process_count=3)
  with pytest.raises(ValueError, match="process_index 2"):
    _iterator(marked_pairs, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="pair_id 'L00__0' is given twice"):
    _iterator(marked_pairs + marked_pairs[:1])
  with pytest.raises(ValueError, match=r"pair_id 'L01__0' \(.*01.png \(manifest row 3\)\): label 1 out of range"):
    _iterator(marked_pairs, classes=CLASSES[:1])


def test_synthetic_pairs_stay_together_in_every_row(tmp_path):
  """Real renderings (WLI and NBI differ): without augmentation each row is the resized files of one training
  pair, the label that pair's; with it, shapes and dtypes stay fixed."""
  path = synthetic.generate(tmp_path, image_size=24, lesions_per_class=4, images_per_lesion=2,
                            paired_fraction=0.5, seed=1)
  records = manifest.read_manifest(path, CLASSES)
  split_of = splits.assign_splits(records, num_folds=3, fold=0, val_fraction=0.0, seed=0)
  found = pairs.training_pairs(records, split_of, CLASSES)
  views = {p.pair_id: (augment.resize(image_io.read_image(p.wli), SIZE),
                       augment.resize(image_io.read_image(p.nbi), SIZE), p.label) for p in found}
  by_wli = {v[0].tobytes(): pair_id for pair_id, v in views.items()}
  assert len(by_wli) == len(found) >= 2 * B
  it = _iterator(found, aug_config=NO_AUG, seed=8)
  seen = []
  for _ in range(pair_batches.steps_per_epoch(found, B)):
    batch = next(it)
    for row in range(B):
      pair_id = by_wli[batch["wli"][row].tobytes()]
      np.testing.assert_array_equal(batch["nbi"][row], views[pair_id][1])
      assert batch["label"][row] == views[pair_id][2]
      seen.append(pair_id)
  assert len(seen) == len(set(seen)) == (len(found) // B) * B
  batch = next(_iterator(found, seed=8))
  assert batch["wli"].shape == batch["nbi"].shape == (B, SIZE, SIZE, 3) and batch["wli"].dtype == np.uint8
