"""Spatial transformer (Jaderberg, Simonyan, Zisserman, Kavukcuoglu: "Spatial Transformer Networks", 2015).

A small localisation network regresses a 2×3 affine matrix from the image; the grid generator
(``F.affine_grid``) and the bilinear sampler (``F.grid_sample``) are ordinary ops, so the warp is part
of the exported ONNX graph (the legacy exporter supports ``affine_grid`` from opset 20).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SpatialTransformer(nn.Module):
    """Localisation net (two conv → max-pool → ReLU stages, one FC to 6 numbers) + grid + bilinear sampler.

    The FC starts at zero weight and identity bias, so an untrained transformer passes its input
    through unchanged and training starts from the plain classifier.
    """

    def __init__(
        self, in_channels: int = 1, input_size: tuple[int, int] = (48, 48), widths: tuple[int, int] = (8, 10)
    ) -> None:
        super().__init__()
        self.localization = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 7),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
            nn.Conv2d(widths[0], widths[1], 5),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
        )
        with torch.no_grad():  # the FC's input size follows from the image size
            features = self.localization(torch.zeros(1, in_channels, *input_size)).numel()
        self.fc = nn.Linear(features, 6)
        nn.init.zeros_(self.fc.weight)
        with torch.no_grad():
            self.fc.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))

    def theta(self, x: torch.Tensor) -> torch.Tensor:
        """The N × 2 × 3 affine matrices, in ``affine_grid``'s normalised [-1, 1] coordinates."""
        return self.fc(self.localization(x).flatten(1)).view(-1, 2, 3)

    def warp(self, x: torch.Tensor) -> torch.Tensor:
        """The warped image, same size as ``x`` (what the "before/after the STN" figure shows).

        Samples outside the image read 0, which is mid-grey after the usual (x/255 - 0.5)/0.5 scaling.
        """
        grid = F.affine_grid(self.theta(x), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.warp(x)
