"""Augmentation and normalisation on whole batches of tensors.

Faces are small (48×48) and the machines have two cores, so augmenting a batch at once with one
``affine_grid``/``grid_sample`` call is much cheaper than per-image work in loader processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mien.spec import PreprocessSpec


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool = True  # horizontal mirror with probability 1/2
    rotation_deg: float = 10.0  # uniform in ±rotation_deg
    shift: float = 0.1  # translation, fraction of the image size
    zoom: float = 0.1  # scale uniform in 1 ± zoom


def normalize(images: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 N×H×W (or N×C×H×W) → float N×C×H×W as the spec says."""
    x = images.float()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.shape[1] != spec.channels:
        x = x.expand(-1, spec.channels, -1, -1)
    if tuple(x.shape[-2:]) != spec.input_size:
        x = F.interpolate(x, size=spec.input_size, mode="bilinear", align_corners=False)
    mean = torch.tensor(spec.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x * spec.scale - mean) / std


def random_affine(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random flip, rotation, shift and zoom of a float N×C×H×W batch (borders replicate edge pixels)."""
    n = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (high - low) + low

    angle = uniform(-cfg.rotation_deg, cfg.rotation_deg) * math.pi / 180
    scale = uniform(1 - cfg.zoom, 1 + cfg.zoom)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(n)
    tx, ty = uniform(-cfg.shift, cfg.shift) * 2, uniform(-cfg.shift, cfg.shift) * 2  # grid units span 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def build_transforms(
    spec: PreprocessSpec, train: bool, augment: AugmentConfig | None = None, generator: torch.Generator | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The one place that turns a uint8 batch into model input, with augmentation when ``train``."""
    augment = augment or AugmentConfig()

    def transform(images: torch.Tensor) -> torch.Tensor:
        x = normalize(images, spec)
        return random_affine(x, augment, generator) if train else x

    return transform
