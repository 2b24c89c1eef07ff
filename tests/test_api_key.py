"""The optional API key (MIEN_API_KEY): inference routes need it when it is set, probes never do, /metrics when
told to; either header works; the check is a constant-time comparison; OpenAPI declares both schemes."""

from __future__ import annotations

import hmac

import cv2
import numpy as np
import pytest
from pydantic import ValidationError
from skimage import data

from mien.service import security
from mien.service.config import Settings
from tests.conftest import make_client

KEY = "k3y-for-tests-0123456789abcdef"
INFER = "/v2/models/mini_xception/infer"
TENSOR = {"inputs": [{"name": "input", "shape": [1, 1, 48, 48], "datatype": "FP32", "data": [0.5] * 48 * 48}]}


@pytest.fixture(scope="module")
def photo() -> dict:
    jpeg = cv2.imencode(".jpg", cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))[1].tobytes()
    return {"file": ("a.jpg", jpeg, "image/jpeg")}


@pytest.fixture(scope="module")
def keyed(model_dir):
    with make_client(model_dir, api_key=KEY) as client:
        yield client


def error_code(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    return body["error"]["code"]


@pytest.mark.parametrize("headers", [{"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"},
                                     {"x-api-key": KEY, "Authorization": "Bearer wrong"}])  # fmt: skip
def test_the_right_key_in_either_header_is_accepted(keyed, photo, headers):
    response = keyed.post("/predict", files=photo, headers=headers)
    assert response.status_code == 200, response.text
    assert len(response.json()["faces"]) == 1
    response = keyed.post(INFER, json=TENSOR, headers=headers)
    assert response.status_code == 200, response.text
    assert np.isclose(sum(response.json()["outputs"][0]["data"]), 1.0, rtol=1e-5)


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": ""}, {"X-API-Key": "wrong"}, {"X-API-Key": KEY[:-1]},
                                     {"X-API-Key": KEY + "x"}, {"Authorization": f"Basic {KEY}"},
                                     {"Authorization": "Bearer nope"}, {"X-API-Key": "ключ".encode()}])  # fmt: skip
def test_a_missing_or_wrong_key_is_401_on_every_inference_route(keyed, photo, headers):
    versioned = "/v2/models/mini_xception/versions/x/infer"
    for response in (
        keyed.post("/predict", files=photo, headers=headers),
        keyed.post(INFER, json=TENSOR, headers=headers),
        keyed.post(versioned, json=TENSOR, headers=headers),
    ):
        assert error_code(response, 401) == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
        assert KEY not in response.text  # the message never echoes the key


def test_the_key_is_checked_before_the_request_is_looked_at(keyed):
    # No file, an unknown model: still 401, so a client without the key learns nothing about the service.
    assert error_code(keyed.post("/predict?model=nope"), 401) == "unauthorized"
    assert error_code(keyed.post("/v2/models/nope/infer", content=b"{"), 401) == "unauthorized"


def test_probes_models_page_and_metadata_stay_open(keyed):
    for path in ("/health", "/ready", "/models", "/", "/v2", "/v2/health/live", "/v2/health/ready",
                 "/v2/models/mini_xception", "/metrics", "/openapi.json"):  # fmt: skip
        assert keyed.get(path).status_code == 200, path


def test_metrics_can_be_made_to_need_the_key(model_dir):
    with make_client(model_dir, api_key=KEY, metrics_need_key=True) as client:
        assert error_code(client.get("/metrics"), 401) == "unauthorized"
        assert client.get("/metrics", headers={"X-API-Key": KEY}).status_code == 200
        assert client.get("/health").status_code == 200


def test_without_a_key_everything_is_open(client, photo):
    assert client.post("/predict", files=photo).status_code == 200
    assert client.post("/predict", files=photo, headers={"X-API-Key": "anything"}).status_code == 200
    assert client.get("/metrics").status_code == 200


def test_metrics_need_key_without_a_key_leaves_metrics_open(model_dir):
    with make_client(model_dir, metrics_need_key=True) as client:
        assert client.get("/metrics").status_code == 200


def test_the_comparison_is_constant_time(monkeypatch):
    calls = []
    compare = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    security.check_api_key(KEY, KEY, None)
    with pytest.raises(security.Unauthorized):
        security.check_api_key(KEY, "wrong", "also wrong")
    assert calls == [(KEY.encode(), KEY.encode()), (b"wrong", KEY.encode()), (b"also wrong", KEY.encode())]


def test_openapi_declares_both_schemes_on_the_inference_routes(keyed):
    schema = keyed.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["APIKeyHeader"] == {"type": "apiKey", "in": "header", "name": "X-API-Key",
                                       "description": schemes["APIKeyHeader"]["description"]}  # fmt: skip
    assert schemes["Bearer"]["type"] == "http" and schemes["Bearer"]["scheme"] == "bearer"
    for path in ("/predict", "/v2/models/{model_id}/infer", "/v2/models/{model_id}/versions/{version}/infer"):
        security_of = schema["paths"][path]["post"]["security"]
        assert {"APIKeyHeader": []} in security_of and {"Bearer": []} in security_of, path
    assert "security" not in schema["paths"]["/health"]["get"]


def test_the_key_comes_from_the_environment_and_is_never_shown(monkeypatch):
    monkeypatch.setenv("MIEN_API_KEY", KEY)
    monkeypatch.setenv("MIEN_METRICS_NEED_KEY", "true")
    settings = Settings()
    assert settings.api_key.get_secret_value() == KEY and settings.metrics_need_key
    assert KEY not in repr(settings) and KEY not in str(settings.model_dump())


def test_a_short_key_is_refused_and_a_blank_one_means_no_key(monkeypatch):
    monkeypatch.setenv("MIEN_API_KEY", "short")
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings()
    monkeypatch.setenv("MIEN_API_KEY", "  ")
    assert Settings().api_key is None
