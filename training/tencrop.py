"""Ten-crop augmentation (Krizhevsky et al., 2012): the four corner crops and the centre crop of each
image, and their mirror images. The DCNN trains on one random view per image and may average the
logits of all ten at test time.

All functions take a batch N×H×W or N×C×H×W of any dtype (uint8 before normalisation or float after)
and return the same dtype.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mien.training.hardware import in_layout

NUM_VIEWS = 10
#: The side of the FER2013 face the views are cut from, for a network whose input is the crop (dcnn: 42×42).
FACE_SIZE = 48


def _nchw(images: torch.Tensor) -> torch.Tensor:
    return images.unsqueeze(1) if images.dim() == 3 else images


def _offsets(height: int, width: int, size: int) -> list[tuple[int, int]]:
    """Top-left corners of the five crops: top-left, top-right, bottom-left, bottom-right, centre."""
    if size > height or size > width:
        raise ValueError(f"crop size {size} is larger than the {height}×{width} images")
    bottom, right = height - size, width - size
    return [(0, 0), (0, right), (bottom, 0), (bottom, right), (bottom // 2, right // 2)]


def ten_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """10 × N × C × size × size: the five crops, then the same five mirrored left-right."""
    x = _nchw(images)
    crops = torch.stack([x[..., top : top + size, left : left + size] for top, left in _offsets(*x.shape[-2:], size)])
    return torch.cat([crops, crops.flip(-1)])


def random_ten_crop(images: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """N × C × size × size: one of the ten views per image, picked uniformly (the training augmentation)."""
    views = ten_crop(images, size)
    pick = torch.randint(0, NUM_VIEWS, (views.shape[1],), generator=generator)
    return views[pick, torch.arange(views.shape[1])]


@torch.no_grad()
def ten_crop_logits(model: nn.Module, images: torch.Tensor, size: int, channels_last: bool = False) -> torch.Tensor:
    """N × classes: the model's fp32 logits averaged over the ten views (``images`` already normalised);
    ``channels_last`` feeds a channels-last model its own layout."""
    views = ten_crop(images, size).flatten(0, 1)
    logits = model(in_layout(views, channels_last)).float()
    return logits.view(NUM_VIEWS, len(images), -1).mean(0)
