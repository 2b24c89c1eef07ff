"""Pre-train the EDSR front end of ``sr_cnn``/``stn_sr_cnn`` on FER2013 faces, then load it with ``sr_init``.

FER2013 has no higher-resolution faces, so the real 48×48 face is the target and its ×2 area-downscale
(24×24) the input: the network learns 24 → 48 with L1 (EDSR's loss) and is then used, scale-free as
convolutions are, as the 48 → 96 front end of the classifier. Validation reports the L1 of bicubic
upsampling beside the network's, so a front end that does not beat bicubic is visible.

Recommended: pre-train, then train the classifier with ``freeze_sr=True``. On two CPU cores, training
EDSR jointly costs most of an epoch (EDSR(8, 64): ~2,300 s/epoch against ~225 s for a VGG-size CNN)
because every step backpropagates through convolutions at 96×96 into the SR weights. Frozen, the SR
net only runs forward (plus input gradients when an STN sits in front), its weight gradients are never
formed, and the classifier sees a fixed, meaningful upsampling from the first epoch instead of a
random filter that the classification loss must first turn into one; the paper's front end is also a
pre-trained SR network. Fine-tuning (``sr_init`` without ``freeze_sr``) stays available for runs that
can afford it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mien.training.config import SRPretrainConfig
from mien.training.data import load_dataset
from mien.training.layers import EDSR, EDSR_SMALL
from mien.training.models import default_spec
from mien.training.transforms import normalize

log = logging.getLogger("mien.sr_pretrain")


def downscale(hr: torch.Tensor) -> torch.Tensor:
    """The ×2 low-resolution input: area interpolation averages 2×2 blocks, like a coarser sensor."""
    return F.interpolate(hr, scale_factor=0.5, mode="area")


@torch.no_grad()
def sr_l1(sr: nn.Module, hr: torch.Tensor, batch_size: int = 256) -> tuple[float, float]:
    """(network L1, bicubic L1) of reconstructing ``hr`` (normalised N×C×H×W) from its ×2 downscale."""
    sr.eval()
    net = bicubic = 0.0
    for i in range(0, len(hr), batch_size):
        target = hr[i : i + batch_size]
        small = downscale(target)
        up = F.interpolate(small, size=target.shape[-2:], mode="bicubic", align_corners=False)
        net += F.l1_loss(sr(small), target, reduction="sum").item()
        bicubic += F.l1_loss(up, target, reduction="sum").item()
    return net / hr.numel(), bicubic / hr.numel()


def pretrain_sr(cfg: SRPretrainConfig) -> dict:
    """Train an EDSR on 24 → 48 FER2013 pairs with L1; write ``cfg.out``; return its metrics."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    spec = default_spec("sr_cnn")  # the SR variants' normalisation: the SR net sees what the classifier feeds it
    data = load_dataset(cfg.data)
    train_x = torch.from_numpy(data.subset(cfg.train_split)[0])
    if cfg.limit:
        train_x = train_x[: cfg.limit]
    val_hr = normalize(torch.from_numpy(data.subset(cfg.val_split)[0]), spec)
    sr_kwargs = {**EDSR_SMALL, **cfg.sr_kwargs}
    sr = EDSR(spec.channels, **sr_kwargs)
    steps_per_epoch = len(train_x) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_x)} training faces are fewer than one batch of {cfg.batch_size}")
    optimizer = torch.optim.Adam(sr.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps_per_epoch)
    history = []
    for epoch in range(1, cfg.epochs + 1):
        sr.train()
        order = torch.randperm(len(train_x), generator=generator)
        total = 0.0
        for i in range(steps_per_epoch):
            hr = normalize(train_x[order[i * cfg.batch_size : (i + 1) * cfg.batch_size]], spec)
            flip = torch.rand(len(hr), generator=generator) < 0.5
            hr = torch.where(flip[:, None, None, None], hr.flip(-1), hr)
            loss = F.l1_loss(sr(downscale(hr)), hr)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        val_l1, bicubic_l1 = sr_l1(sr, val_hr)
        row = {"epoch": epoch, "train_l1": total / steps_per_epoch, "val_l1": val_l1, "bicubic_l1": bicubic_l1}
        history.append(row)
        log.info("SR epoch %d/%d  train L1 %.4f  %s L1 %.4f (bicubic %.4f)", epoch, cfg.epochs,
                 row["train_l1"], cfg.val_split, val_l1, bicubic_l1)  # fmt: skip
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metrics = {**history[-1], "split": cfg.val_split}
    ckpt = {"kind": "sr_pretrain", "sr_kwargs": sr.kwargs, "state_dict": sr.state_dict(), "history": history,
            "metrics": metrics, "config": asdict(cfg), "spec": spec.to_dict()}  # fmt: skip
    torch.save(ckpt, out)
    out.with_suffix(".json").write_text(json.dumps({"sr_kwargs": sr.kwargs, "history": history}, indent=1))
    return metrics


def load_sr_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by :func:`pretrain_sr`, or an error that says what the file is instead."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such SR checkpoint; `mien pretrain-sr --out {path}` writes one")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "sr_pretrain":
        raise ValueError(f"{path}: not an SR pre-training checkpoint (written by `mien pretrain-sr`)")
    return ckpt


def resolve_sr_kwargs(model_kwargs: dict, sr_init: str) -> dict:
    """``model_kwargs`` with ``sr_kwargs`` taken from the ``sr_init`` checkpoint, which must agree with any given."""
    if not sr_init:
        return dict(model_kwargs)
    saved = load_sr_checkpoint(sr_init)["sr_kwargs"]
    given = model_kwargs.get("sr_kwargs")
    if given is not None and {**EDSR_SMALL, **given} != {k: saved[k] for k in {**EDSR_SMALL, **given}}:
        raise ValueError(f"sr_kwargs {given} disagree with those of the SR checkpoint {sr_init}: {saved}")
    return {**model_kwargs, "sr_kwargs": dict(saved)}


def init_sr_front_end(model: nn.Module, sr_init: str, freeze: bool) -> None:
    """Load pre-trained SR weights into ``model.sr`` and optionally freeze them."""
    if getattr(model, "sr", None) is None:
        raise ValueError("sr_init/freeze_sr need a model with an SR front end (sr_cnn, stn_sr_cnn)")
    if freeze and not sr_init:
        raise ValueError("freeze_sr without sr_init would freeze a random SR network; pass sr_init too")
    if sr_init:
        model.sr.load_state_dict(load_sr_checkpoint(sr_init)["state_dict"])
    for p in model.sr.parameters():
        p.requires_grad_(not freeze)
