"""/predict with the ONNX detector: landmarks, detector choice (query and setting), min_face, threshold,
max_faces, alignment, and detector timings in the response and the metrics."""

from __future__ import annotations

import re

import numpy as np
import pytest

from benchmarks.detect_photos import group
from mien.service.align import align_face
from mien.service.config import Settings
from mien.service.detectors import Detections
from mien.service.pipeline import StageTimer, crop_faces, predict_faces
from tests.conftest import CPU, make_client
from tests.test_service_api import assert_error, astronaut, encode, upload


@pytest.fixture(scope="module")
def group_png() -> bytes:
    return encode(group().image, ".png")


def test_default_is_yunet_with_landmarks_and_aligned_faces(client, astronaut_jpeg):
    body = client.post("/predict", files=upload(astronaut_jpeg)).json()
    assert body["detector"] == "yunet" and body["aligned"] is True
    (face,) = body["faces"]
    assert len(face["landmarks"]) == 5 and all(len(p) == 2 for p in face["landmarks"])
    box = face["box"]
    for x, y in face["landmarks"]:
        assert box["x"] <= x <= box["x"] + box["width"] and box["y"] <= y <= box["y"] + box["height"]
    assert 0.5 <= face["detection_score"] <= 1.0
    assert body["timings_ms"]["detect"] > 0


@pytest.mark.parametrize(
    ("name", "ran", "landmarks"),
    [("yunet", "yunet", True), ("mtcnn", "mtcnn", True), ("haar", "haar", False), ("onnx", "yunet", True)],
)
def test_every_detector_name_finds_the_astronaut(client, astronaut_jpeg, name, ran, landmarks):
    body = client.post(f"/predict?detector={name}", files=upload(astronaut_jpeg)).json()
    assert body["detector"] == ran and len(body["faces"]) == 1  # onnx: an alias of the default landmark detector
    assert (body["faces"][0]["landmarks"] is not None) == landmarks == body["aligned"]
    box = body["faces"][0]["box"]
    assert 175 <= box["x"] + box["width"] / 2 <= 270 and 60 <= box["y"] + box["height"] / 2 <= 175


def test_an_unknown_detector_is_refused_with_the_known_names(client, astronaut_jpeg):
    response = client.post("/predict?detector=yolo", files=upload(astronaut_jpeg))
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request"
    assert all(name in response.json()["error"]["message"] for name in ("yunet", "mtcnn", "haar"))


def test_haar_by_query_has_no_landmarks(client, astronaut_jpeg):
    body = client.post("/predict?detector=haar", files=upload(astronaut_jpeg)).json()
    assert body["detector"] == "haar" and body["aligned"] is False
    (face,) = body["faces"]
    assert face["landmarks"] is None and face["detection_score"] is None


def test_haar_by_setting(model_dir, astronaut_jpeg):
    with make_client(model_dir, detector="haar") as c:
        body = c.post("/predict", files=upload(astronaut_jpeg)).json()
        assert body["detector"] == "haar" and body["faces"][0]["landmarks"] is None
        assert c.post("/predict?detector=onnx", files=upload(astronaut_jpeg)).json()["detector"] == "yunet"
    with make_client(model_dir, detector="mtcnn") as c:  # onnx follows a landmark default
        assert c.post("/predict?detector=onnx", files=upload(astronaut_jpeg)).json()["detector"] == "mtcnn"


def test_group_faces_come_largest_first_and_max_faces_caps_them(client, group_png):
    faces = client.post("/predict", files=upload(group_png, "image/png")).json()["faces"]
    assert len(faces) == 5
    areas = [f["box"]["width"] * f["box"]["height"] for f in faces]
    assert areas == sorted(areas, reverse=True)
    body = client.post("/predict?max_faces=2", files=upload(group_png, "image/png")).json()
    assert [f["box"] for f in body["faces"]] == [f["box"] for f in faces[:2]] and body["faces_omitted"] == 3


def test_max_faces_query_cannot_exceed_the_setting(model_dir, group_png):
    with make_client(model_dir, max_faces=3) as c:
        body = c.post("/predict?max_faces=10", files=upload(group_png, "image/png")).json()
        assert len(body["faces"]) == 3 and body["faces_omitted"] == 2


def test_min_face_skips_smaller_faces(client, group_png):
    faces = client.post("/predict?min_face=90", files=upload(group_png, "image/png")).json()["faces"]
    assert 1 <= len(faces) < 5
    assert all(max(f["box"]["width"], f["box"]["height"]) >= 90 for f in faces)
    haar = client.post("/predict?detector=haar&min_face=200", files=upload(group_png, "image/png")).json()
    assert haar["faces"] == []


