"""GET /health (the process answers) and GET /ready (it can serve requests that name no model)."""

from __future__ import annotations

from fastapi import APIRouter

from mien.schemas import HealthResponse, ReadyResponse, error_responses
from mien.service.deps import ModelsDep
from mien.service.exceptions import NotReady

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse)
def health() -> HealthResponse:
    return HealthResponse()


@router.get("/ready", response_model=ReadyResponse, responses=error_responses(503))
def ready(models: ModelsDep) -> ReadyResponse:
    if not models.ready:
        raise NotReady(models.not_ready_reason())
    providers = {model_id: models.models[model_id].provider for model_id in models.ids}
    return ReadyResponse(models=models.ids, default=models.default_id, providers=providers, refused=models.refused)
