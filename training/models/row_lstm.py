"""Row LSTM: the recurrent baseline of the DCNN paper (an LSTM reads the face one pixel row at a time;
Hochreiter & Schmidhuber, "Long Short-Term Memory", 1997).

Each of the H rows (W pixels × C channels) is one time step; the last layer's final hidden state
goes through dropout to a fully connected layer. It has no notion of 2-D locality, which is why
the paper's CNN beats it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mien.spec import PreprocessSpec
from mien.training.models import register_model


class RowLSTM(nn.Module):
    def __init__(
        self,
        num_classes: int = 7,
        in_channels: int = 1,
        width: int = 48,
        hidden: int = 128,
        num_layers: int = 2,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.lstm = nn.LSTM(
            in_channels * width,
            hidden,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 1, 3).reshape(n, h, c * w)  # N × time (rows) × features (pixels of a row)
        with torch.autocast(x.device.type, enabled=False):  # oneDNN has no bf16 LSTM on these CPUs
            _, (h_n, _) = self.lstm(rows.float())
        return self.head(h_n[-1])


@register_model("row_lstm", PreprocessSpec(input_size=(48, 48), channels=1, mean=(0.5,), std=(0.5,)))
def row_lstm(num_classes: int = 7, **kwargs) -> RowLSTM:
    return RowLSTM(num_classes=num_classes, **kwargs)
