"""The prediction pipeline on a decoded image: detect → align/crop → preprocess → one batched call.

No HTTP here: routes decode the upload and turn the result into the response schema.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from mien.ensemble import EnsembleClassifier
from mien.preprocess import expand_box
from mien.runtime import OnnxClassifier
from mien.service.align import align_face
from mien.service.batching import MicroBatcher
from mien.service.detectors import Detections, FaceDetector


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


def crop_faces(image: np.ndarray, boxes: np.ndarray, margin: float) -> list[np.ndarray]:
    """Each box grown by the spec's crop margin (as in training), clipped to the image."""
    crops = []
    for box in boxes:
        x, y, w, h = expand_box(tuple(int(v) for v in box), margin, image.shape)
        crops.append(image[y : y + h, x : x + w])
    return crops


def predict_faces(
    image: np.ndarray,
    classifier: OnnxClassifier | EnsembleClassifier | MicroBatcher,
    detector: FaceDetector,
    timer: StageTimer,
    detect: bool = True,
    max_faces: int = 50,
    min_face: int | None = None,
    threshold: float | None = None,
    align: bool = True,
) -> Prediction:
    """Classify every face in ``image`` (BGR uint8) in one batched onnxruntime call (shared with concurrent
    requests when ``classifier`` is a :class:`MicroBatcher`).

    With ``detect=False`` the whole image is taken to be one face crop. Faces with landmarks are aligned
    (``mien.service.align``) when ``align`` is true; the others are cropped with the spec's margin, as in training.
    """
    height, width = image.shape[:2]
    with timer.stage("detect"):
        if detect:
            found = detector.detect(image, min_face=min_face, threshold=threshold)
        else:
            found = Detections(np.array([[0, 0, width, height]], dtype=np.int32))
    truncated = max(0, len(found) - max_faces)
    found = found[:max_faces]
    boxes = found.boxes
    aligned = align and found.landmarks is not None
    spec = classifier.spec
    with timer.stage("preprocess"):
        if aligned:
            crops = [align_face(image, points) for points in found.landmarks]
        else:
            crops = crop_faces(image, boxes, spec.crop_margin)
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
    )
