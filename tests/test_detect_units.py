"""The detector's numpy parts on hand-made inputs: NMS, box regression, squaring, the pyramid, P-Net decoding,
padded crops, Detections ordering, and alignment of a synthetic tilted face."""

from __future__ import annotations

import math
from typing import get_args

import cv2
import numpy as np
import pytest

from mien.service.align import FER2013_TEMPLATE, FaceTemplate, align_face, alignment_matrix, eye_angle
from mien.service.detectors import ALIAS, DETECTORS, Detections, DetectorName, resolve
from mien.service.detectors.mtcnn import CELL, crop_patches, normalise, pnet_boxes, pyramid_scales
from mien.service.detectors.nms import apply_regression, nms, square, to_xywh

# --- NMS ----------------------------------------------------------------------------------------


def test_nms_keeps_the_best_of_overlapping_boxes_and_the_separate_ones():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10.5]], np.float32)
    scores = np.array([0.8, 0.9, 0.7, 0.6], np.float32)
    # IoU([0,0,10,10], [1,1,11,11]) = 81 / 119 = 0.68
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.7).tolist() == [1, 0, 2]  # 0.68 is under 0.7; box 3 overlaps box 0 at 0.95


def test_nms_min_mode_removes_a_box_inside_another():
    boxes = np.array([[0, 0, 100, 100], [10, 10, 30, 30]], np.float32)  # IoU 0.04, but fully inside
    scores = np.array([0.9, 0.95], np.float32)
    assert nms(boxes, scores, 0.7, mode="union").tolist() == [1, 0]
    assert nms(boxes, scores, 0.7, mode="min").tolist() == [1]


def test_nms_of_nothing_and_bad_mode():
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).shape == (0,)
    with pytest.raises(ValueError, match="mode"):
        nms(np.zeros((1, 4)), np.ones(1), 0.5, mode="max")


# --- box arithmetic -----------------------------------------------------------------------------


def test_regression_moves_edges_by_fractions_of_the_box():
    boxes = np.array([[10, 20, 30, 60]], np.float32)  # 20 wide, 40 high
    reg = np.array([[0.1, -0.25, 0.5, 0.0]], np.float32)
    np.testing.assert_allclose(apply_regression(boxes, reg), [[12, 10, 40, 60]])


def test_square_keeps_the_centre_and_takes_the_longer_side():
    np.testing.assert_allclose(square(np.array([[10, 20, 30, 60]], np.float32)), [[0, 20, 40, 60]])


def test_to_xywh_rounds_and_clips_to_the_image():
    boxes = np.array([[-5.4, 10.6, 50.2, 30.0], [90, 90, 130, 120]], np.float32)
    assert to_xywh(boxes, (100, 110, 3)).tolist() == [[0, 11, 50, 19], [90, 90, 20, 10]]
    assert to_xywh(np.zeros((0, 5), np.float32), (10, 10)).shape == (0, 4)


# --- pyramid and P-Net decoding -----------------------------------------------------------------


def test_pyramid_starts_at_the_smallest_face_and_stops_at_the_window():
    scales = pyramid_scales(480, 640, min_face=20, factor=0.709)
    assert scales[0] == pytest.approx(12 / 20)
    np.testing.assert_allclose(np.diff(np.log(scales)), math.log(0.709), rtol=1e-9)
    assert 480 * scales[-1] >= CELL > 480 * scales[-1] * 0.709  # the last level still holds one window
    assert pyramid_scales(10, 10, min_face=20) == []


def test_pyramid_caps_the_first_level_on_big_photos():
    scales = pyramid_scales(3000, 4000, min_face=20, max_side=1280)
    assert scales[0] == pytest.approx(1280 / 4000)
    assert pyramid_scales(480, 640, 20, max_side=1280)[0] == pytest.approx(0.6)  # small photos unaffected


def test_pnet_cells_become_boxes_in_image_pixels():
    prob = np.zeros((5, 7), np.float32)
    prob[2, 3] = 0.95
    prob[4, 0] = 0.5  # under the threshold
    reg = np.zeros((4, 5, 7), np.float32)
    reg[:, 2, 3] = [0.1, 0.2, 0.3, 0.4]
    (box,) = pnet_boxes(prob, reg, scale=0.5, threshold=0.6)
    # cell (row 2, col 3) is the 12×12 window at (6, 4) of the half-size image: (12, 8)-(36, 32) in the photo
    np.testing.assert_allclose(box, [12, 8, 36, 32, 0.95, 0.1, 0.2, 0.3, 0.4], rtol=1e-6)
    assert pnet_boxes(np.zeros((3, 3), np.float32), np.zeros((4, 3, 3), np.float32), 1.0, 0.6).shape == (0, 9)


def test_crops_are_zero_padded_outside_the_image():
    image = np.full((20, 20, 3), 200, np.uint8)
    (patch,) = crop_patches(image, np.array([[-10, 0, 10, 20]], np.float32), 20)
    assert patch[:, :10].max() == 0 and patch[:, 10:].min() == 200


