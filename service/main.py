"""Wiring only: settings, error handlers, middleware, routers, and a lifespan that loads models once.

``mien serve`` calls ``create_app(Settings(...))`` and hands the app to uvicorn; for uvicorn directly:
``uvicorn mien.service.main:create_app --factory``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from mien import __version__
from mien.service.config import Settings
from mien.service.detectors import DetectorOptions, detector_dir, load_detectors
from mien.service.errors import install_error_handlers
from mien.service.limits import install_limits
from mien.service.metrics import ServiceMetrics
from mien.service.registry import ModelRegistry
from mien.service.routes import analyze, health, metrics, models, predict, v2, web
from mien.service.routes.metrics import PredictMetricsMiddleware

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    folder = detector_dir(settings.detector_dir, settings.model_dir)
    session = settings.session_config()
    options = DetectorOptions(folder, settings.providers, session, settings.min_face, settings.face_threshold,
                              settings.detect_slots())  # fmt: skip
    app.state.detectors = load_detectors(settings.detector, options)  # built and warmed up
    log.info("face detectors %s (default %s, from %s)", sorted(app.state.detectors), settings.detector, folder)
    models = ModelRegistry.load(settings.model_dir, settings.default_model, settings.providers, session)
    app.state.models = models  # /ready answers 503 until the warm-up below is done
    app.state.metrics.observe_models(models)
    log.info("serving models %s (default %s)", models.ids, settings.default_model)
    # One face per model: a warm-up at the largest batch would make every model's memory arena hold that
    # batch's activations from the start (~400 MB for the bundled models), used or not.
    warmup_ms = models.warm_up((1,))
    log.info("warm-up ms per model: %s", ", ".join(f"{m}={ms:.0f}" for m, ms in sorted(warmup_ms.items())))
    if settings.batching:
        batch_size = app.state.metrics.batch_size
        models.start_batching(settings.batch_max_size, settings.batch_max_wait_ms,
                              lambda model_id, faces: batch_size.labels(model=model_id).observe(faces))  # fmt: skip
    try:
        yield
    finally:
        models.close()  # stops the batchers' worker threads


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app; ``settings`` default to the ``MIEN_*`` environment."""
    settings = settings if settings is not None else Settings()
    app = FastAPI(
        title="mien",
        summary="Facial expression recognition: every face in a photo, a probability per expression",
        version=__version__,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = ServiceMetrics()
    install_error_handlers(app)
    # Added last = runs first: metrics see every /predict and /analyze/video answer, including the limits' 413, 414,
    # 503 and 504.
    install_limits(app, settings)  # body, query, concurrency, queue and timeout: service/limits.py
    app.add_middleware(PredictMetricsMiddleware)
    for module in (predict, analyze, models, health, metrics, v2, web):
        app.include_router(module.router)
    return app
