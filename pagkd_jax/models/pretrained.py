"""Pretrained backbones: the folder `tools/import_weights.py` writes, and how `config.model.init_from` uses it.

Folder layout (DIR):
  DIR/variables/          orbax checkpoint of {"params", "batch_stats"} without the classification head
  DIR/imported_from.json  {"architecture", "source", "sha256", "format", "normalization", "head"}

`config.model.init_from` names such a folder or a weights file directly (converted on the fly). Every backbone
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
from flax import traverse_util

from pagkd_jax import checkpointing
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
    raise FileNotFoundError(f"{directory} is not an imported-weights folder: it has no {INFO_FILE} (write one with "
                            f"`python -m pagkd_jax.tools.import_weights --input FILE --output {directory}`).")
  with open(path) as f:
    return json.load(f)


def load(init_from: str, model_name: str) -> dict:
  """Backbone variables for model preset `model_name` from `init_from` (an imported folder or a weights file).

  Raises:
    ValueError: the weights are of another architecture than `model_name` (both named).
  """
  if os.path.isdir(init_from):
    architecture = read_info(init_from)["architecture"]
    variables = checkpointing.restore_numpy(os.path.join(init_from, VARIABLES_DIR)) if architecture == model_name else None
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
