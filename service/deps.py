"""Dependencies as ``Annotated`` aliases: routes get settings, models, detector and metrics from the app.

Everything lives on ``app.state`` (set by ``create_app`` and its lifespan), so tests can build as
many apps as they like, or replace any of these with ``app.dependency_overrides``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from mien.service.config import Settings
from mien.service.detect import FaceDetector
from mien.service.errors import NotReady, ServiceError
from mien.service.metrics import ServiceMetrics
from mien.service.registry import ModelRegistry
from starlette.datastructures import UploadFile


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_models(request: Request) -> ModelRegistry:
    models = getattr(request.app.state, "models", None)
    if models is None:  # the lifespan has not run (or failed): nothing is loaded
        raise NotReady("models are not loaded yet; retry in a moment")
    return models


def get_detectors(request: Request) -> dict[str, FaceDetector]:
    detectors = getattr(request.app.state, "detectors", None)
    if detectors is None:
        raise NotReady("the face detectors are not loaded yet; retry in a moment")
    return detectors


def pick_detector(detectors: dict[str, FaceDetector], name: str) -> FaceDetector:
    """The detector a request names; a 400 naming the loaded ones when it is not loaded."""
    if name not in detectors:
        raise ServiceError(400, "unavailable_detector", f"detector {name!r} is not loaded here; loaded: "
                           f"{', '.join(sorted(detectors))} (the onnx one needs `mien export detector`)")  # fmt: skip
    return detectors[name]


async def one_upload(request: Request) -> None:
    """400 when a request carries more than one file: a single image per request, never a silent pick of one."""
    form = await request.form()  # the form FastAPI has already parsed for the route (cached on the request)
    files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
    if len(files) > 1:
        fields = ", ".join(sorted({key for key, value in form.multi_items() if isinstance(value, UploadFile)}))
        raise ServiceError(400, "too_many_files", f"the request carries {len(files)} files (form fields: {fields}); "
                           "send one image per request, in the field 'file'")  # fmt: skip


def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
ModelsDep = Annotated[ModelRegistry, Depends(get_models)]
DetectorsDep = Annotated[dict[str, FaceDetector], Depends(get_detectors)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
