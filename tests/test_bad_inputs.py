"""The catalogue of bad and awkward inputs (docs/robustness.md): each gets its own status and error code, or a
correct answer when the input is a valid image; none gets a 5xx, and the service answers afterwards.

Every input is made in code (tests/bad_media.py), from scikit-image's astronaut photo (one face) and coffee photo
(none). An upload over the size limit: tests/test_upload_limit.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.bad_media import (
    astronaut,
    astronaut_pil,
    encode,
    garbage,
    gif_animated,
    gif_claiming,
    jpeg_claiming,
    jpeg_exif,
    panorama,
    pil_bytes,
    png_16bit,
    png_claiming,
    png_rgba,
    video,
    wav,
)
from tests.conftest import CPU, make_client

ROBUSTNESS_DOC = Path(__file__).resolve().parents[1] / "docs" / "robustness.md"
# Where the astronaut's face is in skimage's 512×512 photo (as in test_service_api.py).
FACE_X, FACE_Y = (170, 275), (55, 170)
V2_INFER = "/v2/models/mini_xception/infer"
BATCH = "/predict/batch"
VIDEO = "/analyze/video"


def one_track(body: dict) -> None:
    [track] = body["tracks"]  # (the catalogue's model is the tests' tiny one: its labels mean nothing)
    assert track["seconds"] == pytest.approx(3.0) and sum(track["shares"].values()) == pytest.approx(1.0), track
    assert body["video"]["frames_sampled"] == 15 and len(body["timeline"]) == 15


def no_tracks(body: dict) -> None:
    assert body["tracks"] == [] and body["timeline"] == [] and body["video"]["frames_sampled"] == 15


# A body that declares 300 MiB: refused from Content-Length, before a byte is read (MIEN_MAX_VIDEO_BYTES: 200 MiB).
VIDEO_DECLARED_TOO_BIG = {"content": b"--B\r\n",
                          "headers": {"content-type": "multipart/form-data; boundary=B",
                                      "content-length": str(300 * 1024 * 1024)}}  # fmt: skip


# --- the catalogue -------------------------------------------------------------------------------


def files(content: bytes, media_type: str = "image/jpeg", name: str = "photo.jpg", field: str = "file") -> dict:
    return {"files": {field: (name, content, media_type)}}


def one_face_at_the_astronaut(body: dict) -> None:
    assert len(body["faces"]) == 1, body
    box = body["faces"][0]["box"]
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    assert FACE_X[0] < cx < FACE_X[1] and FACE_Y[0] < cy < FACE_Y[1], box


def size_is(width: int, height: int) -> Callable[[dict], None]:
    def check(body: dict) -> None:
        assert body["image"] == {"width": width, "height": height}

    return check


def all_of(*checks: Callable[[dict], None]) -> Callable[[dict], None]:
    def check(body: dict) -> None:
        for each in checks:
            each(body)

    return check


def no_faces(body: dict) -> None:
    assert body["faces"] == [] and body["faces_omitted"] == 0


def message_has(*parts: str) -> Callable[[dict], None]:
    def check(body: dict) -> None:
        for part in parts:
            assert part in body["error"]["message"], (part, body)

    return check


@dataclass(frozen=True)
class Case:
    id: str
    request: Callable[[], dict]  # keyword arguments for TestClient.request, besides method and url
    status: int
    code: str | None  # the error code; None for a 200
    url: str = "/predict"
    check: Callable[[dict], None] | None = None
    method: str = "POST"
    no_decode: bool = False  # refused from the header alone: OpenCV's decoder must not be called
    params: dict[str, str] = field(default_factory=dict)


def _panorama_face(body: dict) -> None:
    assert body["image"] == {"width": 10_000, "height": 512}
    assert len(body["faces"]) == 1
    box = body["faces"][0]["box"]
    assert 7000 + FACE_X[0] < box["x"] + box["width"] / 2 < 7000 + FACE_X[1], box


def _one_pixel_whole_image(body: dict) -> None:
    assert body["image"] == {"width": 1, "height": 1} and body["detector"] is None
    assert len(body["faces"]) == 1 and body["faces"][0]["box"] == {"x": 0, "y": 0, "width": 1, "height": 1}


def batch(*photos: tuple[str, bytes, str]) -> dict:
    """Several files in the repeated field 'files' of POST /predict/batch."""
    return {"files": [("files", photo) for photo in photos]}


def astronaut_jpeg(name: str = "a.jpg") -> tuple[str, bytes, str]:
    return name, encode(astronaut(), ".jpg"), "image/jpeg"


def batch_results(*expected: tuple[int, str | None]) -> Callable[[dict], None]:
    """Each file's (status, error code), in the order sent; the good ones find the astronaut."""

    def check(body: dict) -> None:
        got = [(item["status"], (item["error"] or {}).get("code")) for item in body["results"]]
        assert got == list(expected), body
        assert [item["index"] for item in body["results"]] == list(range(len(expected)))
        for item in body["results"]:
            if item["status"] == 200:
                one_face_at_the_astronaut(item["prediction"])
            else:
                assert item["prediction"] is None and item["error"]["message"].strip()

    return check


