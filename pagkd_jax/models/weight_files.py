"""Reads a PyTorch-side checkpoint file into a flat {name: numpy array} state dict.

* `.safetensors` (timm, the Hugging Face hub): read with the `safetensors` package, without PyTorch.
* `.pth` / `.pt` / `.bin` (torchvision, training scripts): read with `torch.load(..., weights_only=True)`, which
  refuses to run code stored in the file. Needs PyTorch (`pip install torch`, the CPU build is enough).

Checkpoints that wrap the weights (`{"state_dict": ...}`, `{"model": ...}`) are unwrapped and a DataParallel
`module.` prefix is stripped, so a training script's checkpoint reads like a published one.
"""

import os
import pathlib
from collections.abc import Mapping

import numpy as np

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_NO_TORCH_MESSAGE = (
    "Reading the PyTorch checkpoint {path} needs PyTorch, which is not installed in this environment. Install it "
    "(`pip install torch`; the CPU build is enough), or convert the file to .safetensors where PyTorch is installed "
    "(`safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')`), which this "
    "tool reads without PyTorch.")


class WeightFileError(ValueError):
  """A checkpoint file that cannot be read as a state dict."""


def _unwrap(obj, path: str) -> Mapping:
  """The tensor dict inside `obj` (a state dict, or a training checkpoint holding one)."""
  for _ in range(3):
    if isinstance(obj, Mapping) and not any(hasattr(v, "shape") for v in obj.values()):
      inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
      if inner is None:
        raise WeightFileError(f"{path} holds a dict without tensors (keys: {sorted(obj)[:10]}); expected a "
                              f"state dict or a checkpoint with one under {' / '.join(_WRAPPER_KEYS)}.")
      obj = inner
  if not isinstance(obj, Mapping):
    raise WeightFileError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors.")
  return obj


def _strip_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Removes the `module.` that DataParallel / DistributedDataParallel put before every key."""
  if state and all(k.startswith("module.") for k in state):
    return {k[len("module."):]: v for k, v in state.items()}
  return state


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(_NO_TORCH_MESSAGE.format(path=path)) from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises pickle, zip and "weights only" errors of many types.
    raise WeightFileError(f"PyTorch could not read {path} as a weights-only checkpoint: {e}") from e
  state = {}
  for name, value in _unwrap(obj, path).items():
    if not isinstance(value, torch.Tensor):
      continue  # e.g. a stored epoch counter beside the tensors.
    value = value.detach().cpu()
    state[name] = (value.float() if value.is_floating_point() else value).numpy()
  return state


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  try:
    return dict(load_file(path))
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    raise WeightFileError(f"{path} is not a readable .safetensors file: {e}") from e


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """{tensor name: array} from a `.pth`/`.pt`/`.bin` or `.safetensors` file (floating tensors as float32).

  Raises:
    FileNotFoundError: no such file.
    ImportError: a PyTorch file and no PyTorch, with how to proceed.
    WeightFileError: an unknown suffix or a file that does not hold a state dict, naming the file.
  """
  path = str(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No weights file at {path}.")
  suffix = pathlib.Path(path).suffix.lower()
  if suffix in SAFETENSORS_SUFFIXES:
    state = _read_safetensors(path)
  elif suffix in TORCH_SUFFIXES:
    state = _read_torch(path)
  else:
    raise WeightFileError(f"Unknown weights file type {suffix!r} ({path}); expected one of "
                          f"{', '.join(TORCH_SUFFIXES + SAFETENSORS_SUFFIXES)}.")
  state = {k: np.asarray(v, np.float32) if np.issubdtype(np.asarray(v).dtype, np.floating) else np.asarray(v)
           for k, v in _strip_prefix(state).items()}
  if not state:
    raise WeightFileError(f"{path} holds no tensors.")
  return state
