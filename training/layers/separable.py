"""Depthwise-separable convolution (Chollet, Xception, 2017)."""

from __future__ import annotations

import torch.nn as nn


class SeparableConv2d(nn.Module):
    """A per-channel k×k convolution followed by a 1×1 pointwise convolution (no bias: BN follows)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 1) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(
            in_channels, in_channels, kernel_size, padding=padding, groups=in_channels, bias=False
        )
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))
