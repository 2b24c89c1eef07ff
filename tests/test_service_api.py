"""POST /predict through the HTTP API: real photos, the response shape, and every kind of bad input."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from skimage import data

from tests.conftest import make_client

# Where the astronaut's face is in skimage's 512×512 photo (checked by eye on the image).
FACE_X, FACE_Y = (170, 275), (55, 170)


def encode(image_bgr: np.ndarray, ext: str = ".jpg") -> bytes:
    ok, buf = cv2.imencode(ext, image_bgr)
    assert ok
    return buf.tobytes()


def astronaut() -> np.ndarray:
    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)


def upload(content: bytes, media_type: str = "image/jpeg", name: str = "photo.jpg") -> dict:
    return {"file": (name, content, media_type)}


def assert_error(response, status: int, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]["message"]


def assert_face(face: dict, labels: list[str]) -> None:
    assert set(face) == {"box", "label", "score", "uncertain", "probabilities", "landmarks", "detection_score"}
    assert face["uncertain"] is False  # no min_confidence: every face is labelled
    probs = face["probabilities"]
    assert list(probs) == labels
    assert abs(sum(probs.values()) - 1.0) < 1e-5
    assert all(0.0 <= p <= 1.0 for p in probs.values())
    assert face["label"] == max(probs, key=probs.get)
    assert face["score"] == pytest.approx(probs[face["label"]])


# --- real photos --------------------------------------------------------------------------------


@pytest.mark.parametrize("ext,media_type", [(".jpg", "image/jpeg"), (".png", "image/png"), (".webp", "image/webp"),
                                            (".bmp", "image/bmp")])  # fmt: skip
def test_astronaut_has_one_face_where_her_face_is(client, ext, media_type):
    response = client.post("/predict", files=upload(encode(astronaut(), ext), media_type, "astronaut" + ext))
    assert response.status_code == 200, response.text
    body = response.json()
    labels = client.get("/models").json()["models"][0]["labels"]
    assert body["model"] == "mini_xception"
    assert body["model_version"]
    assert body["provider"] == "CPUExecutionProvider"
    assert body["image"] == {"width": 512, "height": 512}
    assert len(body["faces"]) == 1
    face = body["faces"][0]
    assert_face(face, labels)
    box = face["box"]
    centre = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    assert FACE_X[0] <= centre[0] <= FACE_X[1] and FACE_Y[0] <= centre[1] <= FACE_Y[1], box
    assert 60 <= box["width"] <= 140 and 60 <= box["height"] <= 140, box
    assert box["x"] >= FACE_X[0] - 10 and box["x"] + box["width"] <= FACE_X[1] + 10, box
    timings = body["timings_ms"]
    assert set(timings) == {"decode", "detect", "preprocess", "classify", "total"}
    assert all(v >= 0 for v in timings.values())
    assert timings["total"] >= max(timings["decode"], timings["detect"], timings["classify"])


def test_coffee_has_no_face(client):
    response = client.post("/predict", files=upload(encode(cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR))))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["faces"] == []
    assert body["image"] == {"width": 600, "height": 400}


def test_detect_false_classifies_the_whole_image(client):
    response = client.post("/predict?detect=false", files=upload(encode(data.coffee()[:, :, ::-1].copy())))
    assert response.status_code == 200, response.text
    faces = response.json()["faces"]
    assert len(faces) == 1
    assert faces[0]["box"] == {"x": 0, "y": 0, "width": 600, "height": 400}
    assert_face(faces[0], list(faces[0]["probabilities"]))


def test_model_can_be_named(client, astronaut_jpeg):
    response = client.post("/predict?model=mini_xception", files=upload(astronaut_jpeg))
    assert response.status_code == 200
    assert response.json()["model"] == "mini_xception"


def test_several_faces_come_largest_first_and_are_capped(model_dir):
    # Two astronauts side by side, the second smaller: two faces, the bigger one first.
    small = cv2.resize(astronaut(), (384, 384))
    canvas = np.zeros((512, 384 + 512, 3), np.uint8)
    canvas[:384, :384] = small
    canvas[:, 384:] = astronaut()
    photo = encode(canvas, ".png")
    with make_client(model_dir) as c:
        faces = c.post("/predict", files=upload(photo, "image/png")).json()["faces"]
        assert len(faces) == 2
        assert faces[0]["box"]["width"] > faces[1]["box"]["width"]
        assert faces[0]["box"]["x"] > 384  # the full-size astronaut on the right
        metrics = c.get("/metrics").text
        assert 'mien_batch_size_bucket{le="2.0",model="mini_xception"} 1.0' in metrics
    with make_client(model_dir, max_faces=1) as c:
        body = c.post("/predict", files=upload(photo, "image/png")).json()
        assert len(body["faces"]) == 1 and body["faces_omitted"] == 1
        assert body["faces"][0]["box"] == faces[0]["box"]


def test_exif_orientation_is_applied(client):
    """A phone photo stored sideways with an EXIF 'rotate 90° clockwise' tag is upright when served."""
    from PIL import Image

    sideways = cv2.rotate(astronaut()[:, :400], cv2.ROTATE_90_COUNTERCLOCKWISE)  # stored 512 wide, 400 high
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° CW to display
    buf = io.BytesIO()
    Image.fromarray(cv2.cvtColor(sideways, cv2.COLOR_BGR2RGB)).save(buf, "JPEG", exif=exif, quality=95)
    body = client.post("/predict", files=upload(buf.getvalue())).json()
    assert body["image"] == {"width": 400, "height": 512}
    assert len(body["faces"]) == 1  # stored sideways, neither detector finds it


def test_octet_stream_uploads_are_sniffed(client, astronaut_jpeg):
    response = client.post("/predict", files=upload(astronaut_jpeg, "application/octet-stream", "blob"))
    assert response.status_code == 200
    assert len(response.json()["faces"]) == 1


# --- bad input: always a 4xx in the one error shape, never a 5xx ---------------------------------


def test_garbage_bytes_are_400(client):
    garbage = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    message = assert_error(client.post("/predict", files=upload(garbage)), 400, "bad_image")
    assert "JPEG, PNG, WebP, BMP or GIF" in message


def test_truncated_image_is_400(client, astronaut_jpeg):
    assert_error(client.post("/predict", files=upload(astronaut_jpeg[:1500])), 400, "bad_image")


def test_empty_upload_is_400(client):
    message = assert_error(client.post("/predict", files=upload(b"")), 400, "empty_file")
    assert "empty" in message


@pytest.mark.parametrize("send", [{"data": {"image": "x"}}, {"files": {"image": ("a.jpg", b"123", "image/jpeg")}}, {}])
def test_missing_file_field_is_400_naming_the_field(client, send):
    message = assert_error(client.post("/predict", **send), 400, "missing_file")
    assert "'file'" in message


def test_declared_non_image_type_is_415(client, astronaut_jpeg):
    message = assert_error(client.post("/predict", files=upload(b"hello", "text/plain", "a.txt")), 415)
    assert "text/plain" in message
    assert_error(client.post("/predict", files=upload(astronaut_jpeg, "image/heic", "a.heic")), 415)


@pytest.mark.parametrize("content,named", [(b"II*\x00" + bytes(200), "TIFF"), (b"%PDF-1.7\n" + bytes(200), "PDF"),
                                           (b"name,score\nann,3\n", "text")])  # fmt: skip
def test_bytes_that_sniff_as_another_format_are_415(client, content, named):
    message = assert_error(client.post("/predict", files=upload(content, "image/png", "x.png")), 415)
    assert named in message


def test_file_over_max_upload_bytes_is_413(model_dir, astronaut_jpeg):
    with make_client(model_dir, max_upload_bytes=1000) as c:
        # Over the limit by far: refused from the Content-Length header, before the body is read.
        message = assert_error(c.post("/predict", files=upload(astronaut_jpeg)), 413, "too_large")
        assert "MIEN_MAX_UPLOAD_BYTES" in message
        # A small body whose file is still over the limit: refused after reading the part.
        message = assert_error(c.post("/predict", files=upload(astronaut_jpeg[:5000])), 413, "too_large")
        assert "1000 bytes" in message


def test_chunked_body_over_the_limit_is_413_while_streaming(model_dir, astronaut_jpeg):
    body = (b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + astronaut_jpeg + b"\r\n--B--\r\n")  # fmt: skip
    chunks = (body[i : i + 8192] for i in range(0, len(body), 8192))  # no Content-Length: chunked
    with make_client(model_dir, max_upload_bytes=1000) as c:
        response = c.post("/predict", content=chunks, headers={"content-type": "multipart/form-data; boundary=B"})
        assert "content-length" not in response.request.headers
        assert_error(response, 413, "too_large")


def test_too_many_pixels_is_413(model_dir, astronaut_jpeg):
    with make_client(model_dir, max_pixels=100_000) as c:
        message = assert_error(c.post("/predict", files=upload(astronaut_jpeg)), 413, "too_many_pixels")
        assert "512×512" in message and "MIEN_MAX_PIXELS" in message


def test_unknown_model_is_404_listing_the_available_ones(client, astronaut_jpeg):
    message = assert_error(client.post("/predict?model=resnet9000", files=upload(astronaut_jpeg)), 404, "unknown_model")
    assert "resnet9000" in message and "mini_xception" in message


@pytest.mark.parametrize("query", ["detect=maybe", "detect=", "model=" + "x" * 500])
def test_bad_query_parameters_are_400(client, astronaut_jpeg, query):
    message = assert_error(client.post(f"/predict?{query}", files=upload(astronaut_jpeg)), 400, "invalid_request")
    assert query.split("=")[0] in message


def test_malformed_multipart_is_400(client):
    response = client.post("/predict", content=b"--X\r\nnonsense", headers={"content-type": "multipart/form-data"})
    assert_error(response, 400)


def test_unknown_route_and_method_use_the_error_shape(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/predict"), 405, "method_not_allowed")
