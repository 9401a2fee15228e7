"""Maps a ResNet state dict in the torchvision key layout (also timm's) onto this project's Flax variables.

torchvision / timm                         pagkd_jax (`resnet.ResNet`)
conv1.weight            (O, I, kh, kw)     params/conv1/kernel            (kh, kw, I, O)
bn1.weight / .bias                         params/bn1/scale / bias
bn1.running_mean / .running_var            batch_stats/bn1/mean / var
layer2.0.conv1.weight                      params/layer2_0/conv1/kernel
layer2.0.downsample.0.weight / .1.*        params/layer2_0/downsample_conv/kernel, .../downsample_bn/*
fc.weight (classes, F) / fc.bias           params/fc/kernel (F, classes) / bias

`num_batches_tracked` counters are not needed (BatchNorm momentum is fixed) and are ignored.
"""

import collections
import re
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from pagkd_jax.models import resnet

_LAYER_KEY = re.compile(r"^layer(\d+)\.(\d+)\.")
_BN_FIELDS = (("weight", "params", "scale"), ("bias", "params", "bias"),
              ("running_mean", "batch_stats", "mean"), ("running_var", "batch_stats", "var"))
IMPORTABLE = ("resnet18", "resnet34", "resnet50", "resnet101")


class LayoutError(ValueError):
  """A state dict that is not a torchvision-layout ResNet of a known preset, or whose keys or shapes differ."""


def _show(keys, limit: int = 12) -> str:
  keys = sorted(keys)
  return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def infer_architecture(state: Mapping[str, np.ndarray]) -> str:
  """The preset ("resnet18", "resnet50", ...) whose blocks per stage and block type match `state`'s keys."""
  if "conv1.weight" not in state or not any(_LAYER_KEY.match(k) for k in state):
    raise LayoutError(f"Not a torchvision-layout ResNet state dict: no 'conv1.weight' / 'layerN.M.*' keys. "
                      f"Its keys start: {_show(state)}")
  blocks = collections.defaultdict(set)
  for key in state:
    if m := _LAYER_KEY.match(key):
      blocks[int(m.group(1))].add(int(m.group(2)))
  stage_sizes = tuple(len(blocks[s]) for s in sorted(blocks))
  bottleneck = any(".conv3." in k for k in state)
  for name in IMPORTABLE:
    preset = resnet.PRESETS[name]
    if preset.stage_sizes == stage_sizes and (preset.block is resnet.Bottleneck) == bottleneck:
      return name
  kind = "bottleneck" if bottleneck else "basic"
  raise LayoutError(f"A ResNet with {stage_sizes} {kind} blocks per stage matches no importable preset "
                    f"({', '.join(f'{n} {resnet.PRESETS[n].stage_sizes}' for n in IMPORTABLE)}).")


def _module_pairs(flax_module: tuple[str, ...], torch_module: str) -> Iterator[tuple[str, str, tuple[str, ...]]]:
  """(torch key, collection, flax path) of one conv or BatchNorm module."""
  if flax_module[-1].endswith("conv") or flax_module[-1].startswith("conv"):
    yield f"{torch_module}.weight", "params", flax_module + ("kernel",)
  else:
    for field, collection, leaf in _BN_FIELDS:
      yield f"{torch_module}.{field}", collection, flax_module + (leaf,)


def key_map(name: str, include_head: bool) -> list[tuple[str, str, tuple[str, ...]]]:
  """Every (torch key, Flax collection, Flax path) of preset `name`, in model order."""
  preset = resnet.PRESETS[name]
  entries = list(_module_pairs(("conv1",), "conv1")) + list(_module_pairs(("bn1",), "bn1"))
  convs = ("conv1", "conv2", "conv3") if preset.block is resnet.Bottleneck else ("conv1", "conv2")
  for stage, num_blocks in enumerate(preset.stage_sizes, start=1):
    for b in range(num_blocks):
      block = f"layer{stage}_{b}"
      for i, conv in enumerate(convs, start=1):
        entries += _module_pairs((block, conv), f"layer{stage}.{b}.conv{i}")
        entries += _module_pairs((block, f"bn{i}"), f"layer{stage}.{b}.bn{i}")
      if b == 0 and (stage > 1 or preset.block is resnet.Bottleneck):  # Projection shortcut.
        entries += _module_pairs((block, "downsample_conv"), f"layer{stage}.{b}.downsample.0")
        entries += _module_pairs((block, "downsample_bn"), f"layer{stage}.{b}.downsample.1")
  if include_head:
    entries += [("fc.weight", "params", ("fc", "kernel")), ("fc.bias", "params", ("fc", "bias"))]
  return entries


def _to_flax(value: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
  if path[-1] == "kernel" and value.ndim == 4:  # Conv (O, I, kh, kw) -> (kh, kw, I, O).
    return np.transpose(value, (2, 3, 1, 0))
  if path[-1] == "kernel" and value.ndim == 2:  # Linear (out, in) -> (in, out).
    return value.T
  return value


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for part in path[:-1]:
    tree = tree.setdefault(part, {})
  tree[path[-1]] = value


def _get(tree, path: tuple[str, ...]):
  for part in path:
    tree = tree[part]
  return tree


def convert(state: Mapping[str, np.ndarray], *, include_head: bool = False) -> tuple[str, dict]:
  """torchvision-layout state dict -> (preset name, {"params": ..., "batch_stats": ...}) of float32 numpy arrays.

  Without `include_head` the 1000-class `fc` is dropped (the project's head has its own classes). Every key of
  the preset must be present with the shape the Flax model expects; nothing else but `fc.*` and
  `num_batches_tracked` may be left over.

  Raises:
    LayoutError: naming the missing, unexpected or wrongly shaped keys.
  """
  name = infer_architecture(state)
  entries = key_map(name, include_head)
  present = {k for k in state if not k.endswith("num_batches_tracked")}
  expected = {key for key, _, _ in entries}
  missing = expected - present
  unexpected = present - expected - ({"fc.weight", "fc.bias"} if not include_head else set())
  problems = []
  if missing:
    problems.append(f"missing keys: {_show(missing)}")
  if unexpected:
    problems.append(f"unexpected keys: {_show(unexpected)}")
  if problems:
    raise LayoutError(f"The state dict looks like a {name} but does not match it: " + "; ".join(problems))

  num_classes = state["fc.weight"].shape[0] if include_head else 1
  model = resnet.create_resnet(name, num_classes)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  variables: dict = {}
  wrong = []
  for key, collection, path in entries:
    value = _to_flax(np.asarray(state[key], np.float32), path)
    want = tuple(_get(shapes[collection], path).shape)
    if value.shape != want:
      wrong.append(f"{key} {tuple(state[key].shape)} (as {'/'.join(path)}: {value.shape}, expected {want})")
      continue
    _set(variables.setdefault(collection, {}), path, value)
  if wrong:
    raise LayoutError(f"Wrong shapes for a {name}: " + "; ".join(wrong[:12]) +
                      (f"; ... ({len(wrong) - 12} more)" if len(wrong) > 12 else ""))
  return name, variables
