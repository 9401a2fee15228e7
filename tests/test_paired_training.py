"""Training on two streams (the trainer's `program.extra_streams`): the schedule of one epoch, and a run
interrupted mid-iteration that resumes both iterators exactly. Real synthetic data with pairs, real checkpoints."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

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
from subprocess_env import env_with_xla_flags, run_on_host_devices
from test_paired_losses import np_srca_pair_loss
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


@dataclasses.dataclass(frozen=True)
class PairsOnly(WliWithPairs):
  """The paired stream alone (a method trained on pairs only): no modalities, no class-group stream."""

  @property
  def modalities(self):
    return ()


def test_a_program_without_the_class_group_stream_trains_its_paired_stream_alone_and_resumes_exactly(tmp_path):
  data_dir = tmp_path / "data"
  reference = str(tmp_path / "uninterrupted")
  trainer.run_stage(_config(data_dir, 5), reference, PairsOnly())
  rows = _rows(reference)
  assert [r["step"] for r in rows if "train/paired/loss" in r] == [1, 2, 3, 4, 5]
  assert not any("train/loss" in r for r in rows)

  workdir = str(tmp_path / "resumed")
  trainer.run_stage(_config(data_dir, 2), workdir, PairsOnly())
  saved = os.path.join(workdir, "checkpoints", "latest", "2")
  assert os.path.isdir(os.path.join(saved, "data_iter_paired"))
  assert not os.path.exists(os.path.join(saved, "data_iter"))  # No class-group position.
  trainer.run_stage(_config(data_dir, 5), workdir, PairsOnly())
  (step, state), (ref_step, ref_state) = checkpointing.read_latest_state(workdir), \
      checkpointing.read_latest_state(reference)
  assert step == ref_step == 5
  for part in ("params", "batch_stats", "opt_state"):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, err_msg=part), state[part], ref_state[part])
  losses = lambda rows: {r["step"]: r["train/paired/loss"] for r in rows if "train/paired/loss" in r}
  assert losses(_rows(workdir)) == losses(rows)


def test_a_checkpoint_without_the_paired_stream_is_not_resumed_with_it(tmp_path):
  data_dir = tmp_path / "data"
  workdir = str(tmp_path / "run")
  trainer.run_stage(_config(data_dir, 2), workdir, classifier.ClassifierProgram("wli"))
  with pytest.raises(checkpointing.CheckpointMismatchError, match="no position of the paired stream"):
    trainer.run_stage(_config(data_dir, 4), workdir, WliWithPairs())


# ---- PaGKD's paired update (config.distill.paired) -----------------------------------------------------------------
def _np_dense(q, k, lq, lk, ambiguous):
  """NumPy reference of one direction of the per-image dense loss (spec 8), float64."""
  b = q.shape[0]
  q, k = q.reshape(b, -1, q.shape[-1]).astype(np.float64), k.reshape(b, -1, k.shape[-1]).astype(np.float64)
  lq, lk = lq.reshape(b, -1, 1), lk.reshape(b, 1, -1)
  w = np.where((lq == -1) | (lk == -1), ambiguous, (lq == lk).astype(np.float64))
  logits = np.where(w == 0, -1e9, np.einsum("btd,bvd->btv", q, k) * w)
  a = np.exp(logits - logits.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  recon = np.einsum("btv,bvd->btd", a, k).reshape(b, -1)
  flat = q.reshape(b, -1)
  cos = (recon * flat).sum(-1) / np.sqrt(((recon ** 2).sum(-1) + 1e-12) * ((flat ** 2).sum(-1) + 1e-12))
  return np.mean(1 - cos)


@pytest.mark.parametrize("paired_loss", ["paper", "release"])
def test_paired_loss_is_cross_entropy_plus_lambda_times_both_directions_of_the_dense_loss(paired_loss):
  from pagkd_jax import base_config
  from pagkd_jax.distill import pagkd as pagkd_distill
  from pagkd_jax.methods import pagkd as pagkd_method
  from pagkd_jax.models import resnet
  from pagkd_jax.training import optimizer

  c, b, s = 3, 4, 32
  config = base_config.get_config()
  config.stage, config.model.name, config.data.image_size = "pagkd", "tiny", s
  config.distill.warmup_epochs, config.distill.lambda_den = 1.0, 0.7  # Warm-up: 5 steps.
  config.distill.embed_dim, config.distill.num_queries, config.distill.qformer_heads = 16, 4, 4
  if paired_loss == "release":
    config.distill.paired_loss = "release"  # The paper variant's group losses, the release's paired loss.
  model = resnet.create_resnet("tiny", c)
  tx = optimizer.make_optimizer(config.optim, total_steps=10, steps_per_epoch=5)
  state = pagkd_method.PaGKDProgram(frozen=()).init_state(model, tx, jax.random.key(0), config)
  teacher = model.init(jax.random.key(7), jnp.zeros((1, s, s, 3)))
  rng = np.random.default_rng(0)
  batch = {"wli": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
           "nbi": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8), "label": np.array([0, 2, 1, 2], np.int32)}
  loss_fn = jax.jit(pagkd_method.make_paired_loss(model, config, steps_per_epoch=5))

  # The pieces, from the model and the region labels (tested elsewhere), then the sum in NumPy.
  x_wli = normalize_images(jnp.asarray(batch["wli"]), config.data.normalization)
  x_nbi = normalize_images(jnp.asarray(batch["nbi"]), config.data.normalization)
  (logits, f_wli), _ = model.apply({"params": state.params["student"], "batch_stats": state.batch_stats["student"]},
                                   x_wli, train=True, mutable=["batch_stats"])
  _, f_nbi = model.apply(teacher, x_nbi, train=False)
  labels = jnp.asarray(batch["label"])
  r_wli = np.asarray(pagkd_distill.region_labels(x_wli, f_wli, state.params["student"]["fc"]["kernel"], labels,
                                                 config.distill))
  r_nbi = np.asarray(pagkd_distill.region_labels(x_nbi, f_nbi, teacher["params"]["fc"]["kernel"], labels,
                                                 config.distill))
  t_wli = np.asarray(f_wli, np.float64) @ np.asarray(state.params["heads"]["student_embed"]["kernel"], np.float64)
  t_nbi = np.asarray(f_nbi, np.float64) @ np.asarray(state.params["heads"]["teacher_embed"]["kernel"], np.float64)
  z = np.asarray(logits, np.float64)
  ce = np.mean(np.log(np.exp(z).sum(-1)) - z[np.arange(b), batch["label"]])
  if paired_loss == "paper":  # The group loss's SRCA projections, each pair a group of one.
    srca_params = state.params["heads"]["srca"]
    dense = np_srca_pair_loss(t_wli, t_nbi, r_wli, r_nbi, np.asarray(srca_params["query"]["kernel"], np.float64),
                              np.asarray(srca_params["key"]["kernel"], np.float64))
  else:
    dense = _np_dense(t_nbi, t_wli, r_nbi, r_wli, 0.5) + _np_dense(t_wli, t_nbi, r_wli, r_nbi, 0.5)
  assert dense > 0

  loss, (terms, _) = loss_fn(state.params, state.batch_stats, jnp.int32(4), batch, teacher)  # Warm-up: CE only.
  np.testing.assert_allclose(float(loss), ce, rtol=1e-5)
  assert float(terms["loss_dense"]) == 0 and float(terms["distill_on"]) == 0
  loss, (terms, _) = loss_fn(state.params, state.batch_stats, jnp.int32(5), batch, teacher)
  np.testing.assert_allclose(float(terms["loss_dense"]), dense, rtol=1e-4)
  np.testing.assert_allclose(float(loss), ce + 0.7 * dense, rtol=1e-4)


def test_paired_true_without_pairs_fails_before_the_teacher_naming_the_count(tmp_path):
  config = tiny_synthetic_config(tmp_path / "data", stage="pagkd")
  config.distill.paired = True  # paired_fraction stays 0: no pairs.
  with pytest.raises(ValueError, match=r"data.paired_batch_size=24 pairs in the training split, found 0"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "teacher")


def _pagkd_all_config(data_dir, teacher_dir, num_steps):
  """Stage pagkd with the paired stream on the test's data, the teacher of `teacher_dir`, a constant learning rate
  (the same updates whatever train.num_steps) and a warm-up that ends during the first nine steps."""
  config = _config(data_dir, num_steps)
  config.stage = "pagkd"
  config.teacher.workdir = str(teacher_dir)
  config.distill.paired = True
  config.distill.warmup_epochs = 0.5
  return config


@pytest.mark.slow
def test_pagkd_all_stopped_after_a_paired_step_resumes_equal_to_an_uninterrupted_run(tmp_path):
  data_dir = tmp_path / "data"
  teacher_dir = tmp_path / "teacher"
  teacher = _config(data_dir, 2)
  teacher.stage = "teacher"
  trainer.run_stage(teacher, str(teacher_dir), classifier.ClassifierProgram("nbi"))

  reference = str(tmp_path / "uninterrupted")
  trainer.train_and_evaluate(_pagkd_all_config(data_dir, teacher_dir, 9), reference)
  rows = _rows(reference)
  paired = {r["step"]: r for r in rows if "train/paired/loss" in r}
  groups = {r["step"]: r for r in rows if "train/loss" in r}
  assert sorted([*paired, *groups]) == list(range(1, 10)) and 3 in paired
  # The warm-up ends within the run, on both streams: CE alone, then the distillation losses too.
  assert {r["train/paired/distill_on"] for r in paired.values()} == {0.0, 1.0}
  assert all((r["train/paired/loss_dense"] > 0) == (r["train/paired/distill_on"] == 1) for r in paired.values())
  assert {r["train/distill_on"] for r in groups.values()} == {0.0, 1.0}

  workdir = str(tmp_path / "resumed")
  trainer.train_and_evaluate(_pagkd_all_config(data_dir, teacher_dir, 3), workdir)  # Stops after a paired step...
  assert checkpointing.read_latest_state(workdir)[0] == 3
  trainer.train_and_evaluate(_pagkd_all_config(data_dir, teacher_dir, 9), workdir)  # ...and resumes after it.

  (step, state), (ref_step, ref_state) = checkpointing.read_latest_state(workdir), \
      checkpointing.read_latest_state(reference)
  assert step == ref_step == 9
  for part in ("params", "batch_stats", "opt_state"):  # The distillation heads and their Adam state included.
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, err_msg=part), state[part], ref_state[part])
  keys = ("train/loss", "train/loss_pro", "train/loss_den", "train/paired/loss", "train/paired/loss_dense")
  losses = lambda rows: {(r["step"], k): r[k] for r in rows for k in keys if k in r}
  assert losses(_rows(workdir)) == losses(rows)


@pytest.mark.slow
def test_pagkd_all_from_the_command_line_then_evaluation(tmp_path, repo_root):
  # 10 lesions a class: with 5 folds, each of the three strata (WLI only, NBI only, paired) has 5 lesions.
  def run(args):
    done = subprocess.run([sys.executable, *args], cwd=repo_root, capture_output=True, text=True, timeout=1800,
                          env=env_with_xla_flags())
    assert done.returncode == 0, done.stderr[-5000:]
    return done

  workdir = tmp_path / "run"
  run(["train.py", "--config=configs/synthetic.py:smoke", f"--workdir={workdir}",
       f"--config.data.synthetic.out={tmp_path / 'data'}", "--config.data.synthetic.paired_fraction=0.5",
       "--config.distill.paired=True", "--config.data.paired_batch_size=4",
       "--config.data.synthetic.lesions_per_class=10", "--config.data.synthetic.image_size=32",
       "--config.data.synthetic.images_per_lesion=2", "--config.data.image_size=32", "--config.data.group_size=4",
       "--config.data.eval_batch_size=16", "--config.train.num_steps=6", "--config.train.log_every_steps=1",
       "--config.train.eval_every_steps=6", "--config.train.checkpoint_every_steps=6",
       "--config.distill.warmup_epochs=0", "--config.eval.bootstrap_samples=20", "--config.eval.num_cam_images=1"])
  rows = _rows(workdir)
  paired = [r for r in rows if "train/paired/loss" in r]
  groups = [r for r in rows if "train/loss" in r]
  assert paired and groups and len(paired) + len(groups) == 6
  assert all(r["train/paired/loss_dense"] > 0 and r["train/paired/distill_on"] == 1 for r in paired)
  assert all(r["train/loss_pro"] > 0 for r in groups)  # GKD-Pro on the class-group batches only.
  assert os.path.isdir(workdir / "checkpoints" / "latest" / "6" / "data_iter_paired")

  run(["eval.py", f"--workdir={workdir}"])
  report = json.load(open(workdir / "eval" / "metrics.json"))
  assert report["stage"] == "pagkd" and 0.0 <= report["auc"] <= 1.0


PAIRED_ON_EIGHT_DEVICES = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    assert jax.device_count() == 8, jax.devices()
    from pagkd_jax import base_config, mesh as mesh_lib
    from pagkd_jax.methods import pagkd as pagkd_method
    from pagkd_jax.models import resnet
    from pagkd_jax.training import optimizer

    C, B, S = 3, 8, 32
    config = base_config.get_config()
    config.stage, config.model.name, config.data.image_size = "pagkd", "tiny", S
    config.distill.warmup_epochs = 0.0  # The dense loss from the first step.
    config.distill.embed_dim, config.distill.num_queries, config.distill.qformer_heads = 16, 4, 4
    model = resnet.create_resnet("tiny", C)
    tx = optimizer.make_optimizer(config.optim, total_steps=10, steps_per_epoch=5, gated_params=("heads",))
    teacher = model.init(jax.random.key(7), jnp.zeros((1, S, S, 3)))
    rng = np.random.default_rng(0)
    batch = {"wli": rng.integers(0, 256, (B, S, S, 3), dtype=np.uint8),
             "nbi": rng.integers(0, 256, (B, S, S, 3), dtype=np.uint8),
             "label": rng.integers(0, C, (B,)).astype(np.int32)}

    def run(devices):
      mesh = mesh_lib.make_mesh(devices)
      rep, split = mesh_lib.replicated(mesh), mesh_lib.eval_batch_sharding(mesh)
      state = jax.jit(lambda r: pagkd_method.PaGKDProgram(frozen=()).init_state(model, tx, r, config),
                      out_shardings=rep)(jax.random.key(0))
      update = jax.jit(pagkd_method.make_paired_update_factory(model, tx, config, steps_per_epoch=5),
                       in_shardings=(rep, {k: split for k in batch}, rep), out_shardings=(rep, rep),
                       donate_argnums=0)
      global_batch = {k: mesh_lib.global_array(v, split, v.shape) for k, v in batch.items()}
      state, metrics = update(state, global_batch, jax.device_put(teacher, rep))
      shards = {s.data.shape for s in global_batch["wli"].addressable_shards}
      return jax.device_get(state), jax.device_get(metrics), shards

    s1, m1, shards1 = run(jax.devices()[:1])
    s8, m8, shards8 = run(jax.devices())
    assert shards1 == {(B, S, S, 3)} and shards8 == {(1, S, S, 3)}, (shards1, shards8)
    assert m1["loss_dense"] > 0 and m1["distill_on"] == 1
    # Sums in other orders: a few float32 eps of each term's scale (the region labels' thresholds could flip a
    # position only for values within that of a threshold).
    for k in ("loss", "loss_cls", "loss_dense", "grad_norm"):
      np.testing.assert_allclose(m8[k], m1[k], rtol=1e-4, err_msg=k)
    for a, b in zip(jax.tree.leaves(s1.batch_stats), jax.tree.leaves(s8.batch_stats)):
      np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * np.max(np.abs(a)))  # Global BatchNorm statistics.
    # After one Adam step an element moves by about the learning rate whatever its gradient, so the two runs' steps
    # agree to a small fraction of it (elements with gradients near zero may differ by up to a step).
    lr = config.optim.learning_rate
    diffs = [np.abs(np.asarray(a) - np.asarray(b)) for a, b in zip(jax.tree.leaves(s1.params),
                                                                    jax.tree.leaves(s8.params))]
    assert max(float(d.max()) for d in diffs) <= 2.01 * lr
    assert sum(int((d > 0.1 * lr).sum()) for d in diffs) < 0.1 * sum(d.size for d in diffs)
    print("OK")
""")


