"""What every face detector gives and is: :class:`Detections` and the one-method :class:`FaceDetector`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


def area_order(boxes: np.ndarray) -> np.ndarray:
    """Indices that put the largest box first; ties keep a stable left-to-right order."""
    return np.lexsort((boxes[:, 0], -(boxes[:, 2].astype(np.int64) * boxes[:, 3])))


def sort_by_area(boxes: np.ndarray) -> np.ndarray:
    """Largest box first; ties keep a stable left-to-right order."""
    if len(boxes) == 0:
        return boxes
    return boxes[area_order(boxes)]


@dataclass
class Detections:
    """Faces found in one image: N×4 int32 boxes (x, y, w, h), N scores, N×5×2 landmarks (x, y) or ``None``.

    No face is a 0×4 array of boxes, never ``None``. ``scores`` and ``landmarks`` are ``None`` when the
    detector gives none (Haar). Landmarks are the left eye, right eye, nose tip, left and right mouth
    corner as seen in the image.
    """

    boxes: np.ndarray
    scores: np.ndarray | None = None
    landmarks: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.int32).reshape(-1, 4)

    def __len__(self) -> int:
        return len(self.boxes)

    def sorted_by_area(self) -> Detections:
        order = area_order(self.boxes) if len(self.boxes) else np.zeros(0, np.int64)
        return self[order]

    def __getitem__(self, index: np.ndarray | slice) -> Detections:
        return Detections(
            self.boxes[index],
            None if self.scores is None else self.scores[index],
            None if self.landmarks is None else self.landmarks[index],
        )


class FaceDetector(Protocol):
    """A face detector the service can run: one method, one image."""

    def detect(self, image: np.ndarray, min_face: int | None = None, threshold: float | None = None) -> Detections:
        """Faces in a BGR (or grey) uint8 image, largest first.

        ``min_face`` (pixels, longer side) and ``threshold`` (detector score) override the detector's
        defaults for this call; a detector without scores ignores ``threshold``.
        """
        ...
