"""The faces a run trains and selects on: the data set with the run's labels (FER2013's, FER+'s majority or soft
targets, a subset or merge of classes), cut into its training and validation splits as tensors.

``mien train`` calls :func:`load_splits` once; :func:`load_labelled` is the same data before the cut.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from mien.training.config import TrainConfig
from mien.training.data import CARVED_SPLIT, FaceDataset, load_dataset, load_with_validation, select_labels
from mien.training.ferplus import LABEL_SOURCES, TARGETS, default_votes_path, ferplus_dataset

log = logging.getLogger("mien.train")


def load_labelled(cfg: TrainConfig) -> tuple[FaceDataset, np.ndarray | None]:
    """The data set with the run's labels, and the soft targets (one row per image) when training on them."""
    if cfg.val_split == CARVED_SPLIT:
        data = load_with_validation(cfg.data, cfg.val_fraction, cfg.val_seed, source=cfg.train_split)
    else:
        data = load_dataset(cfg.data)
    if cfg.label_source not in LABEL_SOURCES:
        raise ValueError(f"label source must be one of {LABEL_SOURCES}, got {cfg.label_source!r}")
    if cfg.ferplus_target not in TARGETS:
        raise ValueError(f"FER+ target must be one of {TARGETS}, got {cfg.ferplus_target!r}")
    soft = None
    if cfg.label_source != "fer2013":
        data, soft = ferplus_dataset(data, cfg.ferplus_votes or default_votes_path(cfg.data), cfg.label_source)
        if cfg.ferplus_target == "majority":
            soft = None
    if soft is not None and (cfg.labels is not None or cfg.label_map):
        raise ValueError("--labels/--label-map pick hard labels; with --ferplus-target soft use --label-source instead")
    if cfg.labels is not None or cfg.label_map:
        data = select_labels(data, cfg.labels, cfg.label_map)
    return data, soft


@dataclass
class Splits:
    """The run's faces as tensors; ``train_targets``: one probability row per training face (FER+ soft
    targets) or None."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    train_targets: torch.Tensor | None
    val_x: torch.Tensor
    val_y: torch.Tensor
    label_names: tuple[str, ...]


def load_splits(cfg: TrainConfig) -> Splits:
    """The training and validation faces of ``cfg``, with ``cfg.limit`` applied to training."""
    data, soft = load_labelled(cfg)
    train_x, train_y = data.subset(cfg.train_split)
    val_x, val_y = data.subset(cfg.val_split)
    train_t = torch.from_numpy(soft[data.split == cfg.train_split][: cfg.limit or None]) if soft is not None else None
    if cfg.limit:
        train_x, train_y = train_x[: cfg.limit], train_y[: cfg.limit]
    log.info(
        "data %s: %d train (%s), %d validation (%s)", cfg.data, len(train_y), cfg.train_split, len(val_y), cfg.val_split
    )
    return Splits(torch.from_numpy(train_x), torch.from_numpy(train_y), train_t, torch.from_numpy(val_x),
                  torch.from_numpy(val_y), data.label_names)  # fmt: skip
