"""The table of training methods (pagkd_jax/methods/__init__.py) is the one source of the values of config.stage:
the config check allows exactly its stages, each resolves to a program that fulfils the contract, and the trainer,
the config check and the data split import no method."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from pagkd_jax import config_check
from pagkd_jax import experiment
from pagkd_jax import methods
from pagkd_jax.data import class_groups
from pagkd_jax.data.records import ImageRecord
from pagkd_jax.training import optimizer
from pagkd_jax.training import trainer
from subprocess_env import env_with_xla_flags
from training_configs import tiny_synthetic_config


def _stage_rule() -> config_check.Rule:
  (rule,) = [r for r in config_check.RULES if r.paths == ("stage",)]
  return rule


def test_the_config_check_allows_exactly_the_tables_stages():
  rule = _stage_rule()
  assert methods.STAGES == tuple(methods.METHODS) == (
      "teacher", "baseline", "pagkd", "crckd", "kd", "fitnets", "add")
  assert rule.allowed == "one of " + ", ".join(repr(s) for s in methods.METHODS)
  assert all(rule.ok(stage) for stage in methods.METHODS)
  assert not any(rule.ok(s) for s in ("student", "PaGKD", "", None, 1))


def test_an_unknown_stage_is_refused_naming_the_known_ones():
  with pytest.raises(ValueError, match=r"Unknown config.stage 'student'; expected one of \('teacher', 'baseline', "
                                       r"'pagkd', 'crckd', 'kd', 'fitnets', 'add'\)"):
    methods.get("student")
  assert [methods.stage_modality(s) for s in methods.STAGES] == ["nbi", "wli", "wli", "wli", "wli", "wli", "wli"]
  assert [methods.get(s).data_modalities for s in methods.STAGES] == [("nbi",), ("wli",), ("nbi", "wli"), ("wli",),
                                                                      ("nbi", "wli"), ("nbi", "wli"), ("nbi", "wli")]


def test_trainer_config_check_and_data_split_import_no_method(repo_root):
  """The method modules are imported when a stage trains, not by the modules that read the table."""
  code = ("import sys; import pagkd_jax.training.trainer, pagkd_jax.config_check, pagkd_jax.experiment, "
          "pagkd_jax.evaluation.evaluator; print(sorted(m for m in sys.modules if m.startswith('pagkd_jax.methods')))")
  out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, env=env_with_xla_flags(), capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == "['pagkd_jax.methods']", out.stderr


class Recorded(Exception):
  """Stops a method's `train` at the run it asks for, with that run's arguments."""

  def __init__(self, config, workdir, program):
    super().__init__(config.stage)
    self.config, self.workdir, self.program = config, workdir, program


def _record(config, workdir, program):
  raise Recorded(config, workdir, program)


def _check_program(program, stage, config):
  """The contract of the methods docstring, checked by running it abstractly (no compile, no data)."""
  method = methods.get(stage)
  assert set(program.modalities) <= set(method.data_modalities)
  assert isinstance(program.frozen, tuple)
  model = experiment.build_model(config)
  tx = optimizer.make_optimizer(config.optim, 10, 5, gated_params=getattr(program, "gated_params", ()))
  state = jax.eval_shape(lambda: program.init_state(model, tx, jax.random.key(0), config, None))
  assert state.step.shape == () and state.step.dtype == jnp.int32
  size = config.data.image_size
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  evaluated = program.eval_variables(state)
  assert jax.tree.structure(evaluated) == jax.tree.structure(dict(expected))
  assert jax.tree.map(lambda a: a.shape, evaluated) == jax.tree.map(lambda a: a.shape, dict(expected))
  update = program.make_update(model, tx, config, 5)
  k = config.data.group_size
  options = getattr(program, "batch_options", {})
  batch = {key: jax.ShapeDtypeStruct((len(config.data.classes), k, size, size, 3), jnp.uint8)
           for key in class_groups.group_keys(program.modalities, **options)}
  if options.get("row_indices"):
    batch.update({class_groups.row_key(m): jax.ShapeDtypeStruct((len(config.data.classes), k), jnp.int32)
                  for m in program.modalities})
  batch["label"] = jax.ShapeDtypeStruct((len(config.data.classes),), jnp.int32)
  new_state, metrics = jax.eval_shape(update, state, batch, *program.frozen)
  assert jax.tree.structure(new_state) == jax.tree.structure(state) and "loss" in metrics


@pytest.mark.parametrize("stage", ["teacher", "baseline"])
def test_each_classifier_stage_resolves_to_its_program(stage, tmp_path):
  config = tiny_synthetic_config(tmp_path / "data", stage=stage)
  with pytest.raises(Recorded) as run:
    methods.get(stage).train(config, str(tmp_path / "run"), _record)
  assert run.value.workdir == str(tmp_path / "run") and run.value.config is config
  assert run.value.program.modalities == (methods.stage_modality(stage),)
  _check_program(run.value.program, stage, config)


def test_the_pagkd_stage_trains_its_teacher_then_resolves_to_the_student_program(tmp_path):
  """The teacher run is trained for real (1 step, so the student finds its checkpoint); the student run is
  recorded."""
  config = tiny_synthetic_config(tmp_path / "data", stage="pagkd", num_steps=1)
  config.distill.prototypes = "avg_pool"
  config.distill.embed_dim = 16
  runs = []

  def run_stage(cfg, workdir, program):
    runs.append((cfg.stage, workdir, program))
    if cfg.stage == "teacher":
      return trainer.run_stage(cfg, workdir, program)
    raise Recorded(cfg, workdir, program)

  with pytest.raises(Recorded) as run:
    methods.get("pagkd").train(config, str(tmp_path / "run"), run_stage)
  assert [(s, w) for s, w, _ in runs] == [("teacher", str(tmp_path / "run" / "teacher")),
                                          ("pagkd", str(tmp_path / "run"))]
  assert runs[0][2].modalities == ("nbi",)
  student = run.value.program
  assert sorted(student.modalities) == ["nbi", "wli"] and len(student.frozen) == 1
  assert student.selection_warmup_steps(config, 5) == experiment.distillation_warmup_steps(config, 5)
  _check_program(student, "pagkd", config)


def test_the_crckd_stage_resolves_to_its_program_with_the_banks_rows_from_the_training_records(tmp_path, caplog):
  config = tiny_synthetic_config(tmp_path / "data", stage="crckd")
  with pytest.raises(Recorded) as run:
    methods.get("crckd").train(config, str(tmp_path / "run"), _record)
  program = run.value.program
  assert program.modalities == ("wli",) and program.frozen == ()
  assert program.batch_options == {"views": 2, "row_indices": True}
  with pytest.raises(ValueError, match="for_training_records first"):
    program.init_state(experiment.build_model(config), optimizer.make_optimizer(config.optim, 10, 5),
                       jax.random.key(0), config)
  # Rows: the WLI training records in order (the NBI ones are no rows); class 0 has fewer than P = 20 of them.
  records = [ImageRecord(f"/{m}{i}.png", m, label, f"l{i}") for i, (m, label) in enumerate(
      [("wli", 1), ("nbi", 0), ("wli", 0), ("wli", 2)] + [("wli", c) for c in (1, 2) for _ in range(20)])]
  program = program.for_training_records(records, config.data.classes, config)
  assert program.row_labels == (1, 0, 2) + (1,) * 20 + (2,) * 20
  assert "fewer training images than crckd.num_positives=20 in class 'hyperplasia' (1):" in caplog.text
  assert caplog.text.count("fewer training images than crckd.num_positives") == 1
  _check_program(program, "crckd", config)
  model = experiment.build_model(config)
  assert model.embed_dim == config.crckd.embed_dim == 128
