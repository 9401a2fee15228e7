"""Backbones: ResNet (torchvision v1.5 layout) returning logits and the layer4 map, and class activation maps."""
