"""Random occlusion: a grey square over a given fraction of each face at a random place. Training uses
it as augmentation (the STN + ResNet-10 triplet paper); evaluation uses it for the robustness figure
(a patch covering 25% of the face)."""

from __future__ import annotations

import math

import torch


def random_occlusion(
    images: torch.Tensor, area_fraction: float = 0.25, value: float = 128.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A copy of ``images`` (N×H×W or N×C×H×W) with one square patch per image set to ``value``.

    The patch side is round(sqrt(area_fraction·H·W)) (capped at the image), so it covers
    ``area_fraction`` of the image up to rounding, and it lies wholly inside the image, at a uniformly
    random position. ``value`` is in the images' own scale: 128 is mid-grey for uint8 faces, 0.0 is
    mid-grey after the usual (x/255 - 0.5)/0.5 normalisation.
    """
    if not 0.0 <= area_fraction <= 1.0:
        raise ValueError(f"area_fraction must be in [0, 1], got {area_fraction}")
    height, width = images.shape[-2:]
    side = min(round(math.sqrt(area_fraction * height * width)), height, width)
    n = images.shape[0]
    top = torch.randint(0, height - side + 1, (n,), generator=generator)
    left = torch.randint(0, width - side + 1, (n,), generator=generator)
    rows = torch.arange(height)[None, :] - top[:, None]  # N × H
    cols = torch.arange(width)[None, :] - left[:, None]  # N × W
    mask = ((rows >= 0) & (rows < side))[:, :, None] & ((cols >= 0) & (cols < side))[:, None, :]  # N × H × W
    if images.dim() == 4:
        mask = mask[:, None]
    return images.masked_fill(mask.to(images.device), value)
