"""The served form of a network trained on random crops: it sees the centre window of the face.

A network trained on random 40×40 windows of 48×48 faces (``--crop 40``) and shown the whole face at test
time meets a larger face than it learnt, and a final feature map of 3×3 instead of 2×2: on the vgg_fer
pilot this cost 2.8 points of validation accuracy (55.3% on the whole face, 58.1% on its centre window)
and raised the validation loss from 1.11 to 1.50. So validation, export, evaluation and teachers all run
the checkpoint through :class:`CenterCrop`, the ImageNet protocol (train on random crops, test on the
centre crop); ``mien export --ten-crop`` averages the ten windows instead.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class CenterCrop(nn.Module):
    """``model`` applied to the centre ``size``×``size`` window of its input (inputs no larger pass as they are)."""

    def __init__(self, model: nn.Module, size: int) -> None:
        super().__init__()
        self.model, self.size = model, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = int(x.shape[-2]), int(x.shape[-1])
        if height <= self.size and width <= self.size:
            return self.model(x)
        top, left = max(0, (height - self.size) // 2), max(0, (width - self.size) // 2)
        return self.model(x[..., top : top + self.size, left : left + self.size])


def as_served(model: nn.Module, train_config: dict) -> nn.Module:
    """``model`` as it is validated and served: wrapped in :class:`CenterCrop` when it trained on crops."""
    crop = (train_config.get("augment") or {}).get("crop", 0)
    return CenterCrop(model, crop) if crop else model
