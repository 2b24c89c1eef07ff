"""Model registry: every architecture registers a model id; callers build models only by id.

>>> model = create_model("mini_xception")
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch.nn as nn

from mien.spec import PreprocessSpec

_REGISTRY: dict[str, tuple[Callable[..., nn.Module], PreprocessSpec]] = {}


def register_model(model_id: str, spec: PreprocessSpec) -> Callable:
    """Decorator: register a builder ``fn(num_classes, **kwargs) -> nn.Module`` under ``model_id``.

    ``spec`` is the model's default preprocessing; training may change its labels.
    """

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if model_id in _REGISTRY:
            raise ValueError(f"model id {model_id!r} is registered twice")
        _REGISTRY[model_id] = (fn, spec)
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _entry(model_id: str) -> tuple[Callable[..., nn.Module], PreprocessSpec]:
    try:
        return _REGISTRY[model_id]
    except KeyError:
        raise KeyError(f"unknown model id {model_id!r}; known model ids: {', '.join(list_models())}") from None


def default_spec(model_id: str, labels: tuple[str, ...] | None = None) -> PreprocessSpec:
    """The registered spec of ``model_id``, with ``labels`` replaced when given."""
    spec = _entry(model_id)[1]
    return replace(spec, labels=tuple(labels)) if labels is not None else spec


def create_model(model_id: str, num_classes: int = 7, **kwargs) -> nn.Module:
    """Build the model registered as ``model_id``; unknown ids fail with the list of known ones."""
    builder, _ = _entry(model_id)
    return builder(num_classes=num_classes, **kwargs)


# Importing the architecture modules registers them.
from mien.training.models import (  # noqa: E402,F401
    base_cnn,
    dcnn,
    mini_xception,
    resnet18_fer,
    row_lstm,
    se_sepconv,
    sgan,
    stn_resnet10_triplet,
    vgg_fer,
)
