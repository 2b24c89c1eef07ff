"""EDSR-style ×2 super-resolution (Lim, Son, Kim, Nah, Lee: "Enhanced Deep Residual Networks for Single
Image Super-Resolution", CVPR workshops 2017).

Intended training: pre-train on FER2013 Training faces downscaled ×2 (input 24×24 → target 48×48)
with an L1 loss, as EDSR does (L1 gives sharper results than L2), then freeze or fine-tune it in front
of a classifier (``training/sr_pretrain.py``). Used untrained it is just a learned upsampler trained
by the classification loss.
"""

from __future__ import annotations

import torch
import torch.nn as nn

#: The configuration of the FER paper's SR front end (B residual blocks of F features).
EDSR_PAPER = dict(num_blocks=16, features=128)
#: A default small enough to train jointly on two CPU cores (EDSR(8, 64) costs ~2,300 s/epoch there).
EDSR_SMALL = dict(num_blocks=4, features=32)


class ResBlock(nn.Module):
    """conv → ReLU → conv, scaled and added to the input; no batch norm (EDSR: BN hurts SR and costs memory)."""

    def __init__(self, features: int, res_scale: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(features, features, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(features, features, 3, padding=1),
        )
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res_scale * self.body(x)


class EDSR(nn.Module):
    """head conv → B residual blocks → body conv (+ global skip) → conv + pixel shuffle ×2 → tail conv.

    Output: ``in_channels`` × 2H × 2W. ``res_scale`` (0.1) keeps deep stacks of BN-free blocks stable.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_blocks: int = EDSR_SMALL["num_blocks"],
        features: int = EDSR_SMALL["features"],
        res_scale: float = 0.1,
        scale: int = 2,
    ) -> None:
        super().__init__()
        self.scale = scale
        #: The exact configuration, so a checkpoint can rebuild this network (``sr_kwargs``).
        self.kwargs = dict(num_blocks=num_blocks, features=features, res_scale=res_scale, scale=scale)
        self.head = nn.Conv2d(in_channels, features, 3, padding=1)
        self.body = nn.Sequential(
            *[ResBlock(features, res_scale) for _ in range(num_blocks)], nn.Conv2d(features, features, 3, padding=1)
        )
        self.upsample = nn.Sequential(nn.Conv2d(features, features * scale**2, 3, padding=1), nn.PixelShuffle(scale))
        self.tail = nn.Conv2d(features, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(x)
        x = x + self.body(x)
        return self.tail(self.upsample(x))
