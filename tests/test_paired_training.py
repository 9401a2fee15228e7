"""Training on two streams (the trainer's `program.extra_streams`): the schedule of one epoch, and a run
interrupted mid-iteration that resumes both iterators exactly. Real synthetic data with pairs, real checkpoints."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pagkd_jax import checkpointing
from pagkd_jax.data.normalization import normalize_images
from pagkd_jax.methods import classifier
from pagkd_jax.methods import streams
from pagkd_jax.training import trainer
from training_configs import tiny_synthetic_config


def test_epoch_schedule_alternates_then_lets_the_longer_stream_finish_alone():
  assert trainer.epoch_schedule({"paired": 2, "groups": 3}) == ["paired", "groups", "paired", "groups", "groups"]
  assert trainer.epoch_schedule({"paired": 3, "groups": 1}) == ["paired", "groups", "paired", "paired"]
  assert trainer.epoch_schedule({"groups": 2}) == ["groups", "groups"]
  schedule = trainer.epoch_schedule({"paired": 3, "groups": 1})
  assert [trainer.stream_of_step(schedule, s) for s in range(1, 7)] == ["paired", "groups", "paired", "paired",
                                                                        "paired", "groups"]
  assert trainer.steps_taken(schedule, "paired", 6) == 4 and trainer.steps_taken(schedule, "groups", 6) == 2
  assert trainer.steps_taken(schedule, "groups", 0) == 0


def paired_wli_ce_update(model, tx, config, steps_per_epoch):
  """Cross-entropy on the WLI images of a paired batch (the test's paired stream)."""
  del steps_per_epoch

  def update(state, batch):
    x = normalize_images(batch["wli"], config.data.normalization)

    def loss_fn(params):
      (logits, _), new_vars = model.apply({"params": params, "batch_stats": state.batch_stats}, x, train=True,
                                          mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), new_vars["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return (state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          batch_stats=batch_stats, opt_state=opt_state),
            {"loss": loss, "paired_images": jnp.float32(batch["wli"].shape[0])})

  return update


@dataclasses.dataclass(frozen=True)
class WliWithPairs(classifier.ClassifierProgram):
  """The WLI baseline on the unpaired stream plus a paired stream of cross-entropy on the paired WLI images."""

  modality: str = "wli"
  extra_streams: tuple = (streams.PairedStream(paired_wli_ce_update),)

  def train_records(self, data):
    return streams.unpaired_stream_records(data)


def _config(data_dir, num_steps):
  config = tiny_synthetic_config(data_dir, stage="baseline", num_steps=num_steps)
  config.data.synthetic.paired_fraction = 0.5
  config.data.paired_batch_size = 4
  config.optim.schedule = "constant"  # The learning rate does not depend on train.num_steps: 3 + 6 = 9 steps.
  config.train.checkpoint_every_steps = 100
  config.train.eval_every_steps = 100
  config.train.log_every_steps = 1
  return config


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_a_run_stopped_between_the_paired_and_the_unpaired_step_resumes_both_streams_exactly(tmp_path):
  data_dir = tmp_path / "data"
  reference = str(tmp_path / "uninterrupted")
  trainer.run_stage(_config(data_dir, 9), reference, WliWithPairs())
  # The data hold more paired than unpaired steps an epoch: the schedule has the paired stream going on alone.
  rows = _rows(reference)
  paired_steps = [r["step"] for r in rows if "train/paired/loss" in r]
  group_steps = [r["step"] for r in rows if "train/loss" in r]
  assert sorted(paired_steps + group_steps) == list(range(1, 10))
  assert paired_steps[:2] == [1, 3] and group_steps[:2] == [2, 4]
  assert all(r["train/paired/paired_images"] == 4 for r in rows if "train/paired/loss" in r)

  workdir = str(tmp_path / "resumed")
  trainer.run_stage(_config(data_dir, 3), workdir, WliWithPairs())  # Stops after a paired step (step 3)...
  step, _ = checkpointing.read_latest_state(workdir)
  assert step == 3
  saved = os.path.join(workdir, "checkpoints", "latest", "3")
  assert os.path.isdir(os.path.join(saved, "data_iter")) and os.path.isdir(os.path.join(saved, "data_iter_paired"))
  trainer.run_stage(_config(data_dir, 9), workdir, WliWithPairs())  # ...and resumes with the unpaired one.

  (step, state), (ref_step, ref_state) = checkpointing.read_latest_state(workdir), \
      checkpointing.read_latest_state(reference)
  assert step == ref_step == 9
  for part in ("params", "batch_stats", "opt_state"):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, err_msg=part), state[part], ref_state[part])
  losses = lambda rows: {(r["step"], k): r[k] for r in rows for k in ("train/loss", "train/paired/loss") if k in r}
  assert losses(_rows(workdir)) == losses(rows)


def test_a_checkpoint_without_the_paired_stream_is_not_resumed_with_it(tmp_path):
  data_dir = tmp_path / "data"
  workdir = str(tmp_path / "run")
  trainer.run_stage(_config(data_dir, 2), workdir, classifier.ClassifierProgram("wli"))
  with pytest.raises(checkpointing.CheckpointMismatchError, match="no position of the paired stream"):
    trainer.run_stage(_config(data_dir, 4), workdir, WliWithPairs())
