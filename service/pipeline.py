"""The prediction pipeline on a decoded image: detect → align/crop → preprocess → one batched call.

No HTTP here: routes decode the upload and turn the result into the response schema.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import cv2
import numpy as np

from mien.ensemble import EnsembleClassifier
from mien.preprocess import expand_box
from mien.runtime import OnnxClassifier
from mien.service.align import FER2013_TEMPLATE, align_face
from mien.service.batching import MicroBatcher
from mien.service.detectors import Detections, FaceDetector
from mien.service.imaging import Photo

#: The smallest face (pixels of the image it runs on) asked of a detector running on a reduced copy: MTCNN's
#: 12-pixel window. A smaller ``min_face`` in photo pixels is out of reach at that resolution.
SMALLEST_SEARCHED = 12
#: A face is cut from the reduced copy when its box there is at least this many times the model's input side
#: (the classifier shrinks it anyway); a smaller one is cut from the full-resolution photo.
CROP_OVERSAMPLING = 2.0


class StageTimer:
    """Milliseconds per named stage, measured with ``perf_counter``."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1000.0


@dataclass
class Prediction:
    """Face boxes (N×4 x, y, w, h in image pixels, largest first) and their class probabilities."""

    boxes: np.ndarray
    probabilities: np.ndarray
    labels: tuple[str, ...]
    truncated: int = 0  # faces found beyond max_faces and not classified
    # Classifier calls made for this image alone; empty when its faces went through the shared micro-batcher,
    # which records the sizes of the calls it makes (they hold other requests' faces too).
    batch_sizes: list[int] = field(default_factory=list)
    scores: np.ndarray | None = None  # detector confidence per face, when the detector gives one
    landmarks: np.ndarray | None = None  # N×5×2 (eyes, nose, mouth corners), when the detector gives them
    aligned: bool = False
    detected_at: tuple[int, int] | None = None  # (width, height) of the image the detector ran on


def crop_faces(image: np.ndarray, boxes: np.ndarray, margin: float) -> list[np.ndarray]:
    """Each box grown by the spec's crop margin (as in training), clipped to the image."""
    crops = []
    for box in boxes:
        x, y, w, h = expand_box(tuple(int(v) for v in box), margin, image.shape)
        crops.append(image[y : y + h, x : x + w])
    return crops


