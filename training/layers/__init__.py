"""Blocks shared by several architectures, written once."""

from mien.training.layers.crop import CenterCrop, as_served
from mien.training.layers.resnet import BasicBlock
from mien.training.layers.se import SqueezeExcite
from mien.training.layers.separable import SeparableConv2d
from mien.training.layers.sr import EDSR, EDSR_PAPER, EDSR_SMALL
from mien.training.layers.stn import SpatialTransformer

__all__ = [
    "BasicBlock",
    "CenterCrop",
    "EDSR",
    "EDSR_PAPER",
    "EDSR_SMALL",
    "SeparableConv2d",
    "SpatialTransformer",
    "SqueezeExcite",
    "as_served",
]
