"""Negative controls and training diagnostics of stage 2: each changes exactly what it claims.

Shuffled training labels (data), teacher groups shifted to the wrong class and random region labels (distillation),
and the diagnostics logged with the training metrics (token norms, gradient norms at the student's layer4).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagkd_jax.data import splits as splits_lib
from pagkd_jax.data.normalization import normalize_images
from pagkd_jax.data.records import ImageRecord
from pagkd_jax.distill import pagkd
from pagkd_jax.distill import prototype_loss
from pagkd_jax.distill import qformer
from pagkd_jax.methods import pagkd as pagkd_method
from pagkd_jax.methods.classifier import flatten_groups
from test_pagkd_step import C, K, _setup


# ---- shuffled training labels ---------------------------------------------------------------------------------
def _records():
  rng = np.random.default_rng(0)
  records, splits = [], []
  for i in range(120):
    modality = ("wli", "nbi")[i % 2]
    records.append(ImageRecord(path=f"/d/{modality}/img{i:03d}.png", modality=modality, label=int(rng.integers(3)),
                               lesion_id=f"lesion{i // 2}"))
    splits.append(("train", "train", "val", "test")[i % 4] if i < 100 else "train")
  return records, splits


def test_shuffled_labels_permute_only_training_labels_within_each_modality():
  records, splits = _records()
  shuffled = splits_lib.shuffle_train_labels(records, splits, seed=3)
  assert [dataclasses_without_label(r) for r in shuffled] == [dataclasses_without_label(r) for r in records]
  for modality in ("wli", "nbi"):
    train = [i for i, (r, s) in enumerate(zip(records, splits)) if s == "train" and r.modality == modality]
    before = np.array([records[i].label for i in train])
    after = np.array([shuffled[i].label for i in train])
    assert sorted(before) == sorted(after)  # A permutation: per-class counts kept.
    assert np.mean(before != after) > 0.3  # Labels really moved (3 classes: about 2/3 change).
  for r, s, new in zip(records, splits, shuffled):
    if s != "train":
      assert new == r  # Validation and test untouched.
  # Deterministic per seed, independent of the order of the records, different for another seed.
  assert splits_lib.shuffle_train_labels(records, splits, seed=3) == shuffled
  order = np.random.default_rng(1).permutation(len(records))
  reordered = splits_lib.shuffle_train_labels([records[i] for i in order], [splits[i] for i in order], seed=3)
  assert sorted(reordered, key=lambda r: r.path) == sorted(shuffled, key=lambda r: r.path)
  assert splits_lib.shuffle_train_labels(records, splits, seed=4) != shuffled


def test_shuffled_labels_reach_the_loaded_split(tmp_path):
  """experiment.load_split_data with data.shuffle_train_labels: the same split, training labels permuted."""
  from pagkd_jax import experiment
  from training_configs import tiny_synthetic_config
  config = tiny_synthetic_config(tmp_path / "data")
  plain = experiment.load_split_data(config)
  config.data.shuffle_train_labels = True
  shuffled = experiment.load_split_data(config)
  assert plain.splits == shuffled.splits
  expected = splits_lib.shuffle_train_labels(plain.records, plain.splits, config.seed)
  assert list(shuffled.records) == expected and list(shuffled.records) != list(plain.records)
  for split in ("val", "test"):
    assert shuffled.select(split) == plain.select(split)


def dataclasses_without_label(record):
  return (record.path, record.modality, record.lesion_id, record.patient_id, record.pair_id)


# ---- distillation controls ------------------------------------------------------------------------------------
def _features(config, model, state, teacher, batch):
  """What the loss sees: normalised images, student and teacher layer4 maps, class-major labels."""
  norm = lambda x: normalize_images(flatten_groups(jnp.asarray(x)), "imagenet")  # (K * C, ...), K-major.
  student = {"params": state.params["student"], "batch_stats": state.batch_stats["student"]}
  (_, s_feat), _ = model.apply(student, norm(batch["wli"]), train=True, mutable=["batch_stats"])
  _, t_feat = model.apply(teacher, norm(batch["nbi"]), train=False)
  labels = np.tile(np.arange(C), K)
  return norm(batch["wli"]), norm(batch["nbi"]), s_feat, t_feat, labels


def _loss(config, model, state, batch):
  """The jitted stage-2 loss of `config`: terms(teacher, step) -> the loss terms (one compilation per config)."""
  heads = pagkd_method.make_heads(config, C)
  loss_fn = jax.jit(pagkd_method.make_pagkd_loss(model, heads, config, steps_per_epoch=5))
  return heads, lambda teacher, step=2: loss_fn(state.params, state.batch_stats, jnp.int32(step), batch, teacher)[1][0]


def _terms(config, model, state, teacher, batch, step=2):
  heads, terms = _loss(config, model, state, batch)
  return heads, terms(teacher, step)


def test_shift_teacher_groups_gives_class_c_the_group_of_class_c_plus_shift():
  x = np.arange(C * K).reshape(C, K)
  for shift in (1, 2, -1):
    out = np.asarray(pagkd.shift_teacher_groups(jnp.asarray(x), shift))
    for c in range(C):
      np.testing.assert_array_equal(out[c], x[(c + shift) % C])


def test_draw_class_shift_is_uniform_over_the_other_classes():
  for num_classes in (3, 5):
    keys = jax.random.split(jax.random.key(0), 2000)
    shifts = np.asarray(jax.vmap(lambda k: pagkd.draw_class_shift(k, num_classes))(keys))
    counts = np.bincount(shifts, minlength=num_classes)
    assert counts[0] == 0 and counts[1:].sum() == len(shifts)  # Never the group's own class.
    np.testing.assert_allclose(counts[1:] / len(shifts), 1 / (num_classes - 1), atol=0.05)


def test_per_step_shift_gives_each_step_the_groups_of_its_drawn_shift():
  """teacher_class_shift_per_step: at each step the losses equal those of the fixed shift drawn for that step
  (from key seed + 3 folded with the step), and over steps both wrong classes occur (C = 3)."""
  config, model, _, state, teacher, batch = _setup(teacher_class_shift_per_step=True)
  _, terms = _loss(config, model, state, batch)
  fixed = {shift: _loss(_setup(teacher_class_shift=shift)[0], model, state, batch)[1] for shift in range(1, C)}
  drawn = []
  for step in (2, 3, 4, 5, 6, 7):
    shift = int(pagkd.draw_class_shift(jax.random.fold_in(jax.random.key(config.seed + 3), step), C))
    drawn.append(shift)
    got, want = terms(teacher, step), fixed[shift](teacher, step)
    np.testing.assert_allclose(float(got["loss_pro"]), float(want["loss_pro"]), rtol=1e-5)
    np.testing.assert_allclose(float(got["loss_den"]), float(want["loss_den"]), rtol=1e-5)
  assert set(drawn) == set(range(1, C)), drawn  # Not one consistent wrong class.


def test_permuted_teacher_groups_make_the_wrong_class_the_positive():
  """With teacher_class_shift=1 the losses equal the heads applied to teacher groups rolled by one class, and the
  paper InfoNCE's positive of WLI anchor c is the NBI prototype set of class c + 1 (NumPy reference)."""
  config, model, _, state, teacher, batch = _setup(teacher_class_shift=1)
  heads, terms = _terms(config, model, state, teacher, batch)
  x_wli, x_nbi, s_feat, t_feat, labels = _features(config, model, state, teacher, batch)
  r_wli = pagkd.region_labels(x_wli, s_feat, state.params["student"]["fc"]["kernel"], labels, config.distill)
  r_nbi = pagkd.region_labels(x_nbi, t_feat, teacher["params"]["fc"]["kernel"], labels, config.distill)
  group = lambda a: pagkd_method.unflatten_groups(a, C)
  roll = lambda a: np.roll(np.asarray(group(a)), -1, axis=0)  # Row c = group of class c + 1.
  expected = heads.apply({"params": state.params["heads"]}, group(s_feat), roll(t_feat), jnp.arange(C),
                         group(r_wli), roll(r_nbi))
  np.testing.assert_allclose(float(terms["loss_pro"]), float(expected["loss_pro"]), rtol=1e-4)
  np.testing.assert_allclose(float(terms["loss_den"]), float(expected["loss_den"]), rtol=1e-4)
  _, plain = _terms(_setup()[0], model, state, teacher, batch)
  assert abs(float(plain["loss_pro"]) - float(terms["loss_pro"])) > 1e-4

  # The prototype sets of the shifted run, and the InfoNCE written out in NumPy with WLI c against NBI c + 1.
  params = state.params["heads"]
  tokens_wli = np.asarray(group(s_feat)) @ np.asarray(params["student_embed"]["kernel"])
  tokens_nbi = roll(t_feat) @ np.asarray(params["teacher_embed"]["kernel"])
  extractor = qformer.make_prototype_extractor(
      config.distill.prototypes, num_queries=config.distill.num_queries, num_layers=config.distill.qformer_layers,
      num_heads=config.distill.qformer_heads, variant="paper")
  q_wli = np.asarray(extractor.apply({"params": params["prototypes"]}, jnp.asarray(tokens_wli)), np.float64)
  q_nbi = np.asarray(extractor.apply({"params": params["prototypes"]}, jnp.asarray(tokens_nbi)), np.float64)
  sets = np.concatenate([q_wli, q_nbi])
  sets /= np.linalg.norm(sets, axis=-1, keepdims=True)
  losses = []
  for a in range(2 * C):
    positive = (a + C) % (2 * C)
    sim = [np.mean(np.sum(sets[a] * sets[b], -1)) / config.distill.temperature for b in range(2 * C)]
    candidates = [b for b in range(2 * C) if b == positive or b % C != a % C]
    losses.append(np.log(np.sum(np.exp([sim[b] for b in candidates]))) - sim[positive])
  np.testing.assert_allclose(float(terms["loss_pro"]), np.mean(losses), rtol=1e-4)
  np.testing.assert_allclose(
      float(prototype_loss.group_contrastive_loss(jnp.asarray(q_wli), jnp.asarray(q_nbi), jnp.arange(C), 0.1)),
      np.mean(losses), rtol=1e-4)


