"""The STN / SR ablation: one plain CNN with and without a spatial transformer and a super-resolution
front end (the FER paper that reports Base 66.5 / +STN 71.4 / +SR 72.7 / +STN+SR 73.4 on FER2013).

Front ends: a spatial transformer (Jaderberg et al., 2015) and an EDSR-style ×2 super-resolution
network (Lim et al., 2017). All four models share :class:`BaseCNN` and the state-dict layout
(``stn.*``, ``sr.*``, ``classifier.*``), so the ablation compares the same classifier and its weights
can move between variants. The SR variants feed the classifier 96×96 images; its last maps are then
6×6 instead of 3×3, and a 2×2 average pool (fixed at construction: ONNX's adaptive pooling needs
static shapes, which the STN's grid sampler hides) brings them to the same 3×3 × 256 FC input.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mien.spec import PreprocessSpec
from mien.training.layers import EDSR, EDSR_SMALL, SpatialTransformer
from mien.training.models import register_model

SPEC = PreprocessSpec(input_size=(48, 48), channels=1, mean=(0.5,), std=(0.5,))


def _conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


class BaseCNN(nn.Module):
    """Four stages of two conv-BN-ReLU and a 2×2 max-pool, average pooling to 3×3, FC-dropout-FC."""

    def __init__(
        self,
        num_classes: int = 7,
        in_channels: int = 1,
        input_size: int = 48,
        widths: tuple[int, ...] = (32, 64, 128, 256),
        hidden: int = 256,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        side = input_size // 2 ** len(widths)
        if side < 3 or side % 3:
            raise ValueError(f"input size {input_size} leaves {side}×{side} maps; it must leave a multiple of 3")
        layers, ch = [], in_channels
        for width in widths:
            layers += [*_conv_bn_relu(ch, width), *_conv_bn_relu(width, width), nn.MaxPool2d(2)]
            ch = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AvgPool2d(side // 3) if side > 3 else nn.Identity()
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(ch * 9, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


class FrontEndCNN(nn.Module):
    """Optional STN, then optional ×2 SR, then :class:`BaseCNN`; ``forward`` returns logits.

    ``same_classifier_init``: the front end draws its initial weights from a copy of torch's RNG, so the
    classifier draws from the state it would meet with no front end, and with one seed the four ablation arms'
    classifiers start from the same weights (as :func:`ablation_arms` gives). Off by default: a model built
    before it keeps its exact initialisation; it changes nothing else (layers, state dict, export).
    """

    def __init__(
        self,
        num_classes: int = 7,
        in_channels: int = 1,
        input_size: tuple[int, int] = (48, 48),
        stn: bool = False,
        sr: bool = False,
        sr_kwargs: dict | None = None,
        same_classifier_init: bool = False,
        **classifier_kwargs,
    ) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[], enabled=same_classifier_init):
            self.stn = SpatialTransformer(in_channels, input_size) if stn else None
            self.sr = EDSR(in_channels, **{**EDSR_SMALL, **(sr_kwargs or {})}) if sr else None
        side = input_size[0] * (self.sr.scale if self.sr is not None else 1)
        self.classifier = BaseCNN(num_classes, in_channels, side, **classifier_kwargs)

    def front(self, x: torch.Tensor) -> torch.Tensor:
        """What the classifier sees: the input warped by the STN and/or upsampled ×2 by the SR net."""
        if self.stn is not None:
            x = self.stn(x)
        if self.sr is not None:
            x = self.sr(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.front(x))


@register_model("base_cnn", SPEC)
def base_cnn(num_classes: int = 7, **kwargs) -> FrontEndCNN:
    return FrontEndCNN(num_classes, stn=False, sr=False, **kwargs)


@register_model("stn_cnn", SPEC)
def stn_cnn(num_classes: int = 7, **kwargs) -> FrontEndCNN:
    return FrontEndCNN(num_classes, stn=True, sr=False, **kwargs)


@register_model("sr_cnn", SPEC)
def sr_cnn(num_classes: int = 7, **kwargs) -> FrontEndCNN:
    return FrontEndCNN(num_classes, stn=False, sr=True, **kwargs)


@register_model("stn_sr_cnn", SPEC)
def stn_sr_cnn(num_classes: int = 7, **kwargs) -> FrontEndCNN:
    return FrontEndCNN(num_classes, stn=True, sr=True, **kwargs)


#: The ablation's arms, in the paper's order: model id → the front end in front of the shared classifier.
ABLATION_ARMS = {
    "base_cnn": (False, False),
    "stn_cnn": (True, False),
    "sr_cnn": (False, True),
    "stn_sr_cnn": (True, True),
}


def ablation_model_kwargs(
    widths: tuple[int, ...] = (32, 64, 128, 256),
    hidden: int = 256,
    sr_blocks: int = EDSR_SMALL["num_blocks"],
    sr_features: int = EDSR_SMALL["features"],
    **classifier_kwargs,
) -> dict[str, dict]:
    """The ``model_kwargs`` of each arm (for ``mien train --model-kwargs``): one classifier for all four, which
    starts from the same weights in every arm under one seed (``same_classifier_init``), and the same
    EDSR(B = ``sr_blocks``, F = ``sr_features``) in both SR arms (the paper: B=16, F=128)."""
    classifier = {"widths": list(widths), "hidden": hidden, "same_classifier_init": True, **classifier_kwargs}
    sr_kwargs = {"num_blocks": sr_blocks, "features": sr_features}
    return {arm: {**classifier, **({"sr_kwargs": sr_kwargs} if sr else {})} for arm, (_, sr) in ABLATION_ARMS.items()}


def ablation_arms(
    widths: tuple[int, ...] = (32, 64, 128, 256),
    hidden: int = 256,
    sr_blocks: int = EDSR_SMALL["num_blocks"],
    sr_features: int = EDSR_SMALL["features"],
    num_classes: int = 7,
    same_init: bool = True,
    **classifier_kwargs,
) -> dict[str, FrontEndCNN]:
    """Base, +STN, +SR and +STN+SR (by model id) with the same classifier at the same width: only the front
    end differs. ``same_init``: the four classifiers start from the same weights too (Base's), so at step 0
    the arms differ in nothing but their front end. (``mien train`` with one seed gives the same when the arms'
    ``model_kwargs`` say ``same_classifier_init = true``, as :func:`ablation_model_kwargs` and issue 17's
    recipes do; without it the front end draws from the seeded generator before the classifier does.)
    """
    kwargs = ablation_model_kwargs(widths, hidden, sr_blocks, sr_features, **classifier_kwargs)
    arms = {arm: FrontEndCNN(num_classes, **kwargs[arm], stn=stn, sr=sr) for arm, (stn, sr) in ABLATION_ARMS.items()}
    if same_init:
        state = arms["base_cnn"].classifier.state_dict()
        for model in arms.values():
            model.classifier.load_state_dict(state)
    return arms
