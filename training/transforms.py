"""Augmentation and normalisation on whole batches of tensors.

Faces are small (48×48) and the machines have two cores, so augmenting a batch at once with one
``affine_grid``/``grid_sample`` call is much cheaper than per-image work in loader processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mien.spec import PreprocessSpec
from mien.training.config import AugmentConfig

__all__ = ["AugmentConfig", "build_transforms", "mix_batch", "normalize", "random_affine", "random_erasing"]


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
    """Random flip, rotation, shift and zoom of a float N×C×H×W batch (borders replicate edge pixels).

    With ``cfg.crop`` the output is crop×crop at the input's scale: a random window of the face.
    """
    n = x.shape[0]
    side = cfg.crop or x.shape[-1]
    window = side / x.shape[-1]  # the output's share of the input, in grid units

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (high - low) + low

    angle = uniform(-cfg.rotation_deg, cfg.rotation_deg) * math.pi / 180
    scale = uniform(1 - cfg.zoom, 1 + cfg.zoom)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(n)
    tx, ty = uniform(-cfg.shift, cfg.shift) * 2, uniform(-cfg.shift, cfg.shift) * 2  # grid units span 2
    cos, sin = torch.cos(angle) * window / scale, torch.sin(angle) * window / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, [n, x.shape[1], side, side], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_erasing(
    x: torch.Tensor,
    prob: float,
    generator: torch.Generator | None = None,
    area: tuple[float, float] = (0.02, 0.25),
    aspect: tuple[float, float] = (0.3, 3.3),
) -> torch.Tensor:
    """Random erasing of a normalised N×C×H×W batch: with probability ``prob`` a face gets one rectangle
    of ``area`` share and ``aspect`` ratio (log-uniform) filled with unit Gaussian noise."""
    n, _, height, width = x.shape

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (high - low) + low

    share = uniform(*area) * height * width
    ratio = torch.exp(uniform(math.log(aspect[0]), math.log(aspect[1])))
    h = (share * ratio).sqrt().round().clamp(1, height).long()
    w = (share / ratio).sqrt().round().clamp(1, width).long()
    top = (torch.rand(n, generator=generator) * (height - h + 1)).long()
    left = (torch.rand(n, generator=generator) * (width - w + 1)).long()
    rows = torch.arange(height)[None, :] - top[:, None]
    cols = torch.arange(width)[None, :] - left[:, None]
    mask = ((rows >= 0) & (rows < h[:, None]))[:, :, None] & ((cols >= 0) & (cols < w[:, None]))[:, None, :]
    mask &= (torch.rand(n, generator=generator) < prob)[:, None, None]
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return torch.where(mask[:, None], noise, x)


def mix_batch(
    x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup or CutMix of a batch with a shuffled copy of itself: (mixed batch, partner order, λ).

    The loss is λ·L(y) + (1-λ)·L(y[order]). With both α set, a fair coin picks one per batch; with
    neither, the batch comes back unchanged with λ = 1.
    """
    kinds = [(kind, alpha) for kind, alpha in (("mixup", cfg.mixup), ("cutmix", cfg.cutmix)) if alpha > 0]
    order = torch.randperm(len(x), generator=generator)
    if not kinds:
        return x, order, 1.0
    kind, alpha = kinds[int(torch.randint(len(kinds), (1,), generator=generator))]
    # λ ~ Beta(α, α) from numpy, seeded by the run's generator so a resumed run draws the same λ
    lam = float(np.random.default_rng(int(torch.randint(2**31, (1,), generator=generator))).beta(alpha, alpha))
    if kind == "mixup":
        return lam * x + (1 - lam) * x[order], order, lam
    height, width = x.shape[-2:]
    cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
    cy, cx = (int(torch.randint(size, (1,), generator=generator)) for size in (height, width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    mixed = x.clone()
    mixed[..., top:bottom, left:right] = x[order][..., top:bottom, left:right]
    lam = 1 - (bottom - top) * (right - left) / (height * width)  # the share actually kept
    return mixed, order, lam


def build_transforms(
    spec: PreprocessSpec, train: bool, augment: AugmentConfig | None = None, generator: torch.Generator | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The one place that turns a uint8 batch into model input, with augmentation when ``train``."""
    augment = augment or AugmentConfig()

    def transform(images: torch.Tensor) -> torch.Tensor:
        x = normalize(images, spec)
        if not train:
            return x
        x = random_affine(x, augment, generator)
        return random_erasing(x, augment.erasing, generator) if augment.erasing > 0 else x

    return transform
