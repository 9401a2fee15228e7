"""ResNet in the torchvision v1.5 layout (stride on the 3x3 convolution), as a functional Flax Linen module.

One call returns the logits and the layer4 feature map, the two things PaGKD needs from each backbone (spec 3).
Parameters and BatchNorm statistics are float32; `dtype` sets the compute precision (bfloat16 on GPUs).
Submodule names follow torchvision (`conv1`, `bn1`, `layer1_0`, ..., `fc`) so imported weights map one to one.
"""

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from pagkd_jax.models import conv as conv_lib

# He-normal (fan_out) for convolutions, as torchvision initialises ResNets.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features: int, kernel: int, stride: int, name: str, dtype, conv_impl: str = "xla") -> nn.Conv:
  """Bias-free k x k convolution with torchvision's padding (k // 2). conv_impl (conv.CONV_IMPLS, resolved):
  "dot_wgrad" computes the kernel gradient as matrix products (conv.py), "dot_wgrad_1x1" only for 1x1 kernels,
  "xla" uses lax.conv_general_dilated throughout. Same parameters and values either way."""
  dot_wgrad = conv_impl == "dot_wgrad" or (conv_impl == "dot_wgrad_1x1" and kernel == 1)
  conv_fn = conv_lib.conv_dot_wgrad if dot_wgrad else None
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=[(kernel // 2, kernel // 2)] * 2,
                 use_bias=False, kernel_init=_conv_init, dtype=dtype, name=name, conv_general_dilated=conv_fn)


def _batch_norm(name: str, train: bool, dtype, zero: bool = False) -> nn.BatchNorm:
  """torchvision's BatchNorm (momentum 0.1 = Flax 0.9, eps 1e-5); `zero`: the last BN of a residual branch
  starts at 0, so every block starts as the identity."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name,
                      scale_init=nn.initializers.zeros if zero else nn.initializers.ones)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions (ResNet-18/34)."""

  width: int
  stride: int = 1
  dtype: Any = jnp.float32
  conv_impl: str = "xla"
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(_conv, dtype=self.dtype, conv_impl=self.conv_impl)
    norm = functools.partial(_batch_norm, train=train, dtype=self.dtype)
    y = nn.relu(norm("bn1")(conv(self.width, 3, self.stride, "conv1")(x)))
    y = norm("bn2", zero=True)(conv(self.width, 3, 1, "conv2")(y))
    if x.shape[-1] != self.width or self.stride != 1:
      x = norm("downsample_bn")(conv(self.width, 1, self.stride, "downsample_conv")(x))
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided, v1.5) -> 1x1 with 4x expansion (ResNet-50/101)."""

  width: int
  stride: int = 1
  dtype: Any = jnp.float32
  conv_impl: str = "xla"
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(_conv, dtype=self.dtype, conv_impl=self.conv_impl)
    norm = functools.partial(_batch_norm, train=train, dtype=self.dtype)
    out = self.width * self.expansion
    y = nn.relu(norm("bn1")(conv(self.width, 1, 1, "conv1")(x)))
    y = nn.relu(norm("bn2")(conv(self.width, 3, self.stride, "conv2")(y)))
    y = norm("bn3", zero=True)(conv(out, 1, 1, "conv3")(y))
    if x.shape[-1] != out or self.stride != 1:
      x = norm("downsample_bn")(conv(out, 1, self.stride, "downsample_conv")(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet classifier.

  Attributes:
    stage_sizes: blocks per stage (layer1..layer4).
    block: `BasicBlock` or `Bottleneck`.
    num_classes: size of the linear head.
    base_width: channels of conv1 and of layer1's blocks (64 in torchvision).
    stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool, total stride 32) or "small" (3x3/1 conv, no pool,
      total stride 8: the tiny test preset).
    dtype: compute dtype; parameters and BatchNorm statistics stay float32.
    conv_impl: "xla", "dot_wgrad" or "dot_wgrad_1x1" (kernel gradients as matrix products, conv.py); "auto" is
      resolved by `create_resnet`.
    embed_dim: 0 for the plain classifier (pooled features -> `fc`); > 0 inserts a Linear `embed` of that size
      between them (CRCKD's "feature4": pooled -> embed -> fc), whose output is sown as
      ("intermediates", "embedding") for a caller that applies the model with that collection mutable.
  """

  stage_sizes: Sequence[int]
  block: Any
  num_classes: int
  base_width: int = 64
  stem: str = "imagenet"
  dtype: Any = jnp.float32
  conv_impl: str = "xla"
  embed_dim: int = 0

  @nn.compact
  def __call__(self, images, train: bool = False):
    """images (B, H, W, 3) float -> (logits (B, num_classes) float32, features (B, h, w, F)).

    h = H / 32 (H / 8 for the small stem); F = 8 * base_width * expansion (2048 for ResNet-50).
    """
    x = images.astype(self.dtype)
    conv = functools.partial(_conv, dtype=self.dtype, conv_impl=self.conv_impl)
    if self.stem == "imagenet":
      x = nn.relu(_batch_norm("bn1", train, self.dtype)(conv(self.base_width, 7, 2, "conv1")(x)))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=[(1, 1), (1, 1)])
    elif self.stem == "small":
      x = nn.relu(_batch_norm("bn1", train, self.dtype)(conv(self.base_width, 3, 1, "conv1")(x)))
    else:
      raise ValueError(f"Unknown ResNet stem {self.stem!r}; expected 'imagenet' or 'small'.")
    for stage, num_blocks in enumerate(self.stage_sizes):
      for b in range(num_blocks):
        stride = 2 if stage > 0 and b == 0 else 1
        x = self.block(self.base_width * 2**stage, stride, dtype=self.dtype, conv_impl=self.conv_impl,
                       name=f"layer{stage + 1}_{b}")(x, train)
    features = x
    pooled = jnp.mean(features.astype(jnp.float32), axis=(1, 2))
    if self.embed_dim:
      pooled = nn.Dense(self.embed_dim, dtype=jnp.float32, name="embed")(pooled)
      self.sow("intermediates", "embedding", pooled)  # (B, embed_dim) float32.
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, name="fc")(pooled)
    return logits, features


