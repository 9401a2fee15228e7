"""Pretrained backbones: the folder `tools/import_weights.py` writes, and how `config.model.init_from` uses it.

Folder layout (DIR):
  DIR/variables/          orbax checkpoint of {"params", "batch_stats"} without the classification head
  DIR/imported_from.json  {"architecture", "source", "sha256", "format", "normalization", "head"}

`config.model.init_from` names such a folder, a weights file (converted on the fly), or a trained run's workdir
(WORKDIR/config.json and WORKDIR/checkpoints/best, as `train.py` writes them: its best checkpoint's classifier, the
student of a stage-2 run), e.g. to pretrain on one endoscopy data set and fine-tune on another. Every backbone
variable comes from it; the head (`fc`), whose classes are the project's, keeps its random initialisation.
"""

import hashlib
import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from pagkd_jax import checkpointing
from pagkd_jax.models import resnet
from pagkd_jax.models import torchvision_layout
from pagkd_jax.models import weight_files

INFO_FILE = "imported_from.json"
VARIABLES_DIR = "variables"
# Input convention of every supported checkpoint (torchvision V1/V2, timm's ImageNet ResNets).
NORMALIZATION = "imagenet"


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def import_file(path: str) -> tuple[str, dict]:
  """A torchvision/timm ResNet weights file -> (preset name, backbone variables without the head)."""
  state = weight_files.read_state_dict(path)
  try:
    return torchvision_layout.convert(state, include_head=False)
  except torchvision_layout.LayoutError as e:
    raise torchvision_layout.LayoutError(f"{path}: {e}") from e


def save(out_dir: str, variables: dict, info: dict[str, Any]) -> None:
  """Writes DIR/variables (orbax) and DIR/imported_from.json. Refuses to overwrite an existing import."""
  out = pathlib.Path(out_dir).absolute()
  if (out / VARIABLES_DIR).exists():
    raise FileExistsError(f"{out / VARIABLES_DIR} exists; choose another --output or delete it first.")
  out.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(out / VARIABLES_DIR, jax.tree.map(np.asarray, variables))
  (out / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def read_info(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, INFO_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory} is neither an imported-weights folder (it has no {INFO_FILE}; write one "
                            f"with `python -m pagkd_jax.tools.import_weights --input FILE --output {directory}`) nor "
                            f"a training workdir (it has no config.json).")
  with open(path) as f:
    return json.load(f)


def is_workdir(directory: str) -> bool:
  """Whether `directory` is a training workdir (it has the config.json that `train.py` writes)."""
  return os.path.isfile(os.path.join(directory, "config.json"))


def read_workdir_config(workdir: str) -> dict:
  with open(os.path.join(workdir, "config.json")) as f:
    return json.load(f)


def normalization_of(init_from: str) -> str:
  """The input normalisation the weights of `init_from` were trained with (a workdir's data.normalization)."""
  if os.path.isdir(init_from) and is_workdir(init_from):
    return read_workdir_config(init_from)["data"]["normalization"]
  return NORMALIZATION


def load_workdir(workdir: str, model_name: str) -> dict:
  """The backbone (params and BatchNorm statistics, without the head: `fc`, and `embed` when there is one) of the best checkpoint of the run in `workdir`.

  Raises:
    ValueError: the run trained another architecture than `model_name` (both named).
    FileNotFoundError: the workdir has no best checkpoint.
  """
  architecture = read_workdir_config(workdir)["model"]["name"]
  if architecture != model_name:
    raise ValueError(f"config.model.init_from={workdir} is a training workdir of a {architecture} model (its "
                     f"config.json) but config.model.name is {model_name!r}; set --config.model.name={architecture} "
                     f"or start from a {model_name} run.")
  step = checkpointing.best_checkpoint_step(workdir)
  if step is None:
    raise FileNotFoundError(f"config.model.init_from={workdir} is a training workdir without a best checkpoint (no "
                            f"{os.path.join(workdir, 'checkpoints', 'best')}/<step>): train it first, with validation.")
  variables = checkpointing.read_best_variables(workdir, step)
  logging.info("Backbone: the best checkpoint (step %d) of the %s run in %s", step,
               read_workdir_config(workdir).get("stage"), workdir)
  return {"params": {k: v for k, v in variables["params"].items() if k not in resnet.HEAD_LAYERS},
          "batch_stats": variables["batch_stats"]}


def load(init_from: str, model_name: str) -> dict:
  """Backbone variables for model preset `model_name` from `init_from` (an imported folder, a weights file or a
  training workdir).

  Raises:
    ValueError: the weights are of another architecture than `model_name` (both named).
  """
  if os.path.isdir(init_from) and is_workdir(init_from):
    return load_workdir(init_from, model_name)
  if os.path.isdir(init_from):
    architecture = read_info(init_from)["architecture"]
    variables = (checkpointing.restore_numpy(os.path.join(init_from, VARIABLES_DIR))
                 if architecture == model_name else None)
  else:
    architecture, variables = import_file(init_from)
  if architecture != model_name:
    raise ValueError(f"config.model.init_from={init_from} holds {architecture} weights but config.model.name is "
                     f"{model_name!r}; set --config.model.name={architecture} or import {model_name} weights.")
  return variables


def overlay(variables: dict, pretrained: dict) -> dict:
  """`variables` with every leaf that `pretrained` has replaced by it (same structure, same shapes).

  variables: a freshly initialised {"params", "batch_stats"}; pretrained: a subset (the backbone).
  Raises:
    ValueError: naming pretrained leaves the model lacks or whose shapes differ.
  """
  flat = traverse_util.flatten_dict(variables)
  problems = []
  for key, value in traverse_util.flatten_dict(pretrained).items():
    if key not in flat:
      problems.append(f"{'/'.join(key)} is not a variable of the model")
    elif tuple(flat[key].shape) != tuple(np.shape(value)):
      problems.append(f"{'/'.join(key)} has shape {tuple(np.shape(value))}, the model's is {tuple(flat[key].shape)}")
    else:
      flat[key] = jax.numpy.asarray(value, flat[key].dtype)
  if problems:
    raise ValueError("Pretrained weights do not fit the model: " + "; ".join(problems[:12]))
  return traverse_util.unflatten_dict(flat)
