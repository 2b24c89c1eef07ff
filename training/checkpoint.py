"""Rebuild a model from a checkpoint alone: weights, model id, kwargs and spec travel inside it."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from mien.spec import PreprocessSpec
from mien.training.layers import as_served
from mien.training.models import create_model


def load_model(path: str | Path) -> tuple[nn.Module, PreprocessSpec, dict]:
    """(model in eval mode, its spec, the whole checkpoint dict) from a ``mien train`` checkpoint.

    The model is the served form: a network trained on random crops sees the centre window of the face
    (:func:`mien.training.layers.as_served`), as validation scored it when the checkpoint was selected.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint; `mien train` writes <out>/best.pt")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    missing = [k for k in ("model_id", "model_kwargs", "spec", "state_dict") if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: not a mien checkpoint (missing {missing})")
    model = create_model(ckpt["model_id"], **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    return as_served(model, ckpt.get("train_config", {})).eval(), PreprocessSpec.from_dict(ckpt["spec"]), ckpt