def test_threshold_lets_weaker_candidates_through(client, astronaut_jpeg):
    strict = client.post("/predict", files=upload(astronaut_jpeg)).json()["faces"]
    loose = client.post("/predict?threshold=0.05", files=upload(astronaut_jpeg)).json()["faces"]
    assert len(loose) > len(strict) == 1
    assert all(f["detection_score"] >= 0.05 for f in loose)


def test_align_false_crops_the_box(client, astronaut_jpeg):
    body = client.post("/predict?align=false", files=upload(astronaut_jpeg)).json()
    assert body["aligned"] is False and body["faces"][0]["landmarks"] is not None


def test_detect_false_has_no_detector(client, astronaut_jpeg):
    body = client.post("/predict?detect=false", files=upload(astronaut_jpeg)).json()
    assert body["detector"] is None and body["faces"][0]["landmarks"] is None


@pytest.mark.parametrize("query", ["detector=yolo", "min_face=4", "min_face=x", "threshold=1.5", "threshold=0",
                                   "max_faces=0", "max_faces=5000", "align=perhaps"])  # fmt: skip
def test_bad_detection_parameters_are_400(client, astronaut_jpeg, query):
    message = assert_error(client.post(f"/predict?{query}", files=upload(astronaut_jpeg)), 400, "invalid_request")
    assert query.split("=")[0] in message


def test_detector_time_is_in_the_metrics_per_detector(client, astronaut_jpeg):
    def count(text: str, detector: str) -> float:
        found = re.search(rf'mien_detect_duration_seconds_count{{detector="{detector}"}} (\S+)', text)
        return float(found.group(1)) if found else 0.0

    before = client.get("/metrics").text
    client.post("/predict", files=upload(astronaut_jpeg))
    client.post("/predict?detector=haar", files=upload(astronaut_jpeg))
    after = client.get("/metrics").text
    assert count(after, "yunet") == count(before, "yunet") + 1
    assert count(after, "haar") == count(before, "haar") + 1
    assert 'mien_stage_duration_seconds_count{stage="detect"}' in after


def test_haar_only_service_refuses_onnx_by_name(model_dir, tmp_path, astronaut_jpeg):
    with make_client(model_dir, detector="haar", detector_dir=tmp_path) as c:
        assert c.post("/predict", files=upload(astronaut_jpeg)).status_code == 200
        message = assert_error(c.post("/predict?detector=onnx", files=upload(astronaut_jpeg)), 400,
                               "unavailable_detector")  # fmt: skip
        assert "mien export detector" in message


def test_onnx_default_without_detector_files_fails_at_start_up(model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="mien export detector"):
        with make_client(model_dir, detector_dir=tmp_path):
            pass


def test_detector_settings_are_validated():
    with pytest.raises(ValueError):
        Settings(detector="yolo")
    with pytest.raises(ValueError):
        Settings(face_threshold=1.0)
    with pytest.raises(ValueError):
        Settings(min_face=4)


class LandmarkStub:
    """A detector with one fixed face and landmarks (the astronaut's), to see what the classifier is fed."""

    box = np.array([[178, 58, 90, 117]], np.int32)
    marks = np.array([[[204, 100], [247, 103], [224, 129], [201, 139], [244, 142]]], np.float32)

    def detect(self, image: np.ndarray, min_face: int | None = None, threshold: float | None = None) -> Detections:
        return Detections(self.box, np.array([0.99], np.float32), self.marks)


def test_pipeline_classifies_the_aligned_crop_or_the_box_crop(model_dir):
    from mien.runtime import OnnxClassifier

    classifier = OnnxClassifier.from_path(model_dir / "mini_xception.onnx", providers=CPU)
    image, stub = astronaut(), LandmarkStub()
    aligned = predict_faces(image, classifier, stub, StageTimer())
    assert aligned.aligned and aligned.landmarks.shape == (1, 5, 2)
    np.testing.assert_allclose(aligned.probabilities, classifier.predict_crops([align_face(image, stub.marks[0])]),
                               atol=1e-6)  # fmt: skip
    boxed = predict_faces(image, classifier, stub, StageTimer(), align=False)
    assert not boxed.aligned
    expected = classifier.predict_crops(crop_faces(image, stub.box, classifier.spec.crop_margin))
    np.testing.assert_allclose(boxed.probabilities, expected, atol=1e-6)
