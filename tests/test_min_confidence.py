"""min_confidence (query and MIEN_MIN_CONFIDENCE): a face whose top probability is below it keeps its
probabilities and score but gets ``label: null`` and ``uncertain: true``; without it every face is labelled."""

from __future__ import annotations

import cv2
import pytest
from pydantic import ValidationError
from skimage import data

from mien.service.config import Settings
from tests.conftest import make_client


@pytest.fixture(scope="module")
def photo() -> dict:
    jpeg = cv2.imencode(".jpg", cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))[1].tobytes()
    return {"file": ("astronaut.jpg", jpeg, "image/jpeg")}


@pytest.fixture(scope="module")
def baseline(client, photo) -> dict:
    """The astronaut's one face with no min_confidence."""
    response = client.post("/predict", files=photo)
    assert response.status_code == 200, response.text
    [face] = response.json()["faces"]
    assert face["uncertain"] is False and face["label"] == max(face["probabilities"], key=face["probabilities"].get)
    assert face["score"] < 1.0  # so that min_confidence=1 makes it uncertain
    return face


def the_face(response) -> dict:
    assert response.status_code == 200, response.text
    [face] = response.json()["faces"]
    return face


def test_a_face_at_or_above_the_threshold_is_labelled(client, photo, baseline):
    for threshold in (baseline["score"], baseline["score"] / 2):
        face = the_face(client.post("/predict", files=photo, params={"min_confidence": threshold}))
        assert face == baseline


def test_a_face_below_the_threshold_is_uncertain_with_all_its_probabilities(client, photo, baseline):
    face = the_face(client.post("/predict", files=photo, params={"min_confidence": 1.0}))
    assert face["label"] is None and face["uncertain"] is True
    assert face["score"] == baseline["score"] and face["probabilities"] == baseline["probabilities"]
    assert face["box"] == baseline["box"]


def test_the_batch_route_takes_it_too(client, photo, baseline):
    files = [("files", photo["file"]), ("files", photo["file"])]
    body = client.post("/predict/batch", files=files, params={"min_confidence": 1.0}).json()
    for item in body["results"]:
        [face] = item["prediction"]["faces"]
        assert face["label"] is None and face["uncertain"] is True and face["score"] == baseline["score"]


@pytest.mark.parametrize("value", ["0", "-0.2", "1.01", "7", "high", "nan", "inf", ""])
def test_invalid_values_are_the_usual_invalid_request(client, photo, value):
    for url in ("/predict", "/predict/batch"):
        files = photo if url == "/predict" else [("files", photo["file"])]
        response = client.post(url, files=files, params={"min_confidence": value})
        if value == "" and response.status_code == 200:
            continue  # an empty value is no value, as for every other optional query parameter
        assert response.status_code == 400, (url, value, response.text)
        body = response.json()
        assert body["error"]["code"] == "invalid_request" and "min_confidence" in body["error"]["message"]


def test_the_setting_is_the_default_and_the_query_overrides_it(model_dir, photo, baseline):
    with make_client(model_dir, min_confidence=1.0) as c:
        face = the_face(c.post("/predict", files=photo))
        assert face["label"] is None and face["uncertain"] is True
        face = the_face(c.post("/predict", files=photo, params={"min_confidence": baseline["score"]}))
        assert face["label"] == baseline["label"] and face["uncertain"] is False


def test_the_setting_is_read_from_the_environment_and_checked(monkeypatch):
    assert Settings().min_confidence is None  # unset: off
    monkeypatch.setenv("MIEN_MIN_CONFIDENCE", "0.4")
    assert Settings().min_confidence == 0.4
    for bad in ("0", "1.5", "-1"):
        monkeypatch.setenv("MIEN_MIN_CONFIDENCE", bad)
        with pytest.raises(ValidationError, match="min_confidence"):
            Settings()


def test_openapi_documents_it(client):
    spec = client.get("/openapi.json").json()
    for path in ("/predict", "/predict/batch"):
        [param] = [p for p in spec["paths"][path]["post"]["parameters"] if p["name"] == "min_confidence"]
        assert "MIEN_MIN_CONFIDENCE" in param["description"]
    face = spec["components"]["schemas"]["Face"]
    assert "uncertain" in face["properties"] and "null" in str(face["properties"]["label"])
