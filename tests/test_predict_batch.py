"""POST /predict/batch: several photos in one request, one result per photo in order, each photo answered exactly
as POST /predict would answer it (its prediction, or its own error), one bad photo never failing the others."""

from __future__ import annotations

import cv2
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from skimage import data

from mien.schemas import BatchResponse, PredictResponse
from mien.service.config import Settings
from tests.conftest import make_client

KEY = "batch-test-key-0123456789"


def encode(image_bgr: np.ndarray, ext: str = ".jpg") -> bytes:
    ok, buf = cv2.imencode(ext, image_bgr)
    assert ok
    return buf.tobytes()


def astronaut(ext: str = ".jpg") -> bytes:
    return encode(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR), ext)


def coffee() -> bytes:
    return encode(cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR))


GARBAGE = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()


def batch(*photos: tuple[str, bytes, str]) -> dict:
    return {"files": [("files", photo) for photo in photos]}


def without_timings(prediction: dict) -> dict:
    return {key: value for key, value in prediction.items() if key != "timings_ms"}


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def assert_error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    return body["error"]["message"]


def test_each_photo_gets_what_predict_answers_for_it_in_order(client):
    photos = [
        ("astronaut.jpg", astronaut(), "image/jpeg"),
        ("garbage.jpg", GARBAGE, "image/jpeg"),
        ("coffee.jpg", coffee(), "image/jpeg"),
        ("notes.txt", b"hello", "text/plain"),
        ("empty.jpg", b"", "image/jpeg"),
        ("astronaut.png", astronaut(".png"), "image/png"),
    ]
    response = client.post("/predict/batch", **batch(*photos))
    assert response.status_code == 200, response.text
    body = BatchResponse.model_validate(response.json())
    assert (body.model, body.provider) == ("mini_xception", "CPUExecutionProvider")
    assert [item.index for item in body.results] == list(range(len(photos)))
    assert [item.filename for item in body.results] == [name for name, _, _ in photos]

    for item, photo in zip(body.results, photos, strict=True):
        alone = client.post("/predict", files={"file": photo})
        assert item.status == alone.status_code, (item, alone.text)
        if alone.status_code == 200:
            assert item.error is None
            assert without_timings(item.prediction.model_dump(mode="json")) == without_timings(alone.json())
        else:
            assert item.prediction is None
            assert item.error.model_dump() == alone.json()["error"]  # the same code and the same message
    assert [item.status for item in body.results] == [200, 400, 200, 415, 400, 200]
    assert [item.error.code for item in body.results if item.error] == ["bad_image", "unsupported_media_type",
                                                                         "empty_file"]  # fmt: skip
    assert len(body.results[0].prediction.faces) == 1 and body.results[2].prediction.faces == []


def test_one_photo_is_a_batch_of_one(client):
    response = client.post("/predict/batch", **batch(("a.jpg", astronaut(), "image/jpeg")))
    assert response.status_code == 200, response.text
    [item] = response.json()["results"]
    assert item["status"] == 200 and len(PredictResponse.model_validate(item["prediction"]).faces) == 1


def test_query_parameters_apply_to_every_photo(client):
    photos = [("a.jpg", astronaut(), "image/jpeg"), ("b.jpg", coffee(), "image/jpeg")]
    body = client.post("/predict/batch?detect=false&model=mini_xception", **batch(*photos)).json()
    for item in body["results"]:
        prediction = item["prediction"]
        assert prediction["detector"] is None and len(prediction["faces"]) == 1  # the whole image is one face


def test_an_unexpected_failure_on_one_photo_is_that_photos_internal_error(client, monkeypatch, caplog):
    import mien.service.routes.predict as predict_module

    real = predict_module.decode_photo

    def fails_on_coffee(data, *args, **kwargs):
        if data == coffee():
            raise RuntimeError("a bug met on this photo only")
        return real(data, *args, **kwargs)

    monkeypatch.setattr(predict_module, "decode_photo", fails_on_coffee)
    photos = [
        ("a.jpg", astronaut(), "image/jpeg"),
        ("b.jpg", coffee(), "image/jpeg"),
        ("c.jpg", astronaut(), "image/jpeg"),
    ]
    response = client.post("/predict/batch", **batch(*photos))
    assert response.status_code == 200, response.text
    statuses = [(item["status"], (item["error"] or {}).get("code")) for item in response.json()["results"]]
    assert statuses == [(200, None), (500, "internal_error"), (200, None)]
    assert any("RuntimeError" in record.getMessage() for record in caplog.records)  # logged for the operator


# --- whole-request errors: the normal error body --------------------------------------------------


def test_no_files_is_missing_file(client):
    message = assert_error(client.post("/predict/batch"), 400, "missing_file")
    assert "'files'" in message
    assert_error(client.post("/predict/batch", data={"files": "photo.jpg"}), 400, "missing_file")
    # The single-photo field is not the batch's.
    assert_error(client.post("/predict/batch", files={"file": ("a.jpg", astronaut(), "image/jpeg")}), 400,
                 "missing_file")  # fmt: skip


