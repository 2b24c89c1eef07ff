"""The ONNX detector (and Haar) on real package photos and the benchmark's composites, and its export."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.detect_photos import FACE_BOXES, all_photos, match, real_photo
from mien.service.detectors import BUNDLED_DIR
from mien.service.detectors.haar import HaarFaceDetector
from mien.service.detectors.mtcnn import MtcnnDetector

PHOTOS = {photo.name: photo for photo in all_photos()}


@pytest.fixture(scope="module")
def mtcnn() -> MtcnnDetector:
    return MtcnnDetector.from_dir(BUNDLED_DIR, ("CPUExecutionProvider",), threads=1)


@pytest.mark.parametrize("name", list(PHOTOS))
def test_every_face_is_found_and_nothing_else(mtcnn, name):
    photo = PHOTOS[name]
    found = mtcnn.detect(photo.image)
    assert match(found.boxes, photo.faces) == (len(photo.faces), 0), (found.boxes.tolist(), photo.faces)
    assert found.boxes.dtype == np.int32 and found.boxes.shape == (len(photo.faces), 4)
    assert found.landmarks.shape == (len(photo.faces), 5, 2) and found.scores.shape == (len(photo.faces),)
    areas = found.boxes[:, 2] * found.boxes[:, 3]
    assert (np.diff(areas) <= 0).all()  # largest first


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper", "camera"])
def test_boxes_cover_the_face_and_landmarks_sit_inside_them(mtcnn, name):
    found = mtcnn.detect(real_photo(name))
    (x, y, w, h), (fx, fy, fw, fh) = found.boxes[0], FACE_BOXES[name][0]
    overlap = max(0, min(x + w, fx + fw) - max(x, fx)) * max(0, min(y + h, fy + fh) - max(y, fy))
    assert overlap >= 0.6 * fw * fh, (found.boxes[0], FACE_BOXES[name][0])  # most of the true face is inside
    points = found.landmarks[0]
    assert ((points >= [x, y]) & (points <= [x + w, y + h])).all()
    left_eye, right_eye, nose, mouth_left, mouth_right = points
    assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])  # upright faces


def test_scores_are_probabilities_and_the_threshold_applies(mtcnn):
    image = real_photo("astronaut")
    strict = mtcnn.detect(image)
    loose = mtcnn.detect(image, threshold=0.05)
    assert (strict.scores >= mtcnn.threshold).all() and (loose.scores <= 1.0).all()
    assert len(loose) > len(strict)  # the weaker candidates (a badge on the suit) only at a low threshold


def test_min_face_drops_faces_smaller_than_it(mtcnn):
    photo = PHOTOS["group (5 faces)"]
    assert len(mtcnn.detect(photo.image, min_face=20)) == 5
    big = mtcnn.detect(photo.image, min_face=90)
    assert 1 <= len(big) < 5 and (big.boxes[:, 2:].max(axis=1) >= 90).all()


def test_grayscale_and_tiny_images(mtcnn):
    assert len(mtcnn.detect(real_photo("camera")[:, :, 0])) == 1
    assert mtcnn.detect(np.zeros((8, 8, 3), np.uint8)).boxes.shape == (0, 4)


def test_haar_fallback_on_the_real_photos():
    haar = HaarFaceDetector()
    for name in ("astronaut", "grace_hopper", "coffee", "chelsea", "rocket"):
        photo = PHOTOS[name]
        found = haar.detect(photo.image)
        assert match(found.boxes, photo.faces) == (len(photo.faces), 0), name
        assert found.landmarks is None


def test_missing_detector_files_name_the_export_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="mien export detector"):
        MtcnnDetector.from_dir(tmp_path)


def test_export_detector_reproduces_the_committed_files(tmp_path):
    """`mien export detector` from the installed wheel writes byte-identical ONNX files and a matching card."""
    pytest.importorskip("torch")
    from mien.cli import main

    assert main(["export", "detector", "--out", str(tmp_path)]) == 0
    card = json.loads((tmp_path / "mtcnn.card.json").read_text())
    committed = json.loads((BUNDLED_DIR / "mtcnn.card.json").read_text())
    assert card["parity"]["passed"] and card["weights"]["package"] == "facenet-pytorch"
    for net in ("pnet", "rnet", "onet"):
        path = tmp_path / f"mtcnn_{net}.onnx"
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert digest == card["nets"][net]["sha256"] == committed["nets"][net]["sha256"], net
        assert digest == hashlib.sha256((BUNDLED_DIR / path.name).read_bytes()).hexdigest()


def test_cli_still_exports_checkpoints_by_path(monkeypatch):
    """The word `detector` is special; anything else is still a checkpoint path."""
    import mien.export.onnx_export as classifier_export
    from mien.cli import main

    seen = {}

    def fake_export(cfg):
        seen["checkpoint"] = cfg.checkpoint
        return type("Result", (), {"passed": True})()

    monkeypatch.setattr(classifier_export, "export_checkpoint", fake_export)
    assert main(["export", str(Path("runs/x/best.pt"))]) == 0
    assert seen["checkpoint"] == str(Path("runs/x/best.pt"))
