"""Face detection behind a small interface: the ONNX detector (``mien.service.detectors``) or the Haar cascade.

A detector is any callable ``detector(bgr_image) -> np.ndarray`` of shape N×4 (int32 x, y, width,
height), largest face first; no face is an empty 0×4 array, never ``None``. Detectors that know more
also have ``detect(image, min_face, threshold) -> Detections`` (scores, landmarks); :func:`detect_faces`
asks any detector for :class:`Detections`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

DEFAULT_CASCADE = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"


class FaceDetector(Protocol):
    def __call__(self, image: np.ndarray) -> np.ndarray: ...


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

    Landmarks are the left eye, right eye, nose tip, left and right mouth corner as seen in the image.
    """

    boxes: np.ndarray
    scores: np.ndarray | None = None
    landmarks: np.ndarray | None = None

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


def detect_faces(
    detector: FaceDetector, image: np.ndarray, min_face: int | None = None, threshold: float | None = None
) -> Detections:
    """Any detector's faces as :class:`Detections`, largest first.

    ``min_face`` (pixels) and ``threshold`` go to detectors with a ``detect`` method; a plain callable
    gets neither, and its boxes whose longer side is below ``min_face`` are dropped here.
    """
    method = getattr(detector, "detect", None)
    if callable(method):
        return method(image, min_face=min_face, threshold=threshold)
    boxes = np.asarray(detector(image), dtype=np.int32).reshape(-1, 4)
    if min_face:
        boxes = boxes[np.maximum(boxes[:, 2], boxes[:, 3]) >= min_face]
    return Detections(boxes).sorted_by_area()


class HaarFaceDetector:
    """OpenCV's frontal-face Haar cascade on the grayscale image (not histogram-equalised: on photos
    with large flat areas equalisation flattens the face's contrast and loses it).

    Large images are searched at ``max_side`` pixels on their longer side: the cascade's cost grows
    with the pixel count, and faces smaller than ``min_size`` at that scale are too small to classify.
    """

    def __init__(
        self,
        cascade_path: str | Path = DEFAULT_CASCADE,
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        min_size: int = 30,
        max_side: int = 1024,
    ) -> None:
        self.cascade_path = str(cascade_path)
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_size = min_size
        self.max_side = max_side
        # One cascade per thread: CascadeClassifier is not documented as safe to share between threads.
        self._local = threading.local()
        self._cascade()  # fail at start-up, not on the first request, when the XML is missing

    def _cascade(self) -> cv2.CascadeClassifier:
        cascade = getattr(self._local, "cascade", None)
        if cascade is None:
            cascade = cv2.CascadeClassifier(self.cascade_path)
            if cascade.empty():
                raise RuntimeError(
                    f"could not load the Haar cascade {self.cascade_path}; "
                    "opencv-python-headless 4.x ships it, 5.x does not"
                )
            self._local.cascade = cascade
        return cascade

    def detect(self, image: np.ndarray, min_face: int | None = None, threshold: float | None = None) -> Detections:
        """Boxes only (no scores or landmarks); ``threshold`` does not apply to the cascade and is ignored."""
        return Detections(self(image, min_face=min_face))

    def __call__(self, image: np.ndarray, min_face: int | None = None) -> np.ndarray:
        gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        scale = min(1.0, self.max_side / max(gray.shape[:2]))
        if scale < 1.0:
            gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        found = self._cascade().detectMultiScale(
            gray,
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            # min_face is in image pixels; the cascade searches the (possibly) downscaled image.
            minSize=(max(self.min_size, int(round((min_face or 0) * scale))),) * 2,
        )
        boxes = np.asarray(found, dtype=np.float64).reshape(-1, 4)
        if scale < 1.0:
            boxes = boxes / scale
        boxes = np.round(boxes).astype(np.int32)
        # Rounding after rescaling can push a box one pixel past the border.
        height, width = image.shape[:2]
        boxes[:, 2] = np.minimum(boxes[:, 2], width - boxes[:, 0])
        boxes[:, 3] = np.minimum(boxes[:, 3], height - boxes[:, 1])
        return sort_by_area(boxes)
