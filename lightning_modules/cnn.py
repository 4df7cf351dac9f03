"""Small CNNs for the test-adequacy experiments (DeepImportance's models), registered as backbones so that
``ImageClassifier(backbone="lenet5" | "small_cnn", ...)`` trains them like the ViT.

Both are plain ``nn.Module`` s written so that Captum's ``LayerLRP`` can run on them: every ReLU is its own
module (no reuse, not in-place), the flatten is done in ``forward`` (Captum's LRP has no rule for ``nn.Flatten``),
and only Conv2d / Linear / ReLU / MaxPool2d / AdaptiveAvgPool2d modules are used.

- ``lenet5``: conv(5x5, 6) - ReLU - maxpool 2 - conv(5x5, 16) - ReLU - maxpool 2 - fc 120 - ReLU - fc 84 - ReLU -
  fc classes. Convolutions are padded ("same") so any ``image_size`` divisible by 4 works (8 for digits: 8 -> 4 -> 2;
  32 for CIFAR: 32 -> 16 -> 8).
- ``small_cnn``: [conv 3x3 32 - ReLU] x2 - maxpool 2 - [conv 3x3 64 - ReLU] x2 - maxpool 2 - global average pool -
  fc 128 - ReLU - fc classes (any input size >= 4).

Neuron layers (``vitfl.adequacy.activations.candidate_layers``) are the ReLU modules: a conv neuron is a channel of a
ReLU output (its spatial mean), a dense neuron a unit of a ReLU output.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from vitfl.lightning_modules.backbones import register_backbone

__all__ = ["LeNet5", "SmallCNN", "lenet5", "small_cnn"]


class LeNet5(nn.Module):
    """LeNet-5 for ``[B, in_channels, image_size, image_size]`` inputs -> logits ``[B, num_classes]``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8):
        super().__init__()
        if image_size % 4 or image_size < 4:
            raise ValueError(f"LeNet5 needs image_size divisible by 4 (two 2x2 poolings), got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Linear(16 * side * side, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class SmallCNN(nn.Module):
    """A small VGG-style CNN for ``[B, in_channels, H, W]`` inputs -> logits ``[B, num_classes]``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Sequential(nn.Linear(2 * w, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_backbone("lenet5")
def lenet5(num_classes: int, in_channels: int = 1, image_size: int = 8, **kw) -> nn.Module:
    if kw:
        raise TypeError(f"lenet5 got unexpected arguments {sorted(kw)}")
    return LeNet5(num_classes=num_classes, in_channels=in_channels, image_size=image_size)


@register_backbone("small_cnn")
def small_cnn(num_classes: int, in_channels: int = 3, image_size: int | None = None, width: int = 32,
              **kw) -> nn.Module:
    """``image_size`` is accepted for config symmetry (global pooling makes the net size-agnostic)."""
    if kw:
        raise TypeError(f"small_cnn got unexpected arguments {sorted(kw)}")
    if image_size is not None and image_size < 4:
        raise ValueError(f"small_cnn needs image_size >= 4 (two 2x2 poolings), got {image_size}")
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, width=width)