def scale_boxes(boxes: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """x, y, w, h boxes scaled by (fx, fy), rounded to whole pixels; unchanged when both factors are 1."""
    if (factors == 1.0).all():
        return boxes
    return np.rint(boxes * np.tile(factors, 2)).astype(np.int32)


def shrink(image: np.ndarray, max_pixels: int) -> np.ndarray:
    """``image`` with at most ``max_pixels`` pixels, its aspect kept (0: unchanged). A bound on pixels rather
    than on the longer side keeps the faces of a panorama findable."""
    height, width = image.shape[:2]
    if not max_pixels or width * height <= max_pixels:
        return image
    factor = math.sqrt(max_pixels / (width * height))
    size = (max(1, int(width * factor)), max(1, int(height * factor)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def detect_in_photo(
    photo: Photo, detector: FaceDetector, max_pixels: int, min_face: int | None, threshold: float | None
) -> tuple[Detections, tuple[int, int]]:
    """Faces of the photo in full-resolution coordinates, found on a copy of at most ``max_pixels`` pixels.

    ``min_face`` is in photo pixels; on a reduced copy the detector searches down to
    :data:`SMALLEST_SEARCHED` of its own pixels (or ``min_face`` scaled, if larger) and faces smaller than
    ``min_face`` in the photo are dropped.
    """
    image = shrink(photo.image, max_pixels)
    # photo pixels per detection pixel, along x and y
    to_photo = np.array([photo.width / image.shape[1], photo.height / image.shape[0]])
    if to_photo.max() == 1.0:
        return detector.detect(image, min_face=min_face, threshold=threshold), (image.shape[1], image.shape[0])
    searched = None if min_face is None else max(SMALLEST_SEARCHED, int(min_face / to_photo.max()))
    found = detector.detect(image, min_face=searched, threshold=threshold)
    boxes = found.boxes.astype(np.float64)
    corners = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1) * np.tile(to_photo, 2)
    corners = np.rint(corners)
    scaled = Detections(
        np.concatenate([corners[:, :2], corners[:, 2:] - corners[:, :2]], axis=1),
        found.scores,
        None if found.landmarks is None else (found.landmarks * to_photo).astype(np.float32),
    )
    if min_face is not None and len(scaled):
        scaled = scaled[np.flatnonzero(scaled.boxes[:, 2:].max(axis=1) >= min_face)]
    return scaled, (image.shape[1], image.shape[0])


def crop_source(photo: Photo, found: Detections, input_side: int) -> tuple[np.ndarray, np.ndarray]:
    """The image faces are cut from, and the factors from photo to its pixels (x, y).

    The reduced copy when every face there is at least :data:`CROP_OVERSAMPLING` × the model's input side;
    else the full-resolution photo (decoded now, once).
    """
    sx, sy = photo.scale
    if photo.reduced and len(found):
        smallest = float(found.boxes[:, 2:].min(axis=0).min()) / max(sx, sy)
        if smallest >= CROP_OVERSAMPLING * input_side:
            return photo.image, np.array([1.0 / sx, 1.0 / sy])
    return photo.full(), np.ones(2)


def predict_faces(
    photo: Photo | np.ndarray,
    classifier: OnnxClassifier | EnsembleClassifier | MicroBatcher,
    detector: FaceDetector,
    timer: StageTimer,
    detect: bool = True,
    max_faces: int = 50,
    min_face: int | None = None,
    threshold: float | None = None,
    align: bool = True,
    detect_max_pixels: int = 0,
) -> Prediction:
    """Classify every face in ``photo`` (a :class:`Photo`, or a BGR uint8 image) in one batched onnxruntime
    call (shared with concurrent requests when ``classifier`` is a :class:`MicroBatcher`).

    Faces are found on a copy of at most ``detect_max_pixels`` pixels (0: the image as decoded) and reported
    in full-resolution pixels. With ``detect=False`` the whole image is taken to be one face crop. Faces with
    landmarks are aligned (``mien.service.align``) when ``align`` is true; the others are cropped with the
    spec's margin, as in training.
    """
    if isinstance(photo, np.ndarray):
        photo = Photo(photo, photo.shape[1], photo.shape[0])
    with timer.stage("detect"):
        if detect:
            found, detected_at = detect_in_photo(photo, detector, detect_max_pixels, min_face, threshold)
        else:
            found, detected_at = Detections(np.array([[0, 0, photo.width, photo.height]], dtype=np.int32)), None
    truncated = max(0, len(found) - max_faces)
    found = found[:max_faces]
    boxes = found.boxes
    aligned = align and found.landmarks is not None
    spec = classifier.spec
    if photo.reduced:
        with timer.stage("decode"):  # the full-resolution photo, only when a face is too small in the reduced copy
            image, to_image = crop_source(photo, found, max(spec.input_size))
    else:
        image, to_image = photo.image, np.ones(2)
    with timer.stage("preprocess"):
        if aligned:
            template = getattr(detector, "template", FER2013_TEMPLATE)  # framed in this detector's landmarks
            crops = [align_face(image, points * to_image, template) for points in found.landmarks]
        else:
            crops = crop_faces(image, scale_boxes(boxes, to_image), spec.crop_margin)
    with timer.stage("classify"):  # each model (or ensemble member) resizes and normalises per its spec
        probabilities = classifier.predict_crops(crops) if len(boxes) else np.zeros((0, spec.num_classes), np.float32)
    return Prediction(
        boxes=boxes,
        probabilities=probabilities,
        labels=spec.labels,
        truncated=truncated,
        batch_sizes=[len(boxes)] if len(boxes) and not isinstance(classifier, MicroBatcher) else [],
        scores=found.scores,
        landmarks=found.landmarks,
        aligned=aligned,
        detected_at=detected_at,
    )
