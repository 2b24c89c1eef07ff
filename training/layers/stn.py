"""Spatial transformer (Jaderberg, Simonyan, Zisserman, Kavukcuoglu: "Spatial Transformer Networks", 2015).

A small localisation network regresses a 2×3 affine matrix from the image; the grid generator
(``F.affine_grid``) and the bilinear sampler (``F.grid_sample``) are ordinary ops, so the warp is part
of the exported ONNX graph (the legacy exporter supports ``affine_grid`` from opset 20).

The transformer starts at the identity warp and training keeps it near there with
:func:`identity_penalty` (weight ``stn_reg``, added by the objective through :func:`recorded_thetas`);
:func:`affine_stats` says what the learnt warps do (mean scale, rotation, shift and their spread).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
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


#: The identity warp, as ``affine_grid`` reads it.
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def identity_penalty(theta: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ‖θ − I‖² (squared Frobenius norm of the 2×3 difference): 0 at the identity warp.

    Added to the training loss (weight ``stn_reg``) so the transformer can straighten and re-centre a face
    but pays for every zoom, rotation, shear and shift, and cannot shrink the face to a point or blow up a
    corner of it (a collapse that lowers the loss early in training and never recovers). Its gradient,
    2(θ − I)/N per matrix, points back at the identity.
    """
    identity = theta.new_tensor(IDENTITY).view(1, 2, 3)
    return (theta.float() - identity).pow(2).sum((1, 2)).mean()


@contextmanager
def recorded_thetas(model: nn.Module, enabled: bool = True) -> Iterator[list[torch.Tensor]]:
    """Within the block, every θ that any :class:`SpatialTransformer` of ``model`` predicts is appended to the
    yielded list (with its autograd graph when gradients are on), in call order.

    The hooks exist only inside the block, so a copy of the model (the weight EMA, an export) never
    carries them. Works through wrappers (DistributedDataParallel, CenterCrop): it walks ``model.modules()``.
    ``enabled=False`` records nothing and adds no hook.
    """
    thetas: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        thetas.append(output.view(-1, 2, 3))

    stns = [m for m in model.modules() if isinstance(m, SpatialTransformer)] if enabled else []
    handles = [m.fc.register_forward_hook(keep) for m in stns]
    try:
        yield thetas
    finally:
        for handle in handles:
            handle.remove()


def has_spatial_transformer(model: nn.Module) -> bool:
    return any(isinstance(m, SpatialTransformer) for m in model.modules())


def affine_stats(theta) -> dict[str, float]:
    """What a batch of affine warps does, in words a reader can check against the warped faces.

    ``theta``: N × 2 × 3 (torch or numpy), in ``affine_grid``'s convention: it maps each output pixel's
    normalised coordinates ([-1, 1]) to where it samples the input. So for the 2×2 part A and offset t:

    * ``scale``: sqrt|det A|, the linear zoom of the sampled region; < 1 samples a smaller region, i.e. the
      face is magnified (zoomed in), > 1 shows more than the image (zoomed out, with grey borders).
    * ``rotation_deg``: the angle of the rotation closest to A (atan2(a21 − a12, a11 + a22)), in degrees;
      the face appears turned by minus this angle.
    * ``translation``: ‖t‖, the shift of the sampling centre in half-image units (1 = half the image).
    * ``det_negative``: share of warps that mirror the face (det A < 0).

    Each as the mean over the batch, with ``*_std`` its standard deviation across faces (the spread: how
    much the warp adapts to each face rather than applying one fixed crop).
    """
    if isinstance(theta, torch.Tensor):
        theta = theta.detach().float().cpu().numpy()
    theta = np.asarray(theta, dtype=np.float64).reshape(-1, 2, 3)
    a, t = theta[:, :, :2], theta[:, :, 2]
    det = a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]
    scale = np.sqrt(np.abs(det))
    rotation = np.degrees(np.arctan2(a[:, 1, 0] - a[:, 0, 1], a[:, 0, 0] + a[:, 1, 1]))
    translation = np.linalg.norm(t, axis=1)
    stats = {"faces": int(len(theta))}
    for name, values in (("scale", scale), ("rotation_deg", rotation), ("translation", translation)):
        stats[name] = float(values.mean())
        stats[f"{name}_std"] = float(values.std())
    stats["det_negative"] = float((det < 0).mean())
    return stats
