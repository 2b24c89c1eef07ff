"""mini-Xception (Arriaga, Valdenegro-Toro, Plöger: "Real-time Convolutional Neural Networks for
Emotion and Gender Classification", 2017).

Two 3×3 convolutions of 8 channels, then four residual modules of depthwise-separable convolutions
(16, 32, 64, 128 channels) each halving the resolution, a final convolution to one map per class and
global average pooling. No fully connected layer: about 60k parameters.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mien.spec import PreprocessSpec
from mien.training.layers import SeparableConv2d
from mien.training.models import register_model


def _conv_bn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class XceptionModule(nn.Module):
    """sep-conv → BN → ReLU → sep-conv → BN → max-pool/2, plus a strided 1×1 conv shortcut."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=2, bias=False), nn.BatchNorm2d(out_ch))
        self.body = nn.Sequential(
            SeparableConv2d(in_ch, out_ch),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            SeparableConv2d(out_ch, out_ch),
            nn.BatchNorm2d(out_ch),
            nn.MaxPool2d(3, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class MiniXception(nn.Module):
    def __init__(self, num_classes: int = 7, in_channels: int = 1, widths: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        self.stem = nn.Sequential(_conv_bn_relu(in_channels, 8), _conv_bn_relu(8, 8))
        blocks, ch = [], 8
        for width in widths:
            blocks.append(XceptionModule(ch, width))
            ch = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(ch, num_classes, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits (N × num_classes); the service applies softmax."""
        x = self.head(self.blocks(self.stem(x)))
        return self.pool(x).flatten(1)


@register_model("mini_xception", PreprocessSpec(input_size=(48, 48), channels=1, mean=(0.5,), std=(0.5,)))
def mini_xception(num_classes: int = 7, **kwargs) -> MiniXception:
    return MiniXception(num_classes=num_classes, **kwargs)
