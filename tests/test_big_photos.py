"""Big photos: decoded at reduced size, faces searched on a small copy, boxes and landmarks reported in the
photo's own pixels, faces cut from full resolution when the reduced copy is too coarse."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from benchmarks.detect_photos import match, phone_photo
from mien.service.detectors import BUNDLED_DIR, Detections
from mien.service.detectors.mtcnn import MtcnnDetector
from mien.service.imaging import Photo, decode_photo, reduction_for
from mien.service.pipeline import crop_source, detect_in_photo
from tests.conftest import make_client

BIG = 40_000_000  # max_pixels for these tests


@pytest.fixture(scope="module")
def phone():
    return phone_photo()


@pytest.fixture(scope="module")
def phone_jpeg(phone) -> bytes:
    return cv2.imencode(".jpg", phone.image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


@pytest.fixture(scope="module")
def mtcnn() -> MtcnnDetector:
    return MtcnnDetector.from_dir(BUNDLED_DIR, ("CPUExecutionProvider",), threads=1)


class Recorder:
    """A detector that finds one face at a fixed place of whatever image it is given, and records that image."""

    def __init__(self, box=(10, 20, 30, 40)):
        self.box = np.array([box], np.int32)
        self.seen: list[tuple[tuple[int, ...], int | None]] = []

    def detect(self, image, min_face=None, threshold=None):
        self.seen.append((image.shape, min_face))
        x, y, w, h = self.box[0]
        points = np.array([[[x + 5, y + 10], [x + 25, y + 10], [x + 15, y + 20], [x + 8, y + 30], [x + 22, y + 30]]])
        return Detections(self.box, np.array([0.99], np.float32), points.astype(np.float32))


@pytest.mark.parametrize(
    ("size", "fmt", "need", "factor"),
    [((4000, 3000), "jpeg", 750_000, 4), ((4000, 3000), "jpeg", 750_001, 2), ((4000, 3000), "jpeg", 187_500, 8),
     ((4000, 3000), "jpeg", 3_000_001, 1), ((512, 512), "jpeg", 750_000, 1), ((4000, 3000), "png", 750_000, 1),
     ((4000, 3000), "jpeg", 0, 1), (None, "jpeg", 750_000, 1)],
)  # fmt: skip
def test_the_reduction_is_the_largest_that_keeps_the_needed_pixels(size, fmt, need, factor):
    assert reduction_for(size, fmt, need) == factor


def test_a_large_jpeg_is_decoded_reduced_and_remembers_its_full_size(phone, phone_jpeg):
    photo = decode_photo(phone_jpeg, BIG, need_pixels=750_000)
    assert photo.image.shape == (750, 1000, 3) and (photo.width, photo.height) == (4000, 3000)
    assert photo.reduced and photo.scale == (4.0, 4.0)
    full = photo.full()
    assert full.shape == (3000, 4000, 3) and photo.full() is full  # decoded once
    # The reduced copy is the full photo, smaller: compare with an area-resized full decode.
    shrunk = cv2.resize(full, (1000, 750), interpolation=cv2.INTER_AREA).astype(np.int16)
    assert np.abs(shrunk - photo.image).mean() < 3.0
    assert decode_photo(phone_jpeg, BIG).image.shape == (3000, 4000, 3)  # no need_pixels: full size


def test_a_reduced_decode_applies_the_exif_orientation(phone):
    stored = cv2.rotate(phone.image, cv2.ROTATE_90_COUNTERCLOCKWISE)  # 3000 wide, 4000 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display: the 4000×3000 landscape again
    buf = io.BytesIO()
    Image.fromarray(cv2.cvtColor(stored, cv2.COLOR_BGR2RGB)).save(buf, "JPEG", exif=exif, quality=90)
    photo = decode_photo(buf.getvalue(), BIG, need_pixels=750_000)
    assert (photo.width, photo.height) == (4000, 3000) and photo.image.shape == (750, 1000, 3)
    shrunk = cv2.resize(phone.image, (1000, 750), interpolation=cv2.INTER_AREA).astype(np.int16)
    assert np.abs(shrunk - photo.image).mean() < 4.0  # upright, not sideways


def test_detection_runs_on_a_copy_and_maps_boxes_and_landmarks_back():
    image = np.zeros((750, 1000, 3), np.uint8)
    photo = Photo(image, 4000, 3000)  # decoded at 1/4
    recorder = Recorder()
    found, detected_at = detect_in_photo(photo, recorder, max_pixels=500 * 375, min_face=None, threshold=None)
    assert recorder.seen[0][0] == (375, 500, 3) and detected_at == (500, 375)
    # 8 photo pixels per detection pixel: the box (10, 20, 30, 40) is (80, 160, 240, 320) in the photo.
    assert found.boxes.tolist() == [[80, 160, 240, 320]]
    np.testing.assert_allclose(found.landmarks[0, 0], [(10 + 5) * 8, (20 + 10) * 8])
    np.testing.assert_allclose(found.scores, [0.99])


def test_min_face_is_in_photo_pixels():
    photo = Photo(np.zeros((750, 1000, 3), np.uint8), 4000, 3000)
    recorder = Recorder()  # a face 30×40 detection pixels = 240×320 photo pixels
    assert len(detect_in_photo(photo, recorder, 500 * 375, min_face=300, threshold=None)[0]) == 1
    assert len(detect_in_photo(photo, recorder, 500 * 375, min_face=321, threshold=None)[0]) == 0
    # The detector is asked for faces down to min_face / 8 pixels, but never below 12 of its own pixels.
    assert [seen[1] for seen in recorder.seen] == [37, 40]
    detect_in_photo(photo, recorder, 500 * 375, min_face=20, threshold=None)
    assert recorder.seen[-1][1] == 12


def test_an_image_at_full_size_goes_to_the_detector_untouched():
    image = np.zeros((480, 640, 3), np.uint8)
    recorder = Recorder()
    found, detected_at = detect_in_photo(Photo(image, 640, 480), recorder, 750_000, min_face=20, threshold=None)
    assert recorder.seen == [((480, 640, 3), 20)] and detected_at == (640, 480)
    assert found.boxes.tolist() == [[10, 20, 30, 40]]


def test_faces_are_cut_from_full_resolution_only_when_the_reduced_copy_is_too_coarse(phone, phone_jpeg):
    photo = decode_photo(phone_jpeg, BIG, need_pixels=750_000)
    big = Detections(np.array([[1700, 900, 600, 740]]))  # 150 px in the 1/4 copy: ≥ 2 × 48
    image, factors = crop_source(photo, big, 48)
    assert image is photo.image and factors.tolist() == [0.25, 0.25] and photo._full is None
    small = Detections(np.array([[1700, 900, 300, 370]]))  # 75 px in the copy: cut from the photo itself
    image, factors = crop_source(photo, small, 48)
    assert image.shape == (3000, 4000, 3) and factors.tolist() == [1.0, 1.0]


def test_the_face_of_a_phone_photo_is_found_in_place(phone, phone_jpeg, mtcnn):
    photo = decode_photo(phone_jpeg, BIG, need_pixels=750_000)
    found, _ = detect_in_photo(photo, mtcnn, 750_000, min_face=20, threshold=None)
    assert match(found.boxes, phone.faces) == (1, 0), (found.boxes.tolist(), phone.faces)
    x, y, w, h = found.boxes[0]
    assert ((found.landmarks[0] >= [x, y]) & (found.landmarks[0] <= [x + w, y + h])).all()


def test_a_phone_photo_through_the_api(model_dir, phone, phone_jpeg):
    with make_client(model_dir, max_pixels=BIG) as client:
        files = {"file": ("phone.jpg", phone_jpeg, "image/jpeg")}
        body = client.post("/predict", files=files).json()
        assert body["image"] == {"width": 4000, "height": 3000}
        assert body["detected_at"] == {"width": 1000, "height": 750}  # decoded at 1/4, searched as decoded
        boxes = np.array([[f["box"][k] for k in ("x", "y", "width", "height")] for f in body["faces"]])
        assert match(boxes, phone.faces) == (1, 0), (boxes.tolist(), phone.faces)
        assert len(body["faces"][0]["landmarks"]) == 5
        coarse = client.post("/predict", params={"detect_max_pixels": 480 * 360}, files=files).json()
        assert coarse["detected_at"] == {"width": 480, "height": 360} and len(coarse["faces"]) == 1
        assert coarse["faces"][0]["box"] == pytest.approx(body["faces"][0]["box"], rel=0.1)
        bad = client.post("/predict", params={"detect_max_pixels": -1}, files=files)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
