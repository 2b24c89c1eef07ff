"""GET /metrics: Prometheus text exposition of this app's own registry."""

from __future__ import annotations

from fastapi import APIRouter, Response
from mien.service.deps import MetricsDep
from mien.service.schemas import error_responses
from mien.service.security import MetricsKey
from prometheus_client import CONTENT_TYPE_LATEST

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, **error_responses(401)},
    dependencies=[MetricsKey],  # the API key only when MIEN_METRICS_NEED_KEY is true
)
def metrics(metrics: MetricsDep) -> Response:
    return Response(content=metrics.render(), media_type=CONTENT_TYPE_LATEST)
