"""Blocks shared by several architectures, written once."""

from training.layers.se import SqueezeExcite
from training.layers.separable import SeparableConv2d
from training.layers.sr import EDSR, EDSR_PAPER, EDSR_SMALL
from training.layers.stn import SpatialTransformer

__all__ = ["EDSR", "EDSR_PAPER", "EDSR_SMALL", "SeparableConv2d", "SpatialTransformer", "SqueezeExcite"]
