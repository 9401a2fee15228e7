"""Tests for the class-group training pipeline (spec section 2).

The test images are constant 16 x 16 colours that encode where they come from: red = class,
green = image number within its (modality, class), blue = modality. Rotation (about the centre,
bilinear) and flips keep the centre pixels of a constant image, so the pixels of every batch say
which image was drawn, even with augmentation on.
"""

import collections
import logging
import math

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from pagkd_jax.data import class_groups, manifest
from pagkd_jax.data.records import ImageRecord

CLASSES = ("hyperplasia", "adenoma", "adenocarcinoma")
COUNTS = {"wli": (5, 6, 7), "nbi": (5, 6, 8)}  # Images per class.
BLUE = {"wli": 40, "nbi": 160}
SIZE = 16
K = 4
AUG = dict(rotate=True, hflip=True, vflip=True, random_resized_crop=False, color_jitter=0.0)
NO_AUG = dict(rotate=False, hflip=False, vflip=False, random_resized_crop=False,
              color_jitter=0.0)


def _write_folder(root, counts) -> list[ImageRecord]:
  for modality, per_class in counts.items():
    for label, n in enumerate(per_class):
      folder = root / modality / CLASSES[label]
      folder.mkdir(parents=True)
      for i in range(n):
        colour = (60 * label + 10, 10 * i + 5, BLUE[modality])
        Image.fromarray(np.full((SIZE, SIZE, 3), colour, np.uint8)).save(folder / f"{i:02d}.png")
  return manifest.records_from_folder(root, CLASSES)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[ImageRecord]:
  return _write_folder(tmp_path_factory.mktemp("images"), COUNTS)


def _iterator(records, **overrides):
  kwargs = dict(classes=CLASSES, modalities=("wli", "nbi"), group_size=K, image_size=SIZE,
                aug_config=AUG, seed=0)
  kwargs.update(overrides)
  return class_groups.make_train_iterator(records, **kwargs)


