"""ResNet-18 (He et al., "Deep Residual Learning for Image Recognition", 2016) adapted to 48×48 faces.

ImageNet's 7×7/2 stem and max-pool would shrink a 48-pixel face to 12×12 before the first block; here
the stem is one 3×3 convolution at full resolution and the four stages of two basic blocks
(64-128-256-512 channels) halve the resolution from the second stage on, as in the CIFAR variants that
reach ~73% on FER2013 (Pecoraro et al. 2022; Khanzada et al. 2020). Global average pooling, dropout and
the classifier follow, so it trains on random 40×40 crops and serves the whole 48×48 face. 11.2 M
parameters at ``width=64``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mien.spec import PreprocessSpec
from mien.training.layers import BasicBlock
from mien.training.models import register_model


class ResNet18Fer(nn.Module):
    def __init__(self, num_classes: int = 7, in_channels: int = 1, width: int = 64, dropout: float = 0.3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        blocks, ch = [], width
        for i, w in enumerate(width * 2**k for k in range(4)):
            blocks += [BasicBlock(ch, w, stride=1 if i == 0 else 2), BasicBlock(w, w, stride=1)]
            ch = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(ch, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits (N × num_classes); the service applies softmax."""
        return self.classifier(self.pool(self.blocks(self.stem(x))).flatten(1))


@register_model("resnet18_fer", PreprocessSpec(input_size=(48, 48), channels=1, mean=(0.5,), std=(0.5,)))
def resnet18_fer(num_classes: int = 7, **kwargs) -> ResNet18Fer:
    return ResNet18Fer(num_classes=num_classes, **kwargs)
