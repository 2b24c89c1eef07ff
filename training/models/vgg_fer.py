"""A VGG-style network for 48×48 faces: the family behind the published 72–73% single-network FER2013
results (Khaireddin & Chen, "Facial Emotion Recognition: State of the Art Performance on FER2013", 2021;
Pramerdorfer & Kampel, 2016).

Four stages of two 3×3 convolutions (batch norm, ReLU) and a 2×2 max-pool, widths w-2w-4w-8w, then
global average pooling, a hidden fully connected layer with dropout and the classifier. The pooling
makes the network indifferent to the input size, so it trains on random 40×40 crops of the face (30%
cheaper per epoch) and is served on the whole 48×48 face at the same scale. ``width=64`` gives
4.8 M parameters, ``width=32`` 1.2 M.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mien.spec import PreprocessSpec
from mien.training.models import register_model


def _stage(in_ch: int, out_ch: int, convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [
            nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers, nn.MaxPool2d(2))


class VGGFer(nn.Module):
    def __init__(
        self,
        num_classes: int = 7,
        in_channels: int = 1,
        width: int = 64,
        convs_per_stage: int = 2,
        hidden: int = 256,
        dropout: float = 0.4,
    ) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(4)]
        stages, ch = [], in_channels
        for w in widths:
            stages.append(_stage(ch, w, convs_per_stage))
            ch = w
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(ch, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits (N × num_classes); the service applies softmax."""
        return self.head(self.pool(self.features(x)).flatten(1))


@register_model("vgg_fer", PreprocessSpec(input_size=(48, 48), channels=1, mean=(0.5,), std=(0.5,)))
def vgg_fer(num_classes: int = 7, **kwargs) -> VGGFer:
    return VGGFer(num_classes=num_classes, **kwargs)