def test_random_region_labels_follow_their_fractions_and_key():
  rng = jax.random.key(5)
  labels = np.asarray(pagkd.random_region_labels(rng, (64, 16, 16), (0.5, 0.3, 0.2)))
  assert labels.dtype == np.int8 and labels.shape == (64, 16, 16)
  n = labels.size  # 16384 draws: 4 standard deviations of a fraction are below 0.016.
  np.testing.assert_allclose([np.mean(labels == 1), np.mean(labels == 0), np.mean(labels == -1)], [0.5, 0.3, 0.2],
                             atol=4 * np.sqrt(0.25 / n))
  np.testing.assert_array_equal(labels, np.asarray(pagkd.random_region_labels(rng, (64, 16, 16), (5, 3, 2))))
  assert not np.array_equal(labels, np.asarray(pagkd.random_region_labels(jax.random.key(6), (64, 16, 16),
                                                                            (0.5, 0.3, 0.2))))
  uniform = np.asarray(pagkd.random_region_labels(rng, (64, 16, 16)))
  np.testing.assert_allclose([np.mean(uniform == v) for v in (1, 0, -1)], [1 / 3] * 3, atol=4 * np.sqrt(0.25 / n))


def test_random_region_labels_replace_cam_and_par():
  """L_den with region_labels="random" is the heads' loss on labels drawn from the step's key, and it does not
  change when the teacher's head (hence every CAM) does; with CAM + PAR it does."""
  config, model, _, state, teacher, batch = _setup(region_labels="random", use_pro=False)
  heads, random_terms = _loss(config, model, state, batch)
  terms = random_terms(teacher, 2)
  _, x_nbi, s_feat, t_feat, _ = _features(config, model, state, teacher, batch)
  rng_wli, rng_nbi = jax.random.split(jax.random.fold_in(jax.random.key(config.seed + 2), 2))
  r_wli = pagkd.random_region_labels(rng_wli, s_feat.shape[:3])
  r_nbi = pagkd.random_region_labels(rng_nbi, t_feat.shape[:3])
  group = lambda a: pagkd_method.unflatten_groups(a, C)
  expected = heads.apply({"params": state.params["heads"]}, group(s_feat), group(t_feat), jnp.arange(C),
                         group(r_wli), group(r_nbi))
  np.testing.assert_allclose(float(terms["loss_den"]), float(expected["loss_den"]), rtol=1e-4)
  # About a third of the queries are ambiguous and never enter the loss.
  assert 0.5 < float(terms["den/known_fraction/nbi_to_wli"]) < 0.85

  other = {"params": {**teacher["params"], "fc": {"kernel": -teacher["params"]["fc"]["kernel"],
                                                  "bias": teacher["params"]["fc"]["bias"]}},
           "batch_stats": teacher["batch_stats"]}
  assert float(random_terms(other, 2)["loss_den"]) == float(terms["loss_den"])
  _, cam_terms = _loss(_setup(use_pro=False)[0], model, state, batch)
  assert float(cam_terms(teacher, 2)["loss_den"]) != float(cam_terms(other, 2)["loss_den"])
  assert float(random_terms(teacher, 3)["loss_den"]) != float(terms["loss_den"])  # A new draw every step.


