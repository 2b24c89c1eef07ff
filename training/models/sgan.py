"""Semi-supervised GAN: the adversarial baseline of the DCNN paper (Odena, "Semi-Supervised Learning with
Generative Adversarial Networks", 2016; Salimans et al., "Improved Techniques for Training GANs", 2016).

The discriminator has K+1 outputs: the K expression classes and one "fake" class. It learns from
labelled faces (cross-entropy on the K real classes), from unlabelled faces (they are not fake) and
from generated ones (they are fake); the generator is a DCGAN-style noise → 48×48 upsampler. What is
exported and served is the discriminator's classifier: ``forward`` returns the K real-class logits,
whose softmax is p(class | real). The generator is built separately by :func:`sgan_generator` so the
served model carries no generator weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from mien.spec import PreprocessSpec
from mien.training.models import register_model

NORMS = ("batch", "none")


def _down(in_ch: int, out_ch: int, stride: int, norm: str) -> list[nn.Module]:
    if norm == "batch":
        return [nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out_ch),
                nn.LeakyReLU(0.2, inplace=True)]  # fmt: skip
    return [nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1), nn.LeakyReLU(0.2, inplace=True)]


class SGANDiscriminator(nn.Module):
    """Conv/BN/LeakyReLU stacks with dropout, global average pooling, then K+1 logits.

    Batch norm as in the DCGAN discriminator Odena's SGAN builds on: real and generated faces go
    through it in separate batches, so each is normalised by its own statistics, and only real batches
    update the running statistics the served model uses (see :func:`real_stats_only`). ``norm="none"``
    is the earlier plain Conv/LeakyReLU stack; on FER2013 it does not learn at all (it stays at the
    majority class, ~25% PublicTest, even trained with cross-entropy alone), which is why batch norm
    is the default.
    """

    def __init__(
        self,
        num_classes: int = 7,
        in_channels: int = 1,
        widths: tuple[int, ...] = (64, 128, 256),
        dropout: float = 0.3,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, not {norm!r}")
        layers, ch = [], in_channels
        for width in widths:  # each stage halves the resolution: 48 → 24 → 12 → 6
            layers += [*_down(ch, width, 1, norm), *_down(width, width, 2, norm), nn.Dropout(dropout)]
            ch = width
        self.body = nn.Sequential(*layers)
        self.num_classes = num_classes
        self.head = nn.Linear(ch, num_classes + 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (the feature-matching loss of Salimans et al. compares their batch means)."""
        return self.body(x).mean(dim=(2, 3))

    def discriminate(self, x: torch.Tensor) -> torch.Tensor:
        """All K+1 logits; the last one is "fake"."""
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.discriminate(x)[:, : self.num_classes]


@contextmanager
def real_stats_only(model: nn.Module) -> Iterator[None]:
    """Batches run inside this block normalise by their own statistics but leave every batch norm's
    running statistics as they were (momentum 0), so generated faces never shift what the served
    classifier normalises real faces with."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum


class SGANGenerator(nn.Module):
    """noise → FC → 6×6 maps → three ×2 transposed convs with BN/ReLU → 48×48 tanh image.

    tanh's [-1, 1] is the range of a face normalised by the spec (mean 0.5, std 0.5).
    """

    def __init__(self, noise_dim: int = 100, out_channels: int = 1, widths: tuple[int, ...] = (256, 128, 64)) -> None:
        super().__init__()
        self.noise_dim = noise_dim
        self.project = nn.Sequential(
            nn.Linear(noise_dim, widths[0] * 36, bias=False), nn.BatchNorm1d(widths[0] * 36), nn.ReLU(inplace=True)
        )
        self.widths = widths
        layers, ch = [], widths[0]
        for width in widths[1:]:
            layers += [
                nn.ConvTranspose2d(ch, width, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            ch = width
        layers += [nn.ConvTranspose2d(ch, out_channels, 4, stride=2, padding=1), nn.Tanh()]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z).view(-1, self.widths[0], 6, 6))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` generated faces from standard-normal noise."""
        device = next(self.parameters()).device
        return self(torch.randn(n, self.noise_dim, generator=generator).to(device))


def sgan_generator(noise_dim: int = 100, out_channels: int = 1, **kwargs) -> SGANGenerator:
    """The generator for the SGAN training loop (not registered: it is never exported or served)."""
    return SGANGenerator(noise_dim=noise_dim, out_channels=out_channels, **kwargs)


@register_model("sgan", PreprocessSpec(input_size=(48, 48), channels=1, mean=(0.5,), std=(0.5,)))
def sgan(num_classes: int = 7, **kwargs) -> SGANDiscriminator:
    return SGANDiscriminator(num_classes=num_classes, **kwargs)
