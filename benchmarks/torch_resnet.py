"""A PyTorch ResNet in torchvision's layout and parameter names (v1.5: the stride on the 3x3 convolution), with the
project's presets: the reference of the PyTorch parity tests and of the side-by-side benchmark (vs_pytorch.py).

Importing this module imports PyTorch; the package itself never imports it.
"""

import torch
from torch import nn


class TorchBasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, width, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, width, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.downsample = None
    if stride != 1 or inplanes != width:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, width, 1, stride, bias=False), nn.BatchNorm2d(width))

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchBottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, width, stride):
    super().__init__()
    out = width * 4
    self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)  # v1.5: the stride on the 3x3.
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, out, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out)
    self.downsample = None
    if stride != 1 or inplanes != out:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = torch.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
  """torchvision's ResNet structure and parameter names; forward returns (logits, layer4 map NCHW).

  stem "imagenet": 7x7/2 convolution + 3x3/2 max-pool; "small": 3x3/1 convolution, no pool (the tiny preset)."""

  def __init__(self, block, layers, num_classes=1000, base_width=64, stem="imagenet"):
    super().__init__()
    if stem == "imagenet":
      self.conv1 = nn.Conv2d(3, base_width, 7, 2, 3, bias=False)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
    elif stem == "small":
      self.conv1 = nn.Conv2d(3, base_width, 3, 1, 1, bias=False)
      self.maxpool = nn.Identity()
    else:
      raise ValueError(f"Unknown ResNet stem {stem!r}; expected 'imagenet' or 'small'.")
    self.bn1 = nn.BatchNorm2d(base_width)
    inplanes = base_width
    for i, n in enumerate(layers):
      blocks = []
      for b in range(n):
        blocks.append(block(inplanes, base_width * 2**i, 2 if i > 0 and b == 0 else 1))
        inplanes = base_width * 2**i * block.expansion
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.fc = nn.Linear(inplanes, num_classes)

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(x.mean(dim=(2, 3))), x


# The project's presets (pagkd_jax/models/resnet.py PRESETS): block, blocks per stage, base width, stem.
TORCH_ARCHS = {"resnet18": (TorchBasicBlock, (2, 2, 2, 2), 64, "imagenet"),
               "resnet50": (TorchBottleneck, (3, 4, 6, 3), 64, "imagenet"),
               "tiny": (TorchBasicBlock, (1, 1, 1, 1), 8, "small")}


def create_torch_resnet(name: str, num_classes: int = 1000) -> TorchResNet:
  if name not in TORCH_ARCHS:
    raise ValueError(f"Unknown model {name!r}; PyTorch presets: {sorted(TORCH_ARCHS)}.")
  block, layers, base_width, stem = TORCH_ARCHS[name]
  return TorchResNet(block, layers, num_classes, base_width, stem)


def random_torch_resnet(name: str, seed: int, num_classes: int = 1000) -> TorchResNet:
  """Random weights and random BatchNorm statistics (so a swapped mean/var or scale/bias would show), eval mode."""
  torch.manual_seed(seed)
  model = create_torch_resnet(name, num_classes)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.3, 0.3)
        module.running_mean.normal_(0.0, 0.2)
        module.running_var.uniform_(0.5, 2.0)
        module.num_batches_tracked.fill_(7)
    model.fc.bias.normal_(0.0, 0.5)
  return model.eval()