MULTIPART_NO_BOUNDARY = {"content": b"--x\r\n\r\n", "headers": {"content-type": "multipart/form-data"}}
INFER_OK = {"inputs": [{"name": "input", "shape": [1, 1, 48, 48], "datatype": "FP32", "data": [0.5] * 48 * 48}]}

# One case per line where it fits: the table reads better than the formatter's one argument per line.
# fmt: off
CATALOGUE = [
    # Valid images in every supported form: a correct answer, the face where a person sees it.
    Case("png-16-bit", lambda: files(png_16bit(), "image/png", "a.png"), 200, None, check=one_face_at_the_astronaut),
    Case("png-rgba", lambda: files(png_rgba(), "image/png", "a.png"), 200, None, check=one_face_at_the_astronaut),
    Case("png-palette", lambda: files(pil_bytes(astronaut_pil().convert("P"), "PNG"), "image/png", "a.png"), 200,
         None, check=one_face_at_the_astronaut),
    Case("png-grayscale", lambda: files(encode(cv2.cvtColor(astronaut(), cv2.COLOR_BGR2GRAY), ".png"), "image/png"),
         200, None, check=one_face_at_the_astronaut),
    Case("jpeg-cmyk", lambda: files(pil_bytes(astronaut_pil().convert("CMYK"), "JPEG", quality=95)), 200, None,
         check=one_face_at_the_astronaut),
    Case("jpeg-grayscale", lambda: files(encode(cv2.cvtColor(astronaut(), cv2.COLOR_BGR2GRAY), ".jpg")), 200, None,
         check=one_face_at_the_astronaut),
    Case("jpeg-progressive", lambda: files(encode(astronaut(), ".jpg", (cv2.IMWRITE_JPEG_PROGRESSIVE, 1))), 200,
         None, check=one_face_at_the_astronaut),
    Case("gif-animated-first-frame", lambda: files(gif_animated(face_first=True), "image/gif", "a.gif"), 200, None,
         check=all_of(size_is(512, 512), one_face_at_the_astronaut)),
    Case("gif-animated-face-only-in-second-frame", lambda: files(gif_animated(face_first=False), "image/gif", "a.gif"),
         200, None, check=all_of(size_is(512, 512), no_faces)),
    Case("webp", lambda: files(encode(astronaut(), ".webp"), "image/webp", "a.webp"), 200, None,
         check=one_face_at_the_astronaut),
    Case("bmp", lambda: files(encode(astronaut(), ".bmp"), "image/bmp", "a.bmp"), 200, None,
         check=one_face_at_the_astronaut),
    Case("jpeg-exif-rotate-90", lambda: files(jpeg_exif(6)), 200, None,
         check=all_of(size_is(512, 512), one_face_at_the_astronaut)),
    Case("jpeg-exif-rotate-180", lambda: files(jpeg_exif(3)), 200, None, check=one_face_at_the_astronaut),
    Case("jpeg-exif-rotate-270", lambda: files(jpeg_exif(8)), 200, None, check=one_face_at_the_astronaut),
    Case("one-pixel", lambda: files(encode(np.zeros((1, 1, 3), np.uint8), ".png"), "image/png"), 200, None,
         check=all_of(size_is(1, 1), no_faces)),
    Case("one-pixel-detect-false", lambda: files(encode(np.zeros((1, 1, 3), np.uint8), ".png"), "image/png"), 200,
         None, params={"detect": "false"}, check=_one_pixel_whole_image),
    Case("panorama-10000-wide", lambda: files(panorama()), 200, None, check=_panorama_face),
    Case("octet-stream-is-sniffed", lambda: files(encode(astronaut(), ".png"), "application/octet-stream", "blob"),
         200, None, check=one_face_at_the_astronaut),
    Case("filename-with-path", lambda: files(encode(astronaut(), ".jpg"), name="../../etc/passwd.jpg"), 200, None,
         check=one_face_at_the_astronaut),
    Case("unknown-query-parameter", lambda: files(encode(astronaut(), ".jpg")), 200, None,
         params={"colour": "blue"}, check=one_face_at_the_astronaut),
    # Not an image, or not one that can be decoded.
    Case("garbage-bytes", lambda: files(garbage()), 400, "bad_image", check=message_has("JPEG, PNG, WebP, BMP or GIF")),
    Case("empty-file", lambda: files(b""), 400, "empty_file", check=message_has("empty")),
    Case("truncated-jpeg", lambda: files(encode(astronaut(), ".jpg")[:20_000]), 400, "bad_image",
         check=message_has("truncated")),
    Case("truncated-png", lambda: files(encode(astronaut(), ".png")[:30_000], "image/png"), 400, "bad_image",
         check=message_has("truncated")),
    Case("png-declaring-0x0", lambda: files(png_claiming(0, 0), "image/png"), 400, "bad_image", no_decode=True),
    Case("tiff", lambda: files(b"II*\x00" + bytes(500), "application/octet-stream"), 415, "unsupported_media_type",
         check=message_has("TIFF")),
    Case("pdf-declared-as-jpeg", lambda: files(b"%PDF-1.7\n" + bytes(500)), 415, "unsupported_media_type",
         check=message_has("PDF")),
    Case("non-image-content-type", lambda: files(b"hello", "text/plain", "a.txt"), 415, "unsupported_media_type",
         check=message_has("text/plain")),
    # Too big: refused from the header, before anything is decoded, or from the body's length.
    Case("png-claiming-50000x50000", lambda: files(png_claiming(50_000, 50_000), "image/png"), 413, "too_many_pixels",
         no_decode=True, check=message_has("50000×50000", "MIEN_MAX_PIXELS")),
    Case("jpeg-claiming-60000x60000", lambda: files(jpeg_claiming(60_000, 60_000)), 413, "too_many_pixels",
         no_decode=True, check=message_has("60000×60000")),
    Case("gif-claiming-65535x65535", lambda: files(gif_claiming(65_535, 65_535), "image/gif"), 413, "too_many_pixels",
         no_decode=True),
    Case("body-over-the-limit", lambda: files(bytes(11 * 1024 * 1024)), 413, "too_large",
         check=message_has("MIEN_MAX_UPLOAD_BYTES")),
    # The request itself is wrong.
    Case("wrong-field-name", lambda: files(encode(astronaut(), ".jpg"), field="image"), 400, "missing_file",
         check=message_has("'file'")),
    Case("two-files", lambda: {"files": [("file", ("a.jpg", encode(astronaut(), ".jpg"), "image/jpeg")),
                                         ("file", ("b.jpg", encode(astronaut(), ".jpg"), "image/jpeg"))]},
         400, "too_many_files", check=message_has("one image per request")),
    Case("missing-file", lambda: {}, 400, "missing_file"),
    Case("text-field-instead-of-file", lambda: {"data": {"file": "photo.jpg"}}, 400, "missing_file"),
    Case("raw-image-body-not-multipart", lambda: {"content": encode(astronaut(), ".jpg"),
                                                  "headers": {"content-type": "image/jpeg"}}, 400, "missing_file",
         check=message_has("multipart/form-data")),
    Case("multipart-without-boundary", lambda: MULTIPART_NO_BOUNDARY, 400, "bad_multipart",
         check=message_has("boundary", "curl -F")),
    Case("unknown-model", lambda: files(b"x"), 404, "unknown_model", params={"model": "resnet9000"},
         check=message_has("resnet9000", "mini_xception")),
    Case("model-path-traversal", lambda: files(b"x"), 404, "unknown_model", params={"model": "../x"},
         check=message_has("'../x'", "mini_xception")),
    Case("model-absolute-path", lambda: files(b"x"), 404, "unknown_model", params={"model": "/etc/passwd"}),
    Case("model-with-spaces", lambda: files(b"x"), 404, "unknown_model", params={"model": "mini xception"}),
    Case("model-with-newline", lambda: files(b"x"), 404, "unknown_model", params={"model": "a\nINFO forged log"},
         check=message_has("'a\\nINFO forged log'")),
    Case("model-name-too-long", lambda: files(b"x"), 400, "invalid_request", params={"model": "x" * 500}),
    Case("detect-maybe", lambda: files(b"x"), 400, "invalid_request", params={"detect": "maybe"},
         check=message_has("detect")),
    Case("detector-unknown", lambda: files(b"x"), 400, "invalid_request", params={"detector": "yolo"},
         check=message_has("detector")),
    Case("min-face-too-small", lambda: files(b"x"), 400, "invalid_request", params={"min_face": "1"}),
    Case("max-faces-zero", lambda: files(b"x"), 400, "invalid_request", params={"max_faces": "0"}),
    Case("threshold-not-a-number", lambda: files(b"x"), 400, "invalid_request", params={"threshold": "high"}),
    Case("huge-query-string", lambda: files(b"x"), 414, "uri_too_long", params={"pad": "a" * 60_000},
         check=message_has("MIEN_MAX_QUERY_BYTES")),
    Case("get-instead-of-post", lambda: {}, 405, "method_not_allowed", method="GET",
         check=message_has("GET /predict", "POST")),
    Case("unknown-path", lambda: files(b"x"), 404, "not_found", url="/predictions",
         check=message_has("POST /predictions", "/docs")),
    # Several photos in one POST /predict/batch: each gets its own result, a bad one never fails the others.
    Case("batch-one-corrupt-among-good", lambda: batch(astronaut_jpeg(), ("bad.jpg", garbage(), "image/jpeg"),
                                                       astronaut_jpeg("b.jpg")), 200, None, url=BATCH,
         check=batch_results((200, None), (400, "bad_image"), (200, None))),
    Case("batch-file-with-wrong-media-type", lambda: batch(astronaut_jpeg(), ("a.txt", b"hello", "text/plain")),
         200, None, url=BATCH, check=batch_results((200, None), (415, "unsupported_media_type"))),
    Case("batch-file-over-the-upload-limit", lambda: batch(("big.jpg", bytes(11 * 1024 * 1024), "image/jpeg"),
                                                           astronaut_jpeg()), 200, None, url=BATCH,
         check=batch_results((413, "too_large"), (200, None))),
    Case("batch-empty", lambda: {}, 400, "missing_file", url=BATCH, check=message_has("'files'")),
    Case("batch-files-in-the-field-file", lambda: files(encode(astronaut(), ".jpg")), 400, "missing_file", url=BATCH,
         check=message_has("'files'")),
    Case("batch-too-many-files", lambda: batch(*[(f"{i}.jpg", b"x", "image/jpeg") for i in range(17)]), 400,
         "too_many_files", url=BATCH, check=message_has("17 files", "MIEN_MAX_BATCH_FILES")),
    Case("batch-unknown-model", lambda: batch(astronaut_jpeg()), 404, "unknown_model", url=BATCH,
         params={"model": "resnet9000"}),
    Case("batch-min-confidence-zero", lambda: batch(astronaut_jpeg()), 400, "invalid_request", url=BATCH,
         params={"min_confidence": "0"}, check=message_has("min_confidence")),
    Case("min-confidence-not-a-number", lambda: files(b"x"), 400, "invalid_request",
         params={"min_confidence": "sure"}, check=message_has("min_confidence")),
    # POST /analyze/video: a video upload (its own limits: MIEN_MAX_VIDEO_BYTES, _SECONDS, _FRAMES).
    Case("video-mp4-one-face", lambda: files(video("face"), "video/mp4", "clip.mp4"), 200, None, url=VIDEO,
         check=one_track),
    Case("video-without-a-face", lambda: files(video("blank"), "video/mp4", "clip.mp4"), 200, None, url=VIDEO,
         check=no_tracks),
    Case("video-octet-stream-is-read", lambda: files(video("face"), "application/octet-stream", "blob"), 200, None,
         url=VIDEO, check=one_track),
    Case("video-garbage-bytes", lambda: files(garbage(), "video/mp4", "clip.mp4"), 400, "bad_video", url=VIDEO,
         check=message_has("corrupt")),
    Case("video-truncated-mp4", lambda: files(video("face")[: len(video("face")) // 2], "video/mp4", "clip.mp4"),
         400, "bad_video", url=VIDEO, check=message_has("truncated")),
    Case("video-with-zero-frames", lambda: files(video("zero"), "video/x-msvideo", "clip.avi"), 400, "empty_video",
         url=VIDEO, check=message_has("no frame")),
    Case("video-empty-file", lambda: files(b"", "video/mp4", "clip.mp4"), 400, "empty_file", url=VIDEO),
    Case("video-audio-only-wav-as-mp4", lambda: files(wav(), "video/mp4", "clip.mp4"), 415, "unsupported_media_type",
         url=VIDEO, check=message_has("WAV audio")),
    Case("video-still-image-png", lambda: files(encode(astronaut(), ".png"), "image/png", "a.png"), 415,
         "unsupported_media_type", url=VIDEO, check=message_has("image/png", "POST /predict")),
    Case("video-png-as-octet-stream", lambda: files(encode(astronaut(), ".png"), "application/octet-stream"), 415,
         "unsupported_media_type", url=VIDEO, check=message_has("PNG image")),
    Case("video-declaring-1000-seconds", lambda: files(video("slow"), "video/x-msvideo", "slow.avi"), 413,
         "video_too_long", url=VIDEO, check=message_has("1000.0 s", "MIEN_MAX_VIDEO_SECONDS")),
    Case("video-body-declared-over-the-limit", lambda: VIDEO_DECLARED_TOO_BIG, 413, "too_large", url=VIDEO,
         check=message_has("MIEN_MAX_VIDEO_BYTES")),
    Case("video-missing-file", lambda: {}, 400, "missing_file", url=VIDEO, check=message_has("'file'")),
    Case("video-in-the-wrong-field", lambda: files(video("face"), "video/mp4", "clip.mp4", field="video"), 400,
         "missing_file", url=VIDEO, check=message_has("form fields: video")),
    Case("video-two-files", lambda: {"files": [("file", ("a.mp4", video("face"), "video/mp4")),
                                               ("file", ("b.mp4", video("face"), "video/mp4"))]}, 400,
         "too_many_files", url=VIDEO, check=message_has("one video per request")),
    Case("video-fps-zero", lambda: files(video("face"), "video/mp4"), 400, "invalid_request", url=VIDEO,
         params={"fps": "0"}, check=message_has("fps")),
    Case("video-smooth-above-one", lambda: files(video("face"), "video/mp4"), 400, "invalid_request", url=VIDEO,
         params={"smooth": "1.5"}, check=message_has("smooth")),
    Case("video-unknown-model", lambda: files(video("face"), "video/mp4"), 404, "unknown_model", url=VIDEO,
         params={"model": "resnet9000"}),
    # The same kinds of mistakes on the v2 inference route.
    Case("v2-invalid-json", lambda: {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400,
         "invalid_infer_request", url=V2_INFER),
    Case("v2-image-instead-of-tensor", lambda: files(encode(astronaut(), ".jpg")), 400, "invalid_infer_request",
         url=V2_INFER, check=message_has("POST /predict")),
    Case("v2-unknown-model", lambda: {"json": INFER_OK}, 404, "unknown_model", url="/v2/models/nope/infer"),
    Case("v2-model-with-spaces", lambda: {"json": INFER_OK}, 404, "unknown_model", url="/v2/models/mini%20x/infer"),
    Case("v2-body-over-the-limit", lambda: {"content": bytes(11 * 1024 * 1024)}, 413, "too_large", url=V2_INFER),
    Case("v2-huge-query-string", lambda: {"json": INFER_OK}, 414, "uri_too_long", url=V2_INFER,
         params={"pad": "a" * 60_000}),
    Case("v2-valid-tensor", lambda: {"json": INFER_OK}, 200, None, url=V2_INFER,
         check=lambda body: np.testing.assert_allclose(sum(body["outputs"][0]["data"]), 1.0, rtol=1e-5)),
]
# fmt: on


@pytest.fixture(scope="module")
def catalogue_client(model_dir: Path):
    with make_client(model_dir, providers=CPU) as c:
        yield c


def test_the_catalogue_has_at_least_30_distinct_cases():
    ids = [case.id for case in CATALOGUE]
    assert len(ids) == len(set(ids)) and len(ids) >= 30


@pytest.mark.parametrize("case", CATALOGUE, ids=[case.id for case in CATALOGUE])
def test_catalogue(catalogue_client, monkeypatch, case: Case):
    if case.no_decode:

        def refuse(*args, **kwargs):
            raise AssertionError("the image was decoded; its header alone should have refused it")

        monkeypatch.setattr(cv2, "imdecode", refuse)
    response = catalogue_client.request(case.method, case.url, params=case.params, **case.request())
    assert response.status_code == case.status, response.text
    body = response.json()
    if case.code is None:
        assert "error" not in body
    else:
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
        assert body["error"]["code"] == case.code, body
        assert body["error"]["message"].strip()
    if case.check is not None:
        case.check(body)


def test_after_the_catalogue_the_service_still_answers(catalogue_client):
    assert catalogue_client.get("/health").json() == {"status": "ok"}
    response = catalogue_client.post("/predict", **files(encode(astronaut(), ".jpg")))
    assert response.status_code == 200
    one_face_at_the_astronaut(response.json())


def test_docs_table_lists_every_case_with_its_status_and_code():
    """docs/robustness.md has one row per catalogue case: `id` | status | code | what to do."""
    rows = {}
    for line in ROBUSTNESS_DOC.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\|\s*`([^`]+)`\s*\|[^|]*\|\s*(\d{3})\s*\|\s*`?([\w—-]+)`?\s*\|\s*(.+?)\s*\|\s*$", line)
        if match:
            rows[match[1]] = (int(match[2]), match[3], match[4])
    for case in CATALOGUE:
        assert case.id in rows, f"docs/robustness.md has no row for {case.id}"
        status, code, advice = rows[case.id]
        assert status == case.status, case.id
        assert code == (case.code or "—"), case.id
        assert len(advice) > 5, case.id
