"""SE + separable-convolution network (the FER paper that combines squeeze-and-excitation attention,
depthwise-separable convolutions, short (residual) connections, dropout and batch normalisation and
reports 65.2% on FER2013). SE: Hu et al., 2018; separable convolutions: Chollet, Xception, 2017.

A two-conv stem, then four residual blocks (sep-conv → BN → ReLU → sep-conv → BN → SE → max-pool/2,
plus a shortcut), global average pooling, dropout and an FC. The shortcut is a 2×2 average pool then
a 1×1 conv rather than a 1×1 stride-2 conv: same cost, it also sees every pixel, and it keeps clear
of torch 2.13's channels_last backward segfault for 1×1 stride-2 convs on maps ≥ 64×64.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mien.spec import PreprocessSpec
from mien.training.layers import SeparableConv2d, SqueezeExcite
from mien.training.models import register_model


def _conv_bn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)
    )


class SESepBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, reduction: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            SeparableConv2d(in_ch, out_ch),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            SeparableConv2d(out_ch, out_ch),
            nn.BatchNorm2d(out_ch),
            SqueezeExcite(out_ch, reduction),
            nn.MaxPool2d(2),
        )
        self.shortcut = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class SESepConvNet(nn.Module):
    def __init__(
        self,
        num_classes: int = 7,
        in_channels: int = 1,
        stem_width: int = 32,
        widths: tuple[int, ...] = (64, 128, 256, 512),
        reduction: int = 16,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn_relu(in_channels, stem_width), _conv_bn_relu(stem_width, stem_width))
        blocks, ch = [], stem_width
        for width in widths:  # 48 → 24 → 12 → 6 → 3
            blocks.append(SESepBlock(ch, width, reduction))
            ch = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(ch, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


@register_model("se_sepconv", PreprocessSpec(input_size=(48, 48), channels=1, mean=(0.5,), std=(0.5,)))
def se_sepconv(num_classes: int = 7, **kwargs) -> SESepConvNet:
    return SESepConvNet(num_classes=num_classes, **kwargs)
