"""Prometheus metrics in a per-app registry, so several apps (tests, workers) never share counters.

``GET /metrics`` and the middleware that counts every ``POST /predict`` are in ``routes/metrics.py``.

Two gauges say how loaded this process is right now, for an autoscaler (deploy/kubernetes/: a
HorizontalPodAutoscaler reads the per-pod average of ``mien_inflight_requests`` through prometheus-adapter):
``mien_inflight_requests`` (inference requests holding one of the ``MIEN_MAX_CONCURRENCY`` slots) and
``mien_queued_requests`` (waiting for one, at most ``MIEN_MAX_QUEUE``). They are read from the admission
limiter's own counters when scraped (:meth:`ServiceMetrics.track_load`), not kept beside them, so they cannot
drift from what the limiter admits: a request that fails, is refused 503, times out or is cancelled changes them
exactly as it changes the limiter. Like every metric here they count one process (one uvicorn worker).
"""

from __future__ import annotations

from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from mien.service.registry import ModelRegistry

FACE_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
INFLIGHT_METRIC = "mien_inflight_requests"
QUEUED_METRIC = "mien_queued_requests"


class LoadCounts(Protocol):
    """What the load gauges read: :class:`mien.service.limits.LoadLimiter`'s counters."""

    @property
    def running(self) -> int: ...

    @property
    def waiting(self) -> int: ...


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
        # 0 until track_load() binds them to the app's limiter.
        self.inflight = Gauge(
            INFLIGHT_METRIC, "inference requests being worked on now, in this process (per-pod load)", registry=r
        )
        self.queued = Gauge(
            QUEUED_METRIC, "inference requests waiting for a free slot now, in this process", registry=r
        )

    def track_load(self, limiter: LoadCounts) -> None:
        """Report ``limiter.running`` and ``limiter.waiting`` as the load gauges, read at every scrape."""
        self.inflight.set_function(lambda: limiter.running)
        self.queued.set_function(lambda: limiter.waiting)

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
