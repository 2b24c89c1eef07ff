"""Domain errors in the domain, HTTP at the edge: the domain modules import no web framework, every error a
request can meet has its status in service/errors.py, and the one reading of ?model= serves the route and
the metrics alike."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from mien.service import exceptions
from mien.service.detectors import BUNDLED_DIR, source_checkout
from mien.service.errors import STATUS, mien_error_response, status_of
from tests.conftest import make_client
from tests.test_service_api import astronaut, encode, upload
from tests.test_service_ops import sample

SERVICE = Path(__file__).resolve().parents[1] / "service"
# Modules with no HTTP in them: they raise mien.service.exceptions and never build a response.
DOMAIN = ["exceptions.py", "registry.py", "batching.py", "pipeline.py", "align.py", "imaging.py", "metrics.py",
          *sorted(str(p.relative_to(SERVICE)) for p in (SERVICE / "detectors").glob("*.py"))]  # fmt: skip
WEB = ("fastapi", "starlette", "uvicorn")
START_UP_ONLY = {exceptions.MienError, exceptions.DetectorNotLoaded, exceptions.DetectorFilesMissing}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("name", DOMAIN)
def test_domain_modules_import_no_web_framework(name):
    assert not imported_roots(SERVICE / name) & set(WEB)


def test_every_error_a_request_can_meet_has_a_status():
    classes = inspect.getmembers(exceptions, inspect.isclass)
    errors = {cls for _, cls in classes if issubclass(cls, exceptions.MienError)}
    assert errors - START_UP_ONLY == set(STATUS)
    assert status_of(exceptions.DetectorNotLoaded("x")) is None
    response = mien_error_response(exceptions.DetectorNotLoaded("no cascade at /secret/path"))
    assert response.status_code == 500 and b"internal_error" in response.body and b"/secret" not in response.body


@pytest.mark.parametrize(
    "error,status,code,headers",
    [
        (exceptions.Busy("busy", retry_after=7), 503, "busy", {"retry-after": "7"}),
        (exceptions.TimedOut("slow", retry_after=2), 504, "timeout", {"retry-after": "2"}),
        (exceptions.Unauthorized("key"), 401, "unauthorized", {"www-authenticate": "Bearer"}),
        (exceptions.TooLarge("big", body_unread=True), 413, "too_large", {"connection": "close"}),
        (exceptions.TooManyPixels("huge"), 413, "too_many_pixels", {}),
        (exceptions.ProtocolNotReady("later"), 400, "not_ready", {}),
        (exceptions.NotReady("later"), 503, "not_ready", {}),
    ],
)
def test_the_edge_maps_status_code_and_headers(error, status, code, headers):
    response = mien_error_response(error)
    assert response.status_code == status
    assert response.body == f'{{"error":{{"code":"{code}","message":"{error.message}"}}}}'.encode()
    assert {k: v for k, v in response.headers.items() if k in headers} == headers


def test_the_route_and_the_metrics_read_a_repeated_model_parameter_alike(model_dir):
    with make_client(model_dir) as client:
        response = client.post("/predict?model=nope&model=mini_xception", files=upload(encode(astronaut())))
        assert response.status_code == 200 and response.json()["model"] == "mini_xception"
        metrics = client.get("/metrics").text
        assert sample(metrics, "mien_predict_requests_total", model="mini_xception", status="200") == 1


def test_the_bundled_detector_is_the_checkouts_and_none_when_installed(tmp_path):
    assert BUNDLED_DIR == SERVICE.parent / "models" / "detector"
    wheel = tmp_path / "site-packages" / "mien" / "service" / "detectors"
    wheel.mkdir(parents=True)
    assert source_checkout(wheel / "__init__.py") is None  # never a folder inside site-packages/mien
