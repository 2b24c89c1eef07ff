"""GET /metrics (Prometheus text exposition of this app's own registry), and the middleware that counts
every POST /predict, POST /predict/batch and POST /analyze/video by model and status, including requests refused
before the route runs (a batch counts once, whatever its photos' own results; their faces and stage times are
recorded per photo by the route, as for /predict; a video counts once, its stage times over all its frames)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mien.schemas import error_responses
from mien.service.deps import MODEL_PARAM, MetricsDep, requested_model_id
from mien.service.metrics import ServiceMetrics
from mien.service.registry import ModelRegistry
from mien.service.security import MetricsKey

router = APIRouter(tags=["metrics"])

UNKNOWN_MODEL = "unknown"  # label for requests that name no loaded model: bounded label values


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, **error_responses(401)},
    dependencies=[MetricsKey],  # the API key only when MIEN_METRICS_NEED_KEY is true
)
def metrics(metrics: MetricsDep) -> Response:
    return Response(content=metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _model_label(scope: Scope) -> str:
    """The model a /predict request is for, as the route reads ``?model=``, or 'unknown' so that clients
    cannot mint label values."""
    models: ModelRegistry | None = getattr(scope["app"].state, "models", None)
    if models is None:
        return UNKNOWN_MODEL
    requested = requested_model_id(models, QueryParams(scope.get("query_string", b"")).get(MODEL_PARAM))
    return requested if requested in models.models else UNKNOWN_MODEL


class PredictMetricsMiddleware:
    """Counts every /predict, /predict/batch and /analyze/video request by model and final status, including ones
    refused before the route."""

    def __init__(self, app: ASGIApp, paths: tuple[str, ...] = ("/predict", "/predict/batch", "/analyze/video")) -> None:
        self.app = app
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        status = 500  # what the client sees if the app raises before answering
        start = time.perf_counter()

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            metrics: ServiceMetrics = scope["app"].state.metrics
            model = _model_label(scope)
            metrics.requests.labels(model=model, status=str(status)).inc()
            metrics.duration.labels(model=model).observe(time.perf_counter() - start)
