"""Blocks shared by several architectures, written once."""

from training.layers.separable import SeparableConv2d

__all__ = ["SeparableConv2d"]
