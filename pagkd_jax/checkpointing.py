"""Orbax checkpoints of a run: `latest` (state + data-iterator position, for exact resume) and `best`
(the model variables with the best validation AUC, for evaluation).

Layout: WORKDIR/checkpoints/latest/<step>/{state,data_iter,meta} (data_iter: the class-group stream's position,
absent for a run without that stream; plus data_iter_<name> for each extra training stream of the run, e.g.
data_iter_paired) and WORKDIR/checkpoints/best/<step>/variables.
Orbax writes each checkpoint to a temporary folder and renames it when complete, so an interrupted save never
leaves a checkpoint that looks finished.
"""

import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


class CheckpointMismatchError(ValueError):
  """A checkpoint whose arrays do not fit the model (or state) the config builds."""


def _shapes(tree) -> dict[str, tuple]:
  return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(leaf, "shape")}


def check_fits(item_dir: str, abstract, what: str, subtrees: tuple[str, ...] | None = None) -> None:
  """Compares the arrays saved in `item_dir` with `abstract` (the config's model) before restoring.

  subtrees: only compare these top-level keys (e.g. the params and batch_stats of a saved training state).
  Raises:
    CheckpointMismatchError: listing the arrays that are missing, extra or of another shape, with both shapes.
  """
  saved = ocp.PyTreeCheckpointHandler().metadata(epath.Path(item_dir))
  saved = saved.tree if hasattr(saved, "tree") else saved
  if subtrees is not None:
    saved = {k: saved[k] for k in subtrees if k in saved}
    abstract = {k: abstract[k] for k in subtrees}
  found, expected = _shapes(saved), _shapes(abstract)
  order = lambda keys: sorted(keys, key=lambda k: (not k.startswith("params/fc"), not k.startswith("params"), k))
  problems = [f"{k}: checkpoint {found[k]}, model {expected[k]}" for k in order(set(found) & set(expected))
              if found[k] != expected[k]]
  problems += [f"{k}: not in the checkpoint" for k in order(set(expected) - set(found))]
  problems += [f"{k}: in the checkpoint only" for k in order(set(found) - set(expected))]
  if problems:
    shown = "; ".join(problems[:10]) + (f"; ... ({len(problems) - 10} more)" if len(problems) > 10 else "")
    raise CheckpointMismatchError(
        f"The checkpoint {item_dir} does not fit {what} ({len(problems)} arrays differ: {shown}). It was written "
        f"with another architecture (config.model.name) or class list (config.data.classes) than this config.")


def restore_numpy(item_dir: str) -> Any:
  """The tree saved in one checkpoint item folder (e.g. WORKDIR/checkpoints/latest/400/state), as host numpy
  arrays: for inspecting checkpoints and for values every process needs whole."""
  path = epath.Path(item_dir).absolute()
  tree = ocp.PyTreeCheckpointHandler().metadata(path)
  tree = tree.tree if hasattr(tree, "tree") else tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  with ocp.PyTreeCheckpointer() as checkpointer:
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def read_latest_state(workdir: str, step: int | None = None) -> tuple[int, Any]:
  """(step, training state as a numpy tree) of WORKDIR's latest checkpoint, or of checkpoint `step`."""
  step = latest_checkpoint_step(workdir) if step is None else step
  if step is None:
    raise FileNotFoundError(f"No training checkpoint in {workdir}.")
  return step, restore_numpy(os.path.join(os.path.abspath(workdir), "checkpoints", "latest", str(step), "state"))


def _newest_step(workdir: str, which: str) -> int | None:
  """The newest step in WORKDIR/checkpoints/<which> (None when there is none); creates nothing."""
  path = os.path.join(os.path.abspath(workdir), "checkpoints", which)
  if not os.path.isdir(path):
    return None
  with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False)) as mgr:
    return mgr.latest_step()


def best_checkpoint_step(workdir: str) -> int | None:
  """The step of WORKDIR's best checkpoint (None when there is none); creates nothing."""
  return _newest_step(workdir, "best")


def read_best_variables(workdir: str, step: int) -> Any:
  """The {"params", "batch_stats"} of WORKDIR's best checkpoint of `step`, as a numpy tree."""
  return restore_numpy(os.path.join(os.path.abspath(workdir), "checkpoints", "best", str(step), "variables"))


def abstract_like(tree, sharding) -> Any:
  """ShapeDtypeStruct targets with `sharding`, to restore onto this run's device layout."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def latest_checkpoint_step(workdir: str) -> int | None:
  """The step of WORKDIR's latest complete training checkpoint (None when there is none); creates nothing."""
  return _newest_step(workdir, "latest")


