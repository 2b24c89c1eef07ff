"""Face alignment before classification: eyes level, and the face framed the way FER2013 frames it.

FER2013's 48×48 faces were registered by their creators so that faces sit roughly still in the frame;
a classifier trained on them sees eyes at a fixed height and spacing. :data:`FER2013_TEMPLATE` is that
framing, measured (``benchmarks/bench_alignment.py --fit-template``) by running the ONNX detector on
upscaled FER2013 *Training* faces and taking the median eye positions. An aligned crop rotates the photo
about the eye midpoint so the eyes are level and scales it so the eyes land where FER2013 puts them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class FaceTemplate:
    """Where the eyes sit in a square crop, as fractions of its side."""

    eye_x: float  # eye midpoint, from the left
    eye_y: float  # eye midpoint, from the top
    eye_distance: float  # between the two eye centres


# Medians over the 2589 of 3000 random FER2013 Training faces the detector found (seed 0), measured by
# `benchmarks/bench_alignment.py --fit-template --limit 3000`. About 18 px between the eyes of a 48 px face.
FER2013_TEMPLATE = FaceTemplate(eye_x=0.5024, eye_y=0.3864, eye_distance=0.3714)
#: The same framing in YuNet's landmarks, whose eye points sit a little wider apart and lower than MTCNN's: the
#: medians over the 2906 of the same 3000 faces YuNet finds (`bench_alignment.py --fit-template --detector yunet
#: --limit 3000`). Each detector's faces are aligned with the template measured with its own landmarks.
FER2013_TEMPLATE_YUNET = FaceTemplate(eye_x=0.4996, eye_y=0.3932, eye_distance=0.3829)


def eye_angle(landmarks: np.ndarray) -> float:
    """Degrees the eye line is turned clockwise (as seen, y down) from level; landmarks are 5×2, eyes first."""
    (lx, ly), (rx, ry) = landmarks[0], landmarks[1]
    return math.degrees(math.atan2(ry - ly, rx - lx))


def alignment_matrix(landmarks: np.ndarray, template: FaceTemplate = FER2013_TEMPLATE) -> tuple[np.ndarray, int]:
    """The 2×3 affine map from the photo to an aligned square crop, and the crop's side in pixels.

    The crop keeps the photo's resolution (scale 1): the classifier's own resize then shrinks it
    exactly as it shrinks any other crop.
    """
    left, right = np.asarray(landmarks[0], np.float64), np.asarray(landmarks[1], np.float64)
    centre = (left + right) / 2.0
    distance = max(float(np.hypot(*(right - left))), 1.0)
    side = max(int(round(distance / template.eye_distance)), 8)
    matrix = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), eye_angle(landmarks), 1.0)
    # The rotation keeps the eye midpoint in place; move it to where the template puts it.
    matrix[0, 2] += template.eye_x * side - centre[0]
    matrix[1, 2] += template.eye_y * side - centre[1]
    return matrix, side


def align_face(image: np.ndarray, landmarks: np.ndarray, template: FaceTemplate = FER2013_TEMPLATE) -> np.ndarray:
    """The face rotated so the eyes are level and cropped square with FER2013's framing.

    Outside the photo the border is replicated, so a face at the edge gets no black wedge that a
    FER2013 model has never seen.
    """
    matrix, side = alignment_matrix(landmarks, template)
    return cv2.warpAffine(image, matrix, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
