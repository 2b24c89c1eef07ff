"""Prometheus metrics in a per-app registry, so several apps (tests, workers) never share counters.

``GET /metrics`` and the middleware that counts every ``POST /predict`` are in ``routes/metrics.py``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest

from mien.service.registry import ModelRegistry

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
