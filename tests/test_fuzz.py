"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis, in process over ASGI).

Every operation in /openapi.json gets a bounded number of generated requests, valid and invalid alike
(random query values, path parameters, multipart files and JSON bodies), with a fixed derandomized seed so
a run is repeatable. Each answer must not be a 5xx, must use a status code, content type and body that the
schema documents for that operation.
"""

from __future__ import annotations

import zlib

import cv2
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from skimage import data

from tests.conftest import make_client

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES_PER_OPERATION = 30


def _openapi() -> dict:
    """The schema the service publishes at /openapi.json; building it loads no model."""
    from mien.service.config import Settings
    from mien.service.main import create_app

    return create_app(Settings()).openapi()


schema = schemathesis.openapi.from_dict(_openapi())


@pytest.fixture(scope="module")
def photo() -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))[1].tobytes()


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> bytes:
    """Ten frames of the astronaut at 320×240, mp4v: a real video for POST /analyze/video."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    frame = cv2.resize(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR), (320, 240))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (320, 240))
    for _ in range(10):
        writer.write(frame)
    writer.release()
    return path.read_bytes()


@pytest.fixture(scope="module")
def fuzzed_app(model_dir):
    # The TestClient runs the lifespan (models loaded) for the whole module; the generated requests go to this app.
    with make_client(model_dir) as client:
        yield client.app


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_answers_every_generated_request_as_its_schema_says(case, fuzzed_app, photo, video):
    # Random strings almost never name the served model or hold a decodable photo, so every other case gets
    # the real model id (and version) or a real photo: the success answers are checked against the schema too.
    if _coin(case, "model_id"):
        loaded = fuzzed_app.state.models.get("mini_xception")
        case.path_parameters["model_id"] = loaded.model_id
        if "version" in case.path_parameters:
            case.path_parameters["version"] = loaded.version
    if case.path == "/predict" and isinstance(case.body, dict) and "file" in case.body and _coin(case, "file"):
        case.body["file"] = photo
    if case.path == "/analyze/video" and isinstance(case.body, dict) and "file" in case.body and _coin(case, "file"):
        case.body["file"] = video  # half the cases a real video: its analysis is checked against the schema too
    # POST /predict/batch: the generated files are sent as the repeated field 'files'; in half the cases every
    # other one becomes the photo, so that a batch mixing predictions and per-photo errors is checked too.
    if case.path == "/predict/batch" and isinstance(case.body, dict) and isinstance(case.body.get("files"), list):
        if case.body["files"] and _coin(case, "files"):
            case.body["files"] = [photo if i % 2 == 0 else item for i, item in enumerate(case.body["files"])]
    case.call_and_validate(app=fuzzed_app, checks=CHECKS)


def _coin(case, name: str) -> bool:
    """A fair, repeatable coin per generated case (Python's str hash is salted per process; crc32 is not)."""
    body = case.body if isinstance(case.body, dict) else {}
    value = body.get(name) if name in ("file", "files") else (case.path_parameters or {}).get(name)
    return value is not None and zlib.crc32(repr(value).encode()) % 2 == 0
