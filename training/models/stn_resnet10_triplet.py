"""STN + ResNet-10 with a triplet-loss embedding and a softmax head (the FER paper that reaches 99.44% on
CK+ with a spatial transformer in front of a ResNet-18 cut to 10 layers, trained with triplet loss and
random-occlusion augmentation). ResNet: He, Zhang, Ren, Sun, "Deep Residual Learning", 2016; triplet
loss with batch-hard mining: Hermans, Beyer, Leibe, "In Defense of the Triplet Loss", 2017.

Ten weight layers: the 7×7/2 stem conv, four stages of one basic block (two 3×3 convs) at
64-128-256-512 channels, and the classifier FC. Input is the 48×48 grayscale face as is: upsampling
it to ImageNet's 224 would multiply the cost by ~20 without adding information, so instead the stem's
3×3/2 max-pool is dropped (the CIFAR-style adaptation), giving 24 → 24 → 12 → 6 → 3 feature maps; with
the max-pool, the last stage would see 2×2 maps of which half is padding. The only 1×1 stride-2
convs (block shortcuts) see maps of at most 24×24, below the 64×64 where channels_last backward
segfaults in torch 2.13 CPU.

The embedding is the globally pooled 512-d feature vector, L2-normalised (``embed(x)``): the triplet
loss (``training/losses.py``) and the softmax head then shape the same features, the network keeps
its ten layers, and no weights sit outside the path that ``forward`` (the class logits that are
exported and served) trains. ``forward_both`` gives logits and embedding from one pass.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mien.spec import PreprocessSpec
from mien.training.layers import BasicBlock, SpatialTransformer
from mien.training.models import register_model


class STNResNet10(nn.Module):
    def __init__(
        self,
        num_classes: int = 7,
        in_channels: int = 1,
        input_size: tuple[int, int] = (48, 48),
        widths: tuple[int, ...] = (64, 128, 256, 512),
        dropout: float = 0.3,
        stn: bool = True,
    ) -> None:
        super().__init__()
        self.stn = SpatialTransformer(in_channels, input_size) if stn else None
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        blocks, ch = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(ch, width, stride=1 if i == 0 else 2))
            ch = width
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(ch, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled 512-d features, shared by the embedding and the softmax head."""
        if self.stn is not None:
            x = self.stn(x)
        return self.blocks(self.stem(x)).mean(dim=(2, 3))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """N × 512 unit vectors (on the unit sphere the triplet margin is a chord distance)."""
        return F.normalize(self.features(x), dim=1)

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, embedding) from one pass: for cross-entropy + triplet training."""
        feats = self.features(x)
        return self.classifier(feats), F.normalize(feats, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("stn_resnet10_triplet", PreprocessSpec(input_size=(48, 48), channels=1, mean=(0.5,), std=(0.5,)))
def stn_resnet10_triplet(num_classes: int = 7, **kwargs) -> STNResNet10:
    return STNResNet10(num_classes=num_classes, **kwargs)