@dataclasses.dataclass(frozen=True)
class Preset:
  stage_sizes: tuple[int, ...]
  block: Any
  base_width: int = 64
  stem: str = "imagenet"


PRESETS = {
    "resnet18": Preset((2, 2, 2, 2), BasicBlock),
    "resnet34": Preset((3, 4, 6, 3), BasicBlock),
    "resnet50": Preset((3, 4, 6, 3), Bottleneck),
    "resnet101": Preset((3, 4, 23, 3), Bottleneck),
    # For tests and CPU smoke runs: 4 stages of one basic block, 8..64 channels, stride 8.
    "tiny": Preset((1, 1, 1, 1), BasicBlock, base_width=8, stem="small"),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def create_resnet(name: str, num_classes: int, dtype: str = "float32", conv_impl: str = "auto",
                  embed_dim: int = 0) -> ResNet:
  """Builds a preset by name ("resnet18", "resnet34", "resnet50", "resnet101", "tiny"); conv_impl "auto" is
  "dot_wgrad_1x1" on CPU and "xla" elsewhere (conv.resolve_conv_impl); embed_dim > 0: a Linear of that size before
  the head (`ResNet.embed_dim`)."""
  if name not in PRESETS:
    raise ValueError(f"Unknown model {name!r}; known presets: {sorted(PRESETS)}.")
  if dtype not in DTYPES:
    raise ValueError(f"Unknown model dtype {dtype!r}; expected one of {sorted(DTYPES)}.")
  p = PRESETS[name]
  return ResNet(stage_sizes=p.stage_sizes, block=p.block, num_classes=num_classes, base_width=p.base_width,
                stem=p.stem, dtype=DTYPES[dtype], conv_impl=conv_lib.resolve_conv_impl(conv_impl), embed_dim=embed_dim)


HEAD_LAYERS = ("embed", "fc")  # The layers after the pooling: trained anew for each task, never a backbone's.


def class_kernel(params) -> jnp.ndarray:
  """(F, C): the weight of each layer4 channel in each class's logit, the kernel of a class activation map:
  `fc`'s kernel, or embed @ fc when the model has the `embed` Linear (the head is then still linear in the pooled
  features, so the CAM is exact as for a GAP + linear head)."""
  kernel = params["fc"]["kernel"].astype(jnp.float32)
  if "embed" in params:
    kernel = params["embed"]["kernel"].astype(jnp.float32) @ kernel
  return kernel


def feature_stride(name: str) -> int:
  """Input pixels per layer4 position (32 for the torchvision stem, 8 for the tiny preset)."""
  return 32 if PRESETS[name].stem == "imagenet" else 8
