"""OpenCV's frontal-face Haar cascade: boxes only (no scores, no landmarks), the fallback detector."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np

from mien.service.detectors.base import Detections, sort_by_area
from mien.service.exceptions import DetectorNotLoaded

DEFAULT_CASCADE = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"


class HaarFaceDetector:
    """The cascade on the grayscale image (not histogram-equalised: on photos with large flat areas
    equalisation flattens the face's contrast and loses it).

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
                raise DetectorNotLoaded(
                    f"could not load the Haar cascade {self.cascade_path}; "
                    "opencv-python-headless 4.x ships it, 5.x does not"
                )
            self._local.cascade = cascade
        return cascade

    def detect(self, image: np.ndarray, min_face: int | None = None, threshold: float | None = None) -> Detections:
        """Boxes only, largest first; ``threshold`` does not apply to the cascade and is ignored."""
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
        return Detections(sort_by_area(boxes))
