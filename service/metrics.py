"""Prometheus metrics in a per-app registry, so several apps (tests, workers) never share counters."""

from __future__ import annotations

import time
from urllib.parse import parse_qs

from mien.service.registry import ModelRegistry
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNKNOWN_MODEL = "unknown"  # label for requests that name no loaded model: bounded label values
FACE_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServiceMetrics:
    """The service's metrics; ``render()`` gives the Prometheus text exposition."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mien_predict_requests", "POST /predict requests by model and HTTP status", ["model", "status"], registry=r
        )
        self.duration = Histogram(
            "mien_predict_duration_seconds", "POST /predict wall time", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.stage_duration = Histogram(
            "mien_stage_duration_seconds",
            "time per pipeline stage (decode, detect, preprocess, classify)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.detect_duration = Histogram(
            "mien_detect_duration_seconds",
            "face detection time per image, by detector (onnx, haar)",
            ["detector"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.faces = Histogram(
            "mien_faces_per_image",
            "faces returned per successful prediction",
            ["model"],
            buckets=FACE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "mien_batch_size", "faces per onnxruntime call", ["model"], buckets=FACE_BUCKETS[1:], registry=r
        )
        self.model_info = Info(
            "mien_model", "served models: version and the provider that really runs", ["model"], registry=r
        )

    def observe_models(self, models: ModelRegistry) -> None:
        for loaded in models.models.values():
            self.model_info.labels(model=loaded.model_id).info(
                {
                    "version": loaded.version,
                    "provider": loaded.provider,
                    "default": str(loaded.model_id == models.default_id).lower(),
                }
            )

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _model_label(scope: Scope) -> str:
    """The model a /predict request is for, or 'unknown' so clients cannot mint label values."""
    state = scope["app"].state
    models: ModelRegistry | None = getattr(state, "models", None)
    if models is None:
        return UNKNOWN_MODEL
    requested = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("model", [models.default_id])[0]
    return requested if requested in models.models else UNKNOWN_MODEL


class PredictMetricsMiddleware:
    """Counts every /predict request by model and final status, including ones refused before the route."""

    def __init__(self, app: ASGIApp, path: str = "/predict") -> None:
        self.app = app
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
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
