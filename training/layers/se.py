"""Squeeze-and-excitation (Hu, Shen, Sun: "Squeeze-and-Excitation Networks", CVPR 2018)."""

from __future__ import annotations

import torch
import torch.nn as nn


class SqueezeExcite(nn.Module):
    """Reweight channels by a gate computed from their global means (channels → channels/r → channels)."""

    def __init__(self, channels: int, reduction: int = 16, min_hidden: int = 4) -> None:
        super().__init__()
        hidden = max(min_hidden, channels // reduction)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = x.mean(dim=(2, 3), keepdim=True)
        gate = torch.sigmoid(self.expand(torch.relu(self.reduce(gate))))
        return x * gate