def test_bad_control_values_are_named():
  for key, value, match in (("region_labels", "cams", "distill.region_labels"),
                            ("random_region_fractions", (0.5, 0.5), "random_region_fractions"),
                            ("random_region_fractions", (1.0, -0.5, 0.5), "random_region_fractions")):
    config = _setup()[0]
    config.distill[key] = value
    with pytest.raises(ValueError, match=match):
      pagkd.check_config(config.distill)


# ---- diagnostics ----------------------------------------------------------------------------------------------
def test_diagnostics_match_explicit_gradients_and_token_norms():
  config, model, _, state, teacher, batch = _setup(lambda_den=0.5)
  config.train.log_grad_norms = True
  heads, terms = _terms(config, model, state, teacher, batch)
  x_wli, x_nbi, s_feat, t_feat, labels = _features(config, model, state, teacher, batch)
  r_wli = pagkd.region_labels(x_wli, s_feat, state.params["student"]["fc"]["kernel"], labels, config.distill)
  r_nbi = pagkd.region_labels(x_nbi, t_feat, teacher["params"]["fc"]["kernel"], labels, config.distill)
  group = lambda a: pagkd_method.unflatten_groups(a, C)
  params = state.params["heads"]

  def term(name):
    return lambda f: heads.apply({"params": params}, group(f), group(t_feat), jnp.arange(C), group(r_wli),
                                 group(r_nbi))[name]

  norm = lambda g: np.sqrt(np.sum(np.square(np.asarray(g, np.float64))))
  np.testing.assert_allclose(float(terms["diag/grad_pro_layer4"]), norm(jax.grad(term("loss_pro"))(s_feat)),
                             rtol=1e-4)
  np.testing.assert_allclose(float(terms["diag/grad_den_layer4"]), 0.5 * norm(jax.grad(term("loss_den"))(s_feat)),
                             rtol=1e-4)
  # CE through GAP + linear: d CE / d f[b, y, x, :] = (softmax - onehot)[b] W^T / (h w B), in NumPy.
  fc = state.params["student"]["fc"]
  f = np.asarray(s_feat, np.float64)
  logits = f.mean(axis=(1, 2)) @ np.asarray(fc["kernel"], np.float64) + np.asarray(fc["bias"], np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  p[np.arange(len(labels)), labels] -= 1
  per_position = p @ np.asarray(fc["kernel"], np.float64).T / (f.shape[1] * f.shape[2] * f.shape[0])
  np.testing.assert_allclose(float(terms["diag/grad_cls_layer4"]),
                             np.sqrt(f.shape[1] * f.shape[2]) * norm(per_position), rtol=1e-4)
  # Token norms: mean over every position of || f W ||.
  tokens = f @ np.asarray(params["student_embed"]["kernel"], np.float64)
  np.testing.assert_allclose(float(terms["diag/token_norm_wli"]), np.linalg.norm(tokens, axis=-1).mean(), rtol=1e-4)
  tokens = np.asarray(t_feat, np.float64) @ np.asarray(params["teacher_embed"]["kernel"], np.float64)
  np.testing.assert_allclose(float(terms["diag/token_norm_nbi"]), np.linalg.norm(tokens, axis=-1).mean(), rtol=1e-4)


def test_gradient_norm_diagnostics_leave_the_update_unchanged():
  config, model, tx, state, teacher, batch = _setup()
  config.train.log_grad_norms = False
  off = pagkd_method.make_pagkd_update(model, pagkd_method.make_heads(config, C), tx, config, 5)
  on_config = _setup()[0]
  on_config.train.log_grad_norms = True
  on = pagkd_method.make_pagkd_update(model, pagkd_method.make_heads(on_config, C), tx, on_config, 5)
  state_off, metrics_off = jax.jit(off)(state, batch, teacher)
  state_on, metrics_on = jax.jit(on)(state, batch, teacher)
  assert "diag/grad_pro_layer4" not in metrics_off and float(metrics_on["diag/grad_pro_layer4"]) > 0
  for a, b in zip(jax.tree.leaves(state_off.params), jax.tree.leaves(state_on.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_gradient_norm_logging_may_change_on_resume(tmp_path):
  """A run saved before the switch existed (or with the other value) resumes: it changes logging only."""
  from pagkd_jax import base_config as base
  from pagkd_jax.training import trainer
  old = base.get_config()
  del old.train["log_grad_norms"]
  (tmp_path / "config.json").write_text(old.to_json_best_effort())
  config = base.get_config()
  config.train.log_grad_norms = False
  trainer.check_resume_config(config, str(tmp_path))
  config.distill.teacher_class_shift = 1  # A control changes the experiment: refused by name.
  with pytest.raises(ValueError, match="distill.teacher_class_shift"):
    trainer.check_resume_config(config, str(tmp_path))
  config.distill.teacher_class_shift = 0
  del old.distill["teacher_class_shift_per_step"]  # Saved before the value existed: its default is what ran.
  (tmp_path / "config.json").write_text(old.to_json_best_effort())
  trainer.check_resume_config(config, str(tmp_path))
  config.distill.teacher_class_shift_per_step = True  # Not the default: refused by name.
  with pytest.raises(ValueError, match="distill.teacher_class_shift_per_step: False -> True"):
    trainer.check_resume_config(config, str(tmp_path))


def test_a_run_saved_before_a_changed_default_is_read_as_it_ran(tmp_path):
  """distill.par_resampling's default ("release") is not what runs saved before it did ("area"): eval.py reads such
  a run with "area", and resuming it with the new default is refused by name."""
  from pagkd_jax import base_config as base
  from pagkd_jax.evaluation import evaluator
  from pagkd_jax.training import trainer
  old = base.get_config()
  del old.distill["par_resampling"]
  del old.distill["teacher_class_shift_per_step"]
  del old.distill["paired_loss"]
  (tmp_path / "config.json").write_text(old.to_json_best_effort())
  loaded = evaluator.load_config(str(tmp_path))
  assert loaded.distill.par_resampling == "area" and loaded.distill.teacher_class_shift_per_step is False
  assert loaded.distill.paired_loss is None  # No paired stream: no paired loss to keep.
  assert base.get_config().distill.par_resampling == "release" and base.get_config().distill.paired_loss is None
  completed, added = base.complete_saved_config(json.loads(old.to_json_best_effort()))
  assert sorted(added) == ["distill.paired_loss", "distill.par_resampling", "distill.teacher_class_shift_per_step"]
  assert completed["distill"]["par_resampling"] == "area"
  config = base.get_config()
  with pytest.raises(ValueError, match="distill.par_resampling: 'area' -> 'release'"):
    trainer.check_resume_config(config, str(tmp_path))
  config.distill.par_resampling = "area"
  trainer.check_resume_config(config, str(tmp_path))
  # A PaGKD (all) run saved before distill.paired_loss trained its paired stream with the release's loss.
  old.distill.paired = True
  completed, _ = base.complete_saved_config(json.loads(old.to_json_best_effort()))
  assert completed["distill"]["paired_loss"] == "release"
