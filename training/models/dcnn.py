"""DCNN: a plain deep convolutional network trained with ten-crop augmentation (the FER paper that
classifies a 5-class private set and compares against an LSTM over image rows and a semi-supervised
GAN; see ``row_lstm`` and ``sgan``).

Stacks of 3×3 conv → BN → ReLU with 2×2 max-pooling, two fully connected layers with dropout and a
softmax (applied by the loss and by the service). Input: 42×42 crops of the 48×48 faces — training
takes one of the ten crops (four corners + centre, each mirrored; ``training/tencrop.py``) per image,
test time may average the logits of all ten. The service resizes the whole face crop to 42×42, so
the spec's crop margin is reduced to frame a served face like the centre crop of a FER2013 image
(a 48×48 FER2013 face with margin 0.1 → its central 42/48: (1 + 2·0.1)·42/48 = 1 + 2·0.025).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mien.spec import PreprocessSpec
from mien.training.models import register_model

#: The crop side that ten-crop cuts out of a 48×48 face.
CROP_SIZE = 42


class DCNN(nn.Module):
    def __init__(
        self,
        num_classes: int = 7,
        in_channels: int = 1,
        input_size: int = CROP_SIZE,
        widths: tuple[int, ...] = (64, 128, 256),
        convs_per_stage: int = 2,
        hidden: int = 512,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        layers, ch, side = [], in_channels, input_size
        for width in widths:
            for _ in range(convs_per_stage):
                layers += [nn.Conv2d(ch, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                ch = width
            layers.append(nn.MaxPool2d(2))
            side //= 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(ch * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model(
    "dcnn", PreprocessSpec(input_size=(CROP_SIZE, CROP_SIZE), channels=1, mean=(0.5,), std=(0.5,), crop_margin=0.025)
)
def dcnn(num_classes: int = 7, **kwargs) -> DCNN:
    return DCNN(num_classes=num_classes, **kwargs)
