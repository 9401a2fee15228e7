"""Tests for fixed-size, padded evaluation batches (every record exactly once, in order)."""

import math

import numpy as np
import pytest
from PIL import Image

from pagkd_jax.data import augment, eval_batches, image_io
from pagkd_jax.data.records import ImageRecord

SIZE = 8


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[ImageRecord]:
  """Seven 12 x 10 images with random pixels; labels cycle through 3 classes."""
  root = tmp_path_factory.mktemp("eval")
  rng = np.random.default_rng(0)
  out = []
  for i in range(7):
    path = root / f"{i}.png"
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)
    out.append(ImageRecord(path=str(path), modality="wli", label=i % 3, lesion_id=f"l{i}"))
  return out


def _reference_batches(records, batch_size):
  """Slow reference: global batch b holds records b*B .. b*B+B-1, padded at the end."""
  batches = []
  for start in range(0, len(records), batch_size):
    image = np.zeros((batch_size, SIZE, SIZE, 3), np.uint8)
    label = np.zeros(batch_size, np.int32)
    mask = np.zeros(batch_size, bool)
    index = np.full(batch_size, -1, np.int32)
    for row in range(batch_size):
      if start + row < len(records):
        record = records[start + row]
        image[row] = augment.preprocess_eval(image_io.read_image(record), SIZE)
        label[row], mask[row], index[row] = record.label, True, start + row
    batches.append(dict(image=image, label=label, mask=mask, index=index))
  return batches


@pytest.mark.parametrize("batch_size", [1, 3, 4, 7, 10])
def test_single_process_matches_reference(records, batch_size):
  batches = list(eval_batches.make_eval_iterator(records, image_size=SIZE,
                                                 batch_size=batch_size))
  reference = _reference_batches(records, batch_size)
  assert len(batches) == len(reference) == eval_batches.num_eval_batches(len(records),
                                                                          batch_size)
  for batch, expected in zip(batches, reference):
    assert batch.keys() == expected.keys()
    for key in expected:
      assert batch[key].dtype == expected[key].dtype, key
      np.testing.assert_array_equal(batch[key], expected[key], err_msg=key)
  indices = np.concatenate([b["index"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(indices, np.arange(len(records)))  # Each once, in order.


def test_two_processes_split_every_global_batch(records):
  batch_size = 4
  reference = _reference_batches(records, batch_size)
  parts = [list(eval_batches.make_eval_iterator(records, image_size=SIZE, batch_size=batch_size,
                                                process_index=p, process_count=2))
           for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(reference)
  for b, expected in enumerate(reference):
    for key in expected:
      assert parts[0][b][key].shape[0] == batch_size // 2
      np.testing.assert_array_equal(
          np.concatenate([parts[0][b][key], parts[1][b][key]]), expected[key], err_msg=key)
  seen = np.concatenate([part[b]["index"][part[b]["mask"]] for part in parts
                         for b in range(len(reference))])
  assert sorted(seen.tolist()) == list(range(len(records)))


def test_a_fresh_iterator_starts_over(records):
  first = [b["index"] for b in eval_batches.make_eval_iterator(records, image_size=SIZE,
                                                               batch_size=3)]
  second = [b["index"] for b in eval_batches.make_eval_iterator(records, image_size=SIZE,
                                                                batch_size=3)]
  np.testing.assert_array_equal(np.stack(first), np.stack(second))


def test_num_eval_batches_and_empty_input():
  for n in range(0, 12):
    for batch_size in (1, 4, 5):
      assert eval_batches.num_eval_batches(n, batch_size) == math.ceil(n / batch_size)
  assert not list(eval_batches.make_eval_iterator([], image_size=SIZE, batch_size=4))


def test_invalid_arguments_are_rejected(records):
  with pytest.raises(ValueError, match="batch_size 5 must be >= 1 and divisible"):
    eval_batches.make_eval_iterator(records, image_size=SIZE, batch_size=5, process_count=2)
  with pytest.raises(ValueError, match="process_index 2"):
    eval_batches.make_eval_iterator(records, image_size=SIZE, batch_size=4, process_index=2,
                                    process_count=2)


def test_a_bad_image_is_reported_with_its_path(tmp_path):
  path = tmp_path / "broken.jpg"
  path.write_bytes(b"\xff\xd8\xff not really")
  bad = [ImageRecord(path=str(path), modality="wli", label=0, lesion_id="l", row=4)]
  with pytest.raises(image_io.ImageDecodeError, match=r"broken\.jpg \(manifest row 4\)"):
    list(eval_batches.make_eval_iterator(bad, image_size=SIZE, batch_size=2))
