"""The service's parts on their own: settings, image decoding and header checks, face detection."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from pydantic import ValidationError
from skimage import data

from mien.service import imaging
from mien.service.config import Settings
from mien.service.detectors import Detections
from mien.service.detectors.base import sort_by_area
from mien.service.detectors.haar import HaarFaceDetector
from mien.service.errors import status_of
from mien.service.exceptions import BadImage, TooLarge, UnsupportedMediaType
from mien.service.pipeline import StageTimer, predict_faces


def astronaut() -> np.ndarray:
    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)


# --- settings -----------------------------------------------------------------------------------


def test_settings_defaults():
    s = Settings()
    assert str(s.model_dir) == "models" and s.default_model == "mini_xception"
    assert s.host == "127.0.0.1" and s.port == 8000
    assert s.max_upload_bytes == 10 * 1024 * 1024 and s.max_pixels == 40_000_000 and s.max_faces == 50
    assert s.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MIEN_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("MIEN_DEFAULT_MODEL", "stn_cnn")
    monkeypatch.setenv("MIEN_MAX_UPLOAD_BYTES", "1234")
    monkeypatch.setenv("MIEN_MAX_PIXELS", "5000")
    monkeypatch.setenv("MIEN_MAX_FACES", "7")
    monkeypatch.setenv("MIEN_PORT", "9001")
    monkeypatch.setenv("MIEN_PROVIDERS", "cuda, CPUExecutionProvider")
    s = Settings()
    assert s.model_dir == tmp_path and s.default_model == "stn_cnn"
    assert (s.max_upload_bytes, s.max_pixels, s.max_faces, s.port) == (1234, 5000, 7, 9001)
    assert s.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")


def test_keyword_arguments_win_over_environment(monkeypatch):
    monkeypatch.setenv("MIEN_PORT", "9001")
    assert Settings(port=9002).port == 9002
    assert Settings(providers="cpu").providers == ("CPUExecutionProvider",)


@pytest.mark.parametrize(
    "env,value,named",
    [
        ("MIEN_MAX_UPLOAD_BYTES", "0", "max_upload_bytes"),
        ("MIEN_MAX_UPLOAD_BYTES", "-5", "max_upload_bytes"),
        ("MIEN_MAX_UPLOAD_BYTES", "ten", "max_upload_bytes"),
        ("MIEN_MAX_PIXELS", "0", "max_pixels"),
        ("MIEN_MAX_PIXELS", str(2**31), "max_pixels"),
        ("MIEN_MAX_FACES", "0", "max_faces"),
        ("MIEN_PORT", "70000", "port"),
        ("MIEN_THREADS", "-1", "threads"),
        ("MIEN_DEFAULT_MODEL", "  ", "default_model"),
        ("MIEN_PROVIDERS", "", "providers"),
        ("MIEN_PROVIDERS", "TPUExecutionProvider", "TPUExecutionProvider"),
    ],
)
def test_unsafe_settings_are_refused(monkeypatch, env, value, named):
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError) as err:
        Settings()
    assert named in str(err.value)


def test_unknown_provider_error_lists_the_known_ones():
    with pytest.raises(ValidationError, match="CPUExecutionProvider"):
        Settings(providers=("GPU",))


# --- image decoding -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ext,params,fmt",
    [
        (".jpg", [], "jpeg"),
        (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1], "jpeg"),
        (".png", [], "png"),
        (".bmp", [], "bmp"),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80], "webp"),  # lossy: VP8
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101], "webp"),  # lossless: VP8L
    ],
)
def test_header_size_matches_the_decoded_image(ext, params, fmt):
    image = cv2.resize(astronaut(), (37, 23))
    raw = cv2.imencode(ext, image, params)[1].tobytes()
    assert imaging.sniff_format(raw) == fmt
    assert imaging.header_size(raw, fmt) == (37, 23)
    assert imaging.decode_image(raw, max_pixels=10_000).shape == (23, 37, 3)


def test_header_size_of_extended_webp():
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((23, 37, 4), np.uint8), "RGBA").save(buf, "WEBP", quality=80)  # alpha: VP8X
    raw = buf.getvalue()
    assert raw[12:16] == b"VP8X"
    assert imaging.header_size(raw, "webp") == (37, 23)


def test_grayscale_and_alpha_images_decode_to_bgr():
    gray = cv2.imencode(".png", np.full((20, 30), 128, np.uint8))[1].tobytes()
    rgba = cv2.imencode(".png", np.full((20, 30, 4), 200, np.uint8))[1].tobytes()
    assert imaging.decode_image(gray, 10_000).shape == (20, 30, 3)
    assert imaging.decode_image(rgba, 10_000).shape == (20, 30, 3)


def test_a_huge_declared_size_is_refused_before_decoding(monkeypatch):
    """A decompression bomb: a tiny PNG whose header declares 100000×100000 pixels."""
    raw = bytearray(cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    raw[16:24] = (100_000).to_bytes(4, "big") * 2

    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded an image whose header is over the pixel limit")

    monkeypatch.setattr(imaging.cv2, "imdecode", must_not_decode)
    with pytest.raises(TooLarge, match="100000×100000"):
        imaging.decode_image(bytes(raw), max_pixels=40_000_000)


def test_pixel_limit_also_applies_after_decoding():
    raw = cv2.imencode(".jpg", np.zeros((100, 100, 3), np.uint8))[1].tobytes()
    imaging.decode_image(raw, max_pixels=10_000)
    with pytest.raises(TooLarge):
        imaging.decode_image(raw, max_pixels=9_999)


@pytest.mark.parametrize(
    "raw,error",
    [
        (b"", BadImage),
        (b"\xff\xd8\xff", BadImage),  # JPEG start of image and nothing else
        (b"\x89PNG\r\n\x1a\n" + bytes(16), BadImage),  # PNG header declaring 0×0
        (b"BM" + bytes(12) + (40).to_bytes(4, "little") + bytes(40), BadImage),  # BMP header, no pixels
        (b"RIFF\x00\x00\x00\x00WEBPVP8 " + bytes(20), BadImage),
        (bytes(range(256)) * 4, BadImage),
        (b"GIF89a" + bytes(100), BadImage),  # GIF header declaring 0×0
        (b"II*\x00" + bytes(100), UnsupportedMediaType),
        (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", UnsupportedMediaType),
        ("plain text, accentuée".encode(), UnsupportedMediaType),
    ],
)
def test_what_cannot_be_decoded_gets_a_client_error(raw, error):
    with pytest.raises(error) as err:
        imaging.decode_image(raw, max_pixels=40_000_000)
    assert status_of(err.value) in ((400, "bad_image"), (400, "empty_file"), (415, "unsupported_media_type"))


@pytest.mark.parametrize("declared", ["image/jpeg", "image/png; charset=binary", "IMAGE/WEBP", "image/bmp", "image/gif",
                                      None, "", "application/octet-stream"])  # fmt: skip
def test_accepted_media_types(declared):
    imaging.check_media_type(declared)


@pytest.mark.parametrize("declared", ["text/plain", "image/tiff", "image/heic", "application/pdf", "video/mp4"])
def test_refused_media_types(declared):
    with pytest.raises(UnsupportedMediaType, match=declared):
        imaging.check_media_type(declared)


# --- face detection -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detector() -> HaarFaceDetector:
    return HaarFaceDetector()


def test_detector_finds_the_astronaut(detector):
    boxes = detector.detect(astronaut()).boxes
    assert boxes.shape == (1, 4) and boxes.dtype == np.int32
    x, y, w, h = boxes[0]
    assert 170 <= x + w / 2 <= 275 and 55 <= y + h / 2 <= 170


@pytest.mark.parametrize("photo", ["coffee", "chelsea", "rocket"])
def test_no_face_is_an_empty_array(detector, photo):
    boxes = detector.detect(cv2.cvtColor(getattr(data, photo)(), cv2.COLOR_RGB2BGR)).boxes
    assert isinstance(boxes, np.ndarray) and boxes.shape == (0, 4)


def test_large_images_are_searched_downscaled_and_boxes_mapped_back(detector):
    canvas = np.full((1536, 2048, 3), 90, np.uint8)
    canvas[700:1212, 1000:1512] = astronaut()
    (box,) = detector.detect(canvas).boxes
    small = detector.detect(astronaut()).boxes[0]
    expected = small + np.array([1000, 700, 0, 0])
    assert np.abs(box - expected).max() <= 12, (box, expected)


def test_grayscale_input_is_accepted(detector):
    assert len(detector.detect(cv2.cvtColor(astronaut(), cv2.COLOR_BGR2GRAY))) == 1


def test_sort_by_area_puts_the_largest_first():
    boxes = np.array([[0, 0, 10, 10], [50, 0, 30, 30], [5, 5, 20, 20], [1, 1, 20, 20]], np.int32)
    assert sort_by_area(boxes).tolist() == [[50, 0, 30, 30], [1, 1, 20, 20], [5, 5, 20, 20], [0, 0, 10, 10]]
    assert sort_by_area(np.zeros((0, 4), np.int32)).shape == (0, 4)


def test_a_missing_cascade_fails_at_construction(tmp_path):
    with pytest.raises(RuntimeError, match="Haar cascade"):
        HaarFaceDetector(cascade_path=tmp_path / "missing.xml")


# --- the pipeline with a stand-in detector --------------------------------------------------------


class FixedBoxes:
    """A stand-in detector that finds the same boxes in every image."""

    def __init__(self, boxes: np.ndarray) -> None:
        self.boxes = boxes

    def detect(self, image: np.ndarray, min_face: int | None = None, threshold: float | None = None) -> Detections:
        return Detections(self.boxes)


class SpySession:
    """Wraps an onnxruntime session and records the shape of every batch it runs."""

    def __init__(self, session) -> None:
        self.session = session
        self.shapes: list[tuple[int, ...]] = []

    def run(self, outputs, feeds):
        self.shapes.append(next(iter(feeds.values())).shape)
        return self.session.run(outputs, feeds)


def test_pipeline_batches_every_face_and_crops_with_the_spec_margin(model_dir):
    from mien.preprocess import expand_box
    from mien.runtime import OnnxClassifier

    classifier = OnnxClassifier.from_path(model_dir / "mini_xception.onnx", providers=("CPUExecutionProvider",))
    image = astronaut()
    boxes = np.array([[177, 66, 95, 95], [300, 300, 60, 60], [0, 0, 40, 40]], np.int32)
    margin = classifier.spec.crop_margin
    crops = [image[y : y + h, x : x + w] for x, y, w, h in (expand_box(tuple(b), margin, image.shape) for b in boxes)]
    expected = classifier.predict_crops(crops[:2])

    classifier.session = spy = SpySession(classifier.session)
    timer = StageTimer()
    prediction = predict_faces(image, classifier, FixedBoxes(boxes), timer, detect=True, max_faces=2)
    assert spy.shapes == [(2, 1, 48, 48)]  # one call for all faces
    assert prediction.boxes.tolist() == boxes[:2].tolist() and prediction.truncated == 1
    np.testing.assert_allclose(prediction.probabilities, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(prediction.probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert set(timer.ms) == {"detect", "preprocess", "classify"}


def test_pipeline_without_faces_does_not_call_the_model(model_dir):
    from mien.runtime import OnnxClassifier

    classifier = OnnxClassifier.from_path(model_dir / "mini_xception.onnx", providers=("CPUExecutionProvider",))
    classifier.session = spy = SpySession(classifier.session)
    prediction = predict_faces(astronaut(), classifier, FixedBoxes(np.zeros((0, 4), np.int32)), StageTimer())
    assert spy.shapes == [] and prediction.probabilities.shape == (0, 7) and prediction.batch_sizes == []