@pytest.mark.numerics
def test_pagkd_paired_update_on_one_and_eight_devices_agrees(repo_root):
  run_on_host_devices(PAIRED_ON_EIGHT_DEVICES, repo_root, timeout=900)


@pytest.mark.parametrize("paired_loss", ["paper", "release"])
def test_a_paired_step_leaves_the_heads_its_loss_does_not_read_as_torch_adam_does(paired_loss):
  """After a class-group step has given every head Adam moments, a paired step moves the heads its dense loss reads
  (the two embeddings, and the SRCA projections under the paper's loss) and leaves the others (GKD-Pro's prototype
  extractor; the SRCA under the release's loss) and their moments bitwise as they were: no gradient, no update."""
  from pagkd_jax import base_config
  from pagkd_jax.methods import pagkd as pagkd_method
  from pagkd_jax.models import resnet
  from pagkd_jax.training import optimizer

  c, k, s = 3, 2, 32
  config = base_config.get_config()
  config.stage, config.model.name, config.data.image_size = "pagkd", "tiny", s
  config.distill.warmup_epochs = 0.0
  config.distill.embed_dim, config.distill.num_queries, config.distill.qformer_heads = 16, 4, 4
  config.distill.paired_loss = paired_loss
  config.data.group_size = k
  model = resnet.create_resnet("tiny", c)
  tx = optimizer.make_optimizer(config.optim, total_steps=10, steps_per_epoch=5, gated_params=("heads",))
  program = pagkd_method.PaGKDProgram(frozen=())
  state = program.init_state(model, tx, jax.random.key(0), config)
  teacher = model.init(jax.random.key(7), jnp.zeros((1, s, s, 3)))
  rng = np.random.default_rng(0)
  groups = {"wli": rng.integers(0, 256, (c, k, s, s, 3), dtype=np.uint8),
            "nbi": rng.integers(0, 256, (c, k, s, s, 3), dtype=np.uint8), "label": np.arange(c, dtype=np.int32)}
  pairs = {"wli": rng.integers(0, 256, (4, s, s, 3), dtype=np.uint8),
           "nbi": rng.integers(0, 256, (4, s, s, 3), dtype=np.uint8), "label": np.array([0, 2, 1, 2], np.int32)}
  heads = pagkd_method.make_heads(config, c)
  state, _ = jax.jit(pagkd_method.make_pagkd_update(model, heads, tx, config, 5))(state, groups, teacher)
  after, _ = jax.jit(pagkd_method.make_paired_update_factory(model, tx, config, 5))(state, pairs, teacher)

  read = set(pagkd_method.PAIRED_LOSS_HEADS[paired_loss])
  assert set(state.params["heads"]) == {"student_embed", "teacher_embed", "prototypes", "srca"}

  def leaves_under(tree, head):
    return [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
            if any(getattr(a, "key", None) == "heads" and getattr(b, "key", None) == head
                   for a, b in zip(path, path[1:]))]

  for head in state.params["heads"]:
    before = leaves_under(state.params, head) + leaves_under(state.opt_state, head)
    now = leaves_under(after.params, head) + leaves_under(after.opt_state, head)
    assert len(before) == len(now) > len(leaves_under(state.params, head))  # Parameters and their two moments.
    moment = leaves_under(state.opt_state, head)
    assert any(np.any(np.asarray(m) != 0) for m in moment), head  # The group step gave it momentum to move with.
    same = all(np.array_equal(a, b) for a, b in zip(before, now))
    assert same == (head not in read), head
  assert not np.array_equal(state.params["student"]["fc"]["kernel"], after.params["student"]["fc"]["kernel"])