def _identities(images: np.ndarray) -> np.ndarray:
  """(C, K, H, W, 3) batch -> (C, K, 3) centre colours, checking the centre 2x2 is constant."""
  centre = images[:, :, SIZE // 2 - 1:SIZE // 2 + 1, SIZE // 2 - 1:SIZE // 2 + 1]
  assert np.all(centre == centre[:, :, :1, :1])
  return centre[:, :, 0, 0].astype(int)


def _assert_batches_equal(first, second):
  assert first.keys() == second.keys()
  for key in first:
    np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def test_every_batch_holds_k_images_of_every_class(records):
  it = _iterator(records)
  seen = {m: [collections.Counter() for _ in CLASSES] for m in COUNTS}
  steps = 50
  for _ in range(steps):
    batch = next(it)
    assert set(batch) == {"wli", "nbi", "label"}
    np.testing.assert_array_equal(batch["label"], np.arange(len(CLASSES)))
    assert batch["label"].dtype == np.int32
    for modality in COUNTS:
      assert batch[modality].shape == (len(CLASSES), K, SIZE, SIZE, 3)
      assert batch[modality].dtype == np.uint8
      ids = _identities(batch[modality])
      for c in range(len(CLASSES)):
        assert np.all(ids[c, :, 0] == 60 * c + 10), "an image of another class in group c"
        assert np.all(ids[c, :, 2] == BLUE[modality]), "an image of the other modality"
        seen[modality][c].update(((ids[c, :, 1] - 5) // 10).tolist())
  # Over the 50 steps each class stream advanced 200 images: whole epochs see every image
  # equally often, and a partial epoch adds at most one more view.
  for modality, per_class in COUNTS.items():
    for c, n in enumerate(per_class):
      counts = [seen[modality][c][i] for i in range(n)]
      assert sum(counts) == steps * K
      assert max(counts) - min(counts) <= (0 if (steps * K) % n == 0 else 1), counts


def test_index_stream_is_a_fresh_permutation_every_epoch(records):
  loader = class_groups.ClassGroupLoader(
      records, classes=CLASSES, modalities=("wli", "nbi"), group_size=K, image_size=SIZE,
      aug_config=AUG, seed=4)
  for modality, per_class in COUNTS.items():
    stream = np.concatenate([loader.group_indices(s, modality) for s in range(30)], axis=1)
    for c, n in enumerate(per_class):
      epochs = [stream[c, e * n:(e + 1) * n].tolist() for e in range(stream.shape[1] // n)]
      for order in epochs:
        assert sorted(order) == list(range(n))
      assert len({tuple(order) for order in epochs}) > 1, "the stream is not reshuffled"


def test_seeds_decide_the_batches_and_modalities_are_not_lock_step(records):
  first = [next(it) for it in [_iterator(records, seed=1)] for _ in range(4)]
  again = _iterator(records, seed=1)
  other = _iterator(records, seed=2)
  differs = False
  for batch in first:
    _assert_batches_equal(batch, next(again))
    differs |= not np.array_equal(batch["wli"], next(other)["wli"])
  assert differs
  loader = class_groups.ClassGroupLoader(
      records, classes=CLASSES, modalities=("wli", "nbi"), group_size=K, image_size=SIZE,
      aug_config=AUG, seed=1)
  # Class 0 has 5 images in both modalities; independent streams draw them in other orders.
  wli = np.stack([loader.group_indices(s, "wli")[0] for s in range(10)])
  nbi = np.stack([loader.group_indices(s, "nbi")[0] for s in range(10)])
  assert not np.array_equal(wli, nbi)


def test_restored_iterator_continues_exactly(records):
  it = _iterator(records, seed=3)
  for _ in range(3):
    next(it)
  state = it.get_state()
  assert state == {"step": 3}
  expected = [next(it) for _ in range(3)]
  restored = _iterator(records, seed=3)
  restored.set_state(state)
  for batch in expected:
    _assert_batches_equal(batch, next(restored))
  loader = class_groups.ClassGroupLoader(
      records, classes=CLASSES, modalities=("wli", "nbi"), group_size=K, image_size=SIZE,
      aug_config=AUG, seed=3)
  _assert_batches_equal(expected[0], loader[3])


def test_restore_through_orbax_checkpoint(records, tmp_path):
  it = _iterator(records, seed=5)
  for _ in range(2):
    next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = [next(it) for _ in range(2)]
    restored = _iterator(records, seed=5)
    manager.restore(2, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(restored)))
  for batch in expected:
    _assert_batches_equal(batch, next(restored))


def test_two_processes_together_give_the_single_process_batch(records):
  single = _iterator(records, seed=6)
  parts = [_iterator(records, seed=6, process_index=p, process_count=2) for p in range(2)]
  for _ in range(3):
    batch = next(single)
    halves = [next(part) for part in parts]
    for modality in COUNTS:
      assert halves[0][modality].shape == (len(CLASSES), K // 2, SIZE, SIZE, 3)
      np.testing.assert_array_equal(
          np.concatenate([h[modality] for h in halves], axis=1), batch[modality])
    for half in halves:
      np.testing.assert_array_equal(half["label"], batch["label"])


def test_class_with_fewer_than_k_images_repeats_them_and_warns(tmp_path, caplog):
  small = _write_folder(tmp_path, {"wli": (2, 5, 4)})
  with caplog.at_level(logging.WARNING):
    it = _iterator(small, modalities=("wli",), aug_config=NO_AUG, group_size=K)
  assert any("'hyperplasia'" in r.getMessage() and "only 2 wli" in r.getMessage()
             for r in caplog.records)
  assert not any("'adenocarcinoma'" in r.getMessage() for r in caplog.records)  # 4 == K.
  for _ in range(5):
    batch = next(it)
    assert set(batch) == {"wli", "label"}
    ids = (_identities(batch["wli"])[0, :, 1] - 5) // 10
    assert sorted(ids.tolist()) == [0, 0, 1, 1]  # Each group spans two whole epochs.


def test_missing_class_in_a_requested_modality_is_an_error(tmp_path):
  partial = _write_folder(tmp_path, {"wli": (2, 2, 2), "nbi": (2, 0, 2)})
  with pytest.raises(ValueError, match=r"class 'adenoma' has no nbi images"):
    _iterator(partial, aug_config=NO_AUG)
  batch = next(_iterator(partial, modalities=("wli",), aug_config=NO_AUG, group_size=2))
  assert set(batch) == {"wli", "label"}


def test_invalid_arguments_are_rejected(records):
  with pytest.raises(ValueError, match="not divisible by process_count 3"):
    _iterator(records, process_count=3)
  with pytest.raises(ValueError, match="process_index 2"):
    _iterator(records, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="modalities"):
    _iterator(records, modalities=("wli", "ct"))
  bad = [ImageRecord(path="/x.png", modality="wli", label=3, lesion_id="l", row=9)]
  with pytest.raises(ValueError, match=r"/x.png \(manifest row 9\): label 3 out of range"):
    _iterator(bad)


def test_steps_per_epoch(records):
  for modality, per_class in COUNTS.items():
    for group_size in (1, 4, 5):
      expected = math.ceil(sum(per_class) / (len(CLASSES) * group_size))
      assert class_groups.steps_per_epoch(records, CLASSES, modality, group_size) == expected
  with pytest.raises(ValueError, match="no nbi images"):
    class_groups.steps_per_epoch([r for r in records if r.modality == "wli"], CLASSES, "nbi", 4)


def test_worker_processes_give_the_same_batches_and_share_the_state_format(records):
  it = _iterator(records, seed=7)
  next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  # A state saved without workers restores into an iterator with one worker process.
  with_worker = _iterator(records, seed=7, num_workers=1)
  try:
    with_worker.set_state(state)
    for batch in expected:
      _assert_batches_equal(batch, next(with_worker))
    assert with_worker.get_state() == {"step": 3}
  finally:
    with_worker.close()


# sha256 of the first three batches of `_iterator(records, seed=3)` (keys sorted, then the bytes of each array),
# written by the loader before it had the `views` and `row_indices` options: without them a batch is unchanged.
BATCHES_BEFORE_THE_OPTIONS = "a32f0f2775eaac7175a386e1611ffc309bf92385efb6e5d436fd02b24683427c"


def _digest(it, steps=3) -> str:
  import hashlib
  h = hashlib.sha256()
  for _ in range(steps):
    batch = next(it)
    for key in sorted(batch):
      h.update(key.encode())
      h.update(np.ascontiguousarray(batch[key]).tobytes())
  return h.hexdigest()


def test_without_the_options_the_batches_are_bitwise_those_of_before(records):
  assert _digest(_iterator(records, seed=3)) == BATCHES_BEFORE_THE_OPTIONS
  assert _digest(_iterator(records, seed=3, views=1, row_indices=False)) == BATCHES_BEFORE_THE_OPTIONS


def test_second_view_and_rows(records):
  """views=2: the same images as the first view (centre colour) under another augmentation draw, and the first view
  exactly as without the option; row_indices: each image's position among the training records of its modality."""
  plain = _iterator(records, seed=3)
  it = _iterator(records, seed=3, views=2, row_indices=True)
  rows_of = {m: class_groups.row_records(records, m) for m in ("wli", "nbi")}
  differs = 0
  for _ in range(4):
    batch, reference = next(it), next(plain)
    assert set(batch) == {"wli", "nbi", "label", "wli_view2", "nbi_view2", "wli_row", "nbi_row"}
    assert set(batch) - {"label"} == set(class_groups.group_keys(("wli", "nbi"), views=2, row_indices=True))
    for m in ("wli", "nbi"):
      np.testing.assert_array_equal(batch[m], reference[m])
      np.testing.assert_array_equal(_identities(batch[f"{m}_view2"]), _identities(batch[m]))
      differs += not np.array_equal(batch[f"{m}_view2"], batch[m])
      rows = batch[f"{m}_row"]
      assert rows.shape == (len(CLASSES), K) and rows.dtype == np.int32
      # The row's record has the image's colour: its class (red) and number (green).
      ids = _identities(batch[m])
      for c in range(len(CLASSES)):
        for k in range(K):
          record = rows_of[m][rows[c, k]]
          assert record.label == c and record.modality == m
          assert ids[c, k, 1] == 10 * int(record.path.split("/")[-1][:2]) + 5
  assert differs == 8  # Rotation and flips: the second view is another draw.


def test_rows_are_the_same_in_every_process(records):
  whole = _iterator(records, seed=5, views=2, row_indices=True, modalities=("wli",))
  halves = [_iterator(records, seed=5, views=2, row_indices=True, modalities=("wli",), process_index=p,
                      process_count=2) for p in range(2)]
  for _ in range(3):
    batch, parts = next(whole), [next(h) for h in halves]
    for key in ("wli", "wli_view2", "wli_row"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts], axis=1), batch[key])
  with pytest.raises(ValueError, match="views must be 1 or 2"):
    _iterator(records, views=3)
