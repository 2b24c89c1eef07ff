"""Weight EMA (training/train.py ``weight_ema``): the averaged model follows the trained one from the
first steps instead of dragging its initial values along."""

from __future__ import annotations

import torch
import torch.nn as nn

from mien.training.train import weight_ema


def test_ema_tracks_bn_statistics_far_from_their_initial_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    ema = weight_ema(model, 0.998)
    for _ in range(300):  # inputs of variance 1e-4: BN's running_var moves from 1.0 towards ~1e-4-ish
        model.train()
        model(torch.randn(16, 1, 8, 8) * 0.01)
        ema.update_parameters(model)
    raw = model[1].running_var
    averaged = ema.module[1].running_var
    assert raw.max() < 0.01  # the trained statistics are far from the initial 1.0
    # a fixed 0.998 would keep 0.998**300 = 55% of the initial 1.0; the warmed-up decay keeps ~1e-9 of it
    torch.testing.assert_close(averaged, raw, rtol=0.5, atol=0)


def test_first_update_copies_and_later_updates_average():
    model = nn.Linear(2, 1)
    ema = weight_ema(model, 0.9)
    ema.update_parameters(model)
    torch.testing.assert_close(ema.module.weight, model.weight)
    before = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update_parameters(model)  # n = 1: decay min(0.9, 2/11)
    d = 2 / 11
    torch.testing.assert_close(ema.module.weight, before * d + model.weight.detach() * (1 - d))
