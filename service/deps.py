"""Dependencies as ``Annotated`` aliases: routes get settings, models, detectors and metrics from the app.

Everything lives on ``app.state`` (set by ``create_app`` and its lifespan), so tests can build as
many apps as they like, or replace any of these with ``app.dependency_overrides``. Every model lookup,
by ``?model=`` or by a v2 path, goes through :func:`find_model`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request
from starlette.datastructures import UploadFile

from mien.service.config import Settings
from mien.service.detectors import FaceDetector
from mien.service.exceptions import (
    DetectorUnavailable,
    ModelNotFound,
    NotReady,
    TooManyFiles,
    VersionNotFound,
)
from mien.service.metrics import ServiceMetrics
from mien.service.registry import LoadedModel, ModelRegistry

MODEL_PARAM = "model"  # the query parameter that names a model (POST /predict); the metrics read it too


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def served_models(request: Request) -> ModelRegistry | None:
    """The loaded models, or None before the lifespan has loaded them (or when it failed)."""
    return getattr(request.app.state, "models", None)


def get_models(request: Request) -> ModelRegistry:
    models = served_models(request)
    if models is None:  # the lifespan has not run (or failed): nothing is loaded
        raise NotReady("models are not loaded yet; retry in a moment")
    return models


def requested_model_id(models: ModelRegistry, model: str | None) -> str:
    """The id a request's ``?model=`` asks for: the one it names, else the default (``?model=`` names none)."""
    return model or models.default_id


def find_model(models: ModelRegistry | None, model_id: str, version: str | None = None) -> LoadedModel:
    """The one model lookup: by id, and by version when one is given; the errors name what is served."""
    if models is None:
        raise ModelNotFound(model_id, [])
    loaded = models.get(model_id)
    if version is not None and version != loaded.version:
        raise VersionNotFound(model_id, version, loaded.version)
    return loaded


def get_model(
    models: Annotated[ModelRegistry, Depends(get_models)],
    model: Annotated[
        str | None,
        Query(alias=MODEL_PARAM, max_length=200, description="model id (GET /models); default: the service's"),
    ] = None,
) -> LoadedModel:
    """The model ``?model=`` names, else the default; NotReady when no model is loaded at all."""
    if not models.models:
        raise NotReady(models.not_ready_reason())
    return find_model(models, requested_model_id(models, model))


def get_path_model(request: Request, model_id: str) -> LoadedModel:
    """The model a v2 path names (``/v2/models/{model_id}``)."""
    return find_model(served_models(request), model_id)


def get_path_model_version(request: Request, model_id: str, version: str) -> LoadedModel:
    """The model and version a v2 path names (``/v2/models/{model_id}/versions/{version}``)."""
    return find_model(served_models(request), model_id, version)


def get_detectors(request: Request) -> dict[str, FaceDetector]:
    detectors = getattr(request.app.state, "detectors", None)
    if detectors is None:
        raise NotReady("the face detectors are not loaded yet; retry in a moment")
    return detectors


def pick_detector(detectors: dict[str, FaceDetector], name: str) -> FaceDetector:
    """The detector a request names; DetectorUnavailable, naming the loaded ones, when it is not loaded."""
    if name not in detectors:
        raise DetectorUnavailable(name, list(detectors))
    return detectors[name]


async def one_upload(request: Request) -> None:
    """TooManyFiles when a request carries more than one: a single image per request, never a silent pick."""
    form = await request.form()  # the form FastAPI has already parsed for the route (cached on the request)
    files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
    if len(files) > 1:
        fields = ", ".join(sorted({key for key, value in form.multi_items() if isinstance(value, UploadFile)}))
        raise TooManyFiles(f"the request carries {len(files)} files (form fields: {fields}); "
                           "send one image per request, in the field 'file' (or several to POST /predict/batch, "
                           "in the field 'files')")  # fmt: skip


def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
ModelsDep = Annotated[ModelRegistry, Depends(get_models)]
OptionalModelsDep = Annotated[ModelRegistry | None, Depends(served_models)]
ModelDep = Annotated[LoadedModel, Depends(get_model)]
PathModelDep = Annotated[LoadedModel, Depends(get_path_model)]
PathModelVersionDep = Annotated[LoadedModel, Depends(get_path_model_version)]
DetectorsDep = Annotated[dict[str, FaceDetector], Depends(get_detectors)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