class RunCheckpoints:
  """The two checkpoint managers of one workdir."""

  def __init__(self, workdir: str, keep_latest: int = 1, async_save: bool = True):
    root = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.latest = ocp.CheckpointManager(
        os.path.join(root, "latest"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep_latest, create=True,
                                             enable_async_checkpointing=async_save))
    self.best = ocp.CheckpointManager(
        os.path.join(root, "best"),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True, best_fn=lambda m: m["val_auc"],
                                             best_mode="max", enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save_latest(self, step: int, state, data_iter, meta: dict, extra_iters: dict | None = None) -> None:
    """Saves the training state, the class-group iterator's position (`data_iter`; None for a run without the
    class-group stream) and `meta`; `extra_iters` ({stream name: iterator}) the position of each extra training
    stream, as item data_iter_<name>."""
    # One manager finalises at a time: with several processes, two background finalisations would enter orbax's
    # multi-host barrier under the same name at once and fail ("Barrier ... is already ongoing").
    self.best.wait_until_finished()
    extras = {f"data_iter_{name}": grain.checkpoint.CheckpointSave(it) for name, it in (extra_iters or {}).items()}
    if data_iter is not None:
      extras["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    self.latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta), **extras), force=True)

  def restore_latest(self, abstract_state, data_iter, extra_iters: dict | None = None) -> tuple[Any, dict]:
    """Restores the newest latest checkpoint into `abstract_state`'s layout, and the positions of `data_iter` (the
    class-group stream's; None for a run without it) and of each iterator of `extra_iters` ({stream name:
    iterator}) in place. Returns (state, meta).

    Raises:
      CheckpointMismatchError: the saved model does not fit, or an extra stream has no saved position (the
      checkpoint was written by a run without that stream).
    """
    step = self.latest.latest_step()
    check_fits(os.path.join(self.latest.directory, str(step), "state"),
               {"params": abstract_state.params, "batch_stats": abstract_state.batch_stats},
               "the model of this config", subtrees=("params", "batch_stats"))
    extras = {}
    for name, it in (extra_iters or {}).items():
      item = f"data_iter_{name}"
      if not os.path.isdir(os.path.join(self.latest.directory, str(step), item)):
        raise CheckpointMismatchError(f"The checkpoint {os.path.join(self.latest.directory, str(step))} has no "
                                      f"position of the {name} stream ({item}): it was written by a run without it.")
      extras[item] = grain.checkpoint.CheckpointRestore(it)
    if data_iter is not None:
      extras["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore(), **extras))
    return restored.state, restored.meta

  def save_best(self, step: int, variables, val_auc: float) -> None:
    # A run resumed from before a crash may reach a step whose best checkpoint it already wrote.
    self.latest.wait_until_finished()  # See save_latest.
    if step in self.best.all_steps():
      self.best.wait_until_finished()
      self.best.delete(step)
    self.best.save(step, args=ocp.args.Composite(variables=ocp.args.StandardSave(variables)),
                   metrics={"val_auc": float(val_auc)}, force=True)

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    """Waits for the saves in flight, then closes both managers."""
    self.wait()
    self.latest.close()
    self.best.close()


def restore_model_variables(workdir: str, abstract_variables, which: str = "best") -> tuple[Any, int, str]:
  """Restores {"params", "batch_stats"} from `which` ("best", falling back to "latest"; or "latest").

  Returns (variables, step, kind). Raises FileNotFoundError naming the workdir when it has no checkpoint.
  """
  root = os.path.join(os.path.abspath(workdir), "checkpoints")
  order = ["best", "latest"] if which == "best" else ["latest"]
  for kind in order:
    path = os.path.join(root, kind)
    if not os.path.isdir(path):
      continue
    mgr = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False))
    step = mgr.latest_step()
    if step is None:
      continue
    item = "variables" if kind == "best" else "state"
    check_fits(os.path.join(path, str(step), item), dict(abstract_variables), "the model of this workdir's config.json",
               subtrees=("params", "batch_stats"))
    if kind == "best":
      restored = mgr.restore(step, args=ocp.args.Composite(variables=ocp.args.StandardRestore(abstract_variables)))
      variables = restored.variables
    else:
      abstract_state = {"params": abstract_variables["params"], "batch_stats": abstract_variables["batch_stats"]}
      restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
          partial_restore=True)))
      variables = {"params": restored.state["params"], "batch_stats": restored.state["batch_stats"]}
    mgr.close()
    return variables, step, kind
  raise FileNotFoundError(f"No checkpoint in {root}: train first with `python train.py --workdir={workdir}`.")