def test_normalise_maps_pixels_to_minus_one_one_in_nchw():
    x = normalise(np.array([[[0, 128, 255]]], np.uint8))
    assert x.shape == (1, 3, 1, 1)
    np.testing.assert_allclose(x.ravel(), [-127.5 / 128, 0.5 / 128, 127.5 / 128])


# --- Detections and plain detectors -------------------------------------------------------------


def test_detections_sort_boxes_scores_and_landmarks_together():
    boxes = np.array([[0, 0, 10, 10], [50, 0, 30, 30]], np.int32)
    marks = np.arange(20, dtype=np.float32).reshape(2, 5, 2)
    found = Detections(boxes, np.array([0.9, 0.8], np.float32), marks).sorted_by_area()
    assert found.boxes.tolist() == [[50, 0, 30, 30], [0, 0, 10, 10]]
    assert found.scores.tolist() == pytest.approx([0.8, 0.9])
    assert found.landmarks[0, 0].tolist() == [10, 11]
    assert len(Detections(np.zeros((0, 4), np.int32)).sorted_by_area()) == 0


def test_no_face_is_an_empty_0x4_array_never_none():
    for empty in (np.zeros((0, 4), np.int32), [], np.zeros(0)):
        found = Detections(empty)
        assert found.boxes.shape == (0, 4) and found.boxes.dtype == np.int32 and len(found) == 0
    assert Detections([[1, 2, 3, 4]]).boxes.dtype == np.int32


def test_the_detector_table_and_the_names_requests_may_give_agree():
    assert set(DETECTORS) | {ALIAS} == set(get_args(DetectorName))
    assert resolve("onnx", "yunet") == "yunet" and resolve("onnx", "mtcnn") == "mtcnn"
    assert resolve("onnx", "haar") == "yunet" and resolve("haar", "yunet") == "haar"


# --- alignment ----------------------------------------------------------------------------------


def moved(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Where a 2×3 affine matrix takes N×2 points."""
    return np.asarray(points, np.float64) @ matrix[:, :2].T + matrix[:, 2]


def synthetic_face(angle: float, side: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """A drawn face (two eyes, a mouth) rotated by ``angle`` degrees, and its eye centres after rotation."""
    image = np.full((side, side, 3), 90, np.uint8)
    cv2.ellipse(image, (100, 105), (45, 60), 0, 0, 360, (180, 180, 180), -1)
    eyes = np.array([[80.0, 90.0], [120.0, 90.0]])
    for x, y in eyes:
        cv2.circle(image, (int(x), int(y)), 6, (20, 20, 20), -1)
    cv2.line(image, (85, 135), (115, 135), (20, 20, 20), 4)
    matrix = cv2.getRotationMatrix2D((100, 100), angle, 1.0)
    return cv2.warpAffine(image, matrix, (side, side), borderValue=(90, 90, 90)), moved(eyes, matrix)


@pytest.mark.parametrize("angle", [-30, -10, 0, 25])
def test_alignment_levels_the_eyes_and_puts_them_where_the_template_says(angle):
    image, eyes = synthetic_face(angle)
    landmarks = np.vstack([eyes, [[100, 110], [88, 135], [112, 135]]])
    assert eye_angle(landmarks) == pytest.approx(-angle, abs=1e-6)  # cv2's positive angle turns anticlockwise
    matrix, side = alignment_matrix(landmarks)
    left, right = moved(eyes, matrix)
    assert left[1] == pytest.approx(right[1], abs=1e-6)  # level
    assert (left[1] / side) == pytest.approx(FER2013_TEMPLATE.eye_y, abs=0.01)
    assert ((left[0] + right[0]) / 2 / side) == pytest.approx(FER2013_TEMPLATE.eye_x, abs=0.01)
    assert (right[0] - left[0]) / side == pytest.approx(FER2013_TEMPLATE.eye_distance, abs=0.01)
    crop = align_face(image, landmarks)
    assert crop.shape == (side, side, 3)
    # The drawn eyes (dark) are where the template puts them, on one row.
    row = int(round(left[1]))
    for x in (left[0], right[0]):
        assert crop[row - 2 : row + 3, int(x) - 2 : int(x) + 3].mean() < 60


def test_alignment_of_an_upright_face_is_the_identity_up_to_translation():
    image, eyes = synthetic_face(0)
    template = FaceTemplate(eye_x=0.5, eye_y=0.4, eye_distance=0.4)
    landmarks = np.vstack([eyes, np.zeros((3, 2))])
    crop = align_face(image, landmarks, template)
    # eyes 40 px apart → a 100 px crop whose eye midpoint (100, 90) lands at (50, 40): rows 50..150, cols 50..150
    np.testing.assert_array_equal(crop, image[50:150, 50:150])