def test_too_many_files(model_dir):
    with make_client(model_dir, max_batch_files=2) as c:
        photos = [(f"{i}.jpg", astronaut(), "image/jpeg") for i in range(3)]
        message = assert_error(c.post("/predict/batch", **batch(*photos)), 400, "too_many_files")
        assert "3 files" in message and "MIEN_MAX_BATCH_FILES" in message
        assert c.post("/predict/batch", **batch(*photos[:2])).status_code == 200


def test_unknown_model_and_unavailable_detector_fail_the_whole_request(client):
    photos = batch(("a.jpg", astronaut(), "image/jpeg"))
    assert "resnet9000" in assert_error(client.post("/predict/batch?model=resnet9000", **photos), 404, "unknown_model")
    assert_error(client.post("/predict/batch?detect=maybe", **photos), 400, "invalid_request")
    assert_error(client.post("/predict/batch?min_confidence=2", **photos), 400, "invalid_request")


def test_the_api_key_is_needed_when_set(model_dir):
    photos = batch(("a.jpg", astronaut(), "image/jpeg"))
    with make_client(model_dir, api_key=KEY) as c:
        assert_error(c.post("/predict/batch", **photos), 401, "unauthorized")
        assert c.post("/predict/batch", headers={"X-API-Key": KEY}, **photos).status_code == 200
        assert c.post("/predict/batch", headers={"Authorization": f"Bearer {KEY}"}, **photos).status_code == 200


# --- sizes ----------------------------------------------------------------------------------------


def test_the_body_limit_is_the_batchs_own():
    settings = Settings(max_upload_bytes=1000, max_batch_files=4)
    assert settings.batch_body_bytes() == 4000
    assert Settings(max_upload_bytes=1000, max_batch_bytes=2500).batch_body_bytes() == 2500


def test_a_batch_bigger_than_one_files_limit_passes_and_each_file_keeps_its_limit(model_dir):
    small = astronaut()  # about 100 KB
    big = astronaut(".png")  # about 460 KB
    with make_client(model_dir, max_upload_bytes=200_000) as c:
        photos = [("a.jpg", small, "image/jpeg"), ("big.png", big, "image/png"), ("b.jpg", small, "image/jpeg")]
        response = c.post("/predict/batch", **batch(*photos))  # 660 KB: over one file's limit, within 16 × 200 KB
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert [item["status"] for item in results] == [200, 413, 200]
        assert results[1]["error"]["code"] == "too_large" and "MIEN_MAX_UPLOAD_BYTES" in results[1]["error"]["message"]
        # The same 660 KB to /predict is refused whole, from its own body limit.
        assert_error(c.post("/predict", files={"file": ("big.png", big + big, "image/png")}), 413, "too_large")


def test_a_batch_body_over_the_batch_limit_is_refused(model_dir):
    with make_client(model_dir, max_upload_bytes=200_000, max_batch_bytes=150_000) as c:
        photos = [(f"{i}.jpg", astronaut(), "image/jpeg") for i in range(3)]  # 300 KB > 150 KB + 64 KiB
        message = assert_error(c.post("/predict/batch", **batch(*photos)), 413, "too_large")
        assert "MIEN_MAX_BATCH_BYTES" in message


# --- metrics and OpenAPI --------------------------------------------------------------------------


def test_a_batch_is_counted_like_predict_and_its_photos_faces_are_recorded(client):
    before = client.get("/metrics").text
    photos = [
        ("a.jpg", astronaut(), "image/jpeg"),
        ("g.jpg", GARBAGE, "image/jpeg"),
        ("b.jpg", astronaut(), "image/jpeg"),
    ]
    assert client.post("/predict/batch", **batch(*photos)).status_code == 200
    after = client.get("/metrics").text
    counted = "mien_predict_requests_total"
    assert (
        metric(after, counted, model="mini_xception", status="200")
        == metric(before, counted, model="mini_xception", status="200") + 1
    )
    faces = "mien_faces_per_image_count"  # one observation per photo that was read
    assert metric(after, faces, model="mini_xception") == metric(before, faces, model="mini_xception") + 2
    assert (
        metric(after, "mien_faces_per_image_sum", model="mini_xception")
        == metric(before, "mien_faces_per_image_sum", model="mini_xception") + 2
    )


def test_openapi_documents_the_batch_route(client):
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/predict/batch"]["post"]
    params = {p["name"] for p in operation["parameters"]}
    assert {"model", "detect", "detector", "min_face", "threshold", "max_faces", "align", "detect_max_pixels",
            "min_confidence"} <= params  # fmt: skip
    assert params == {p["name"] for p in spec["paths"]["/predict"]["post"]["parameters"]}  # the same parameters
    assert "BatchResponse" in str(operation["responses"]["200"])
    assert {"400", "401", "404", "413", "503"} <= set(operation["responses"])
