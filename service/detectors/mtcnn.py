"""MTCNN face detection with five landmarks: three small ONNX nets, and the cascade around them in numpy.

The nets are exported from facenet-pytorch's wheel by ``mien export detector``; everything between them
(the image pyramid, P-Net box generation, NMS, box regression, squaring, crops with padding, landmark
decoding) is here, so the ONNX files stay plain convolutional nets.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from mien.runtime import DEFAULT_PROVIDERS, SessionConfig, make_session
from mien.service.align import FER2013_TEMPLATE
from mien.service.detectors.base import Detections
from mien.service.detectors.nms import apply_regression, nms, square, to_xywh
from mien.service.exceptions import DetectorFilesMissing

NETS = ("pnet", "rnet", "onet")  # files mtcnn_<net>.onnx, written by `mien export detector`
CELL = 12  # P-Net's receptive field: it scores 12×12 windows ...
STRIDE = 2  # ... every 2 pixels of the scaled image


def normalise(rgb: np.ndarray) -> np.ndarray:
    """H×W×3 (or N×H×W×3) uint8 RGB → float32 NCHW in [-1, 1), as the nets were trained."""
    x = (rgb.astype(np.float32) - 127.5) * (1.0 / 128.0)
    return x[None].transpose(0, 3, 1, 2) if x.ndim == 3 else x.transpose(0, 3, 1, 2)


def pyramid_scales(height: int, width: int, min_face: float, factor: float = 0.709, max_side: int = 0) -> list[float]:
    """Scales at which P-Net's 12-pixel window sees faces from ``min_face`` pixels up to the whole image.

    With ``max_side``, the first (largest) scaled image is at most that long: on a big photo the
    smallest searchable face grows instead of the cost.
    """
    first = CELL / min_face
    if max_side and max(height, width) * first > max_side:
        first = max_side / max(height, width)
    scales = []
    scale = first
    while min(height, width) * scale >= CELL:
        scales.append(scale)
        scale *= factor
    return scales


def pnet_boxes(prob: np.ndarray, reg: np.ndarray, scale: float, threshold: float) -> np.ndarray:
    """Candidate boxes from one P-Net output: rows ``x1, y1, x2, y2, score, dx1, dy1, dx2, dy2`` in image pixels.

    ``prob`` is rows×cols, ``reg`` is 4×rows×cols; cell (r, c) is the 12×12 window at (2c, 2r) of the scaled image.
    """
    rows, cols = np.nonzero(prob >= threshold)
    if rows.size == 0:
        return np.zeros((0, 9), dtype=np.float32)
    x1 = cols * STRIDE / scale
    y1 = rows * STRIDE / scale
    side = CELL / scale
    return np.column_stack([x1, y1, x1 + side, y1 + side, prob[rows, cols], reg[:, rows, cols].T]).astype(np.float32)


def crop_patches(rgb: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Each box cut from the image (zero outside it) and resized to size×size: N×size×size×3 uint8."""
    height, width = rgb.shape[:2]
    patches = np.zeros((len(boxes), size, size, 3), dtype=np.uint8)
    for i, (x1, y1, x2, y2) in enumerate(np.round(boxes[:, :4]).astype(np.int64)):
        bw, bh = max(int(x2 - x1), 1), max(int(y2 - y1), 1)
        patch = np.zeros((bh, bw, 3), dtype=np.uint8)
        sx0, sy0, sx1, sy1 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
        if sx1 > sx0 and sy1 > sy0:
            patch[sy0 - y1 : sy1 - y1, sx0 - x1 : sx1 - x1] = rgb[sy0:sy1, sx0:sx1]
        shrink = bw > size or bh > size
        patches[i] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return patches


class MtcnnDetector:
    """P-Net proposals on an image pyramid → R-Net (24×24) → O-Net (48×48, landmarks).

    ``stage_thresholds`` are the face probabilities P-Net and R-Net need to pass a box on (the paper's);
    ``threshold`` is the final O-Net score a face must reach (per call, the ``threshold`` query parameter).
    ``max_side`` caps the longest side of the first pyramid level: on photos over max_side × min_face / 12
    pixels the smallest face searched grows with the photo instead of the cost.

    ``max_concurrent`` bounds the detections that run at once (0: no bound). Every run holds its pyramid's
    activations (tens of MB on a large photo) and onnxruntime already spreads one run over the cores, so
    detections beyond one or two per core add memory (kept by the allocators afterwards), not throughput;
    the other requests wait for a slot.
    """

    template = FER2013_TEMPLATE  # FER2013's framing in MTCNN's landmarks (mien.service.align)

    def __init__(
        self,
        pnet: ort.InferenceSession,
        rnet: ort.InferenceSession,
        onet: ort.InferenceSession,
        min_face: int = 20,
        threshold: float = 0.9,
        stage_thresholds: tuple[float, float] = (0.6, 0.7),
        factor: float = 0.709,
        max_side: int = 1280,
        max_concurrent: int = 0,
    ) -> None:
        self.pnet, self.rnet, self.onet = pnet, rnet, onet
        self.max_concurrent = max_concurrent
        self._slots = threading.BoundedSemaphore(max_concurrent) if max_concurrent > 0 else contextlib.nullcontext()
        self.min_face = min_face
        self.threshold = threshold
        self.stage_thresholds = stage_thresholds
        self.factor = factor
        self.max_side = max_side

    @staticmethod
    def net_paths(folder: str | Path) -> list[Path]:
        """The three ONNX files the detector loads from ``folder``."""
        return [Path(folder) / f"mtcnn_{net}.onnx" for net in NETS]

    @classmethod
    def from_dir(
        cls,
        folder: str | Path,
        providers: tuple[str, ...] = DEFAULT_PROVIDERS,
        threads: int | SessionConfig = 0,
        **kw,
    ) -> MtcnnDetector:
        paths = cls.net_paths(folder)
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DetectorFilesMissing(f"detector files missing: {', '.join(missing)}; run `mien export detector`")
        return cls(*(make_session(p, providers, threads) for p in paths), **kw)

    @property
    def provider(self) -> str:
        return self.onet.get_providers()[0]

    def warm_up(self, side: int = 480) -> None:
        """Run each of the three nets once (P-Net on a ``side``-pixel image, R-Net and O-Net on one patch),
        so that the first request does not pay for onnxruntime's first-run allocations."""
        self.pnet.run(None, {"image": np.zeros((1, 3, side, side), np.float32)})
        self.rnet.run(None, {"image": np.zeros((1, 3, 24, 24), np.float32)})
        self.onet.run(None, {"image": np.zeros((1, 3, 48, 48), np.float32)})

    def detect(self, image: np.ndarray, min_face: int | None = None, threshold: float | None = None) -> Detections:
        """Faces in a BGR (or gray) uint8 image, largest first, with scores and landmarks."""
        min_face = self.min_face if min_face is None else min_face
        threshold = self.threshold if threshold is None else threshold
        with self._slots:
            rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB if image.ndim == 2 else cv2.COLOR_BGR2RGB)
            boxes = self._proposals(rgb, min_face)
            boxes = self._refine(rgb, boxes)
            boxes, landmarks = self._output(rgb, boxes, threshold)
        xywh = to_xywh(boxes, rgb.shape)
        # P-Net also fires on faces somewhat smaller than its window at the first scale: min_face is a promise.
        keep = (xywh[:, 2] > 0) & (xywh[:, 3] > 0) & (np.maximum(xywh[:, 2], xywh[:, 3]) >= min_face)
        return Detections(xywh[keep], boxes[keep, 4].astype(np.float32), landmarks[keep]).sorted_by_area()

    def _proposals(self, rgb: np.ndarray, min_face: int) -> np.ndarray:
        height, width = rgb.shape[:2]
        found = []
        for scale in pyramid_scales(height, width, max(min_face, CELL), self.factor, self.max_side):
            size = (max(int(np.ceil(width * scale)), CELL), max(int(np.ceil(height * scale)), CELL))
            scaled = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
            prob, reg = self.pnet.run(None, {"image": normalise(scaled)})
            boxes = pnet_boxes(prob[0], reg[0], scale, self.stage_thresholds[0])
            found.append(boxes[nms(boxes[:, :4], boxes[:, 4], 0.5)])
        boxes = np.concatenate(found) if found else np.zeros((0, 9), np.float32)
        boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]
        return square(apply_regression(boxes[:, :4], boxes[:, 5:9]))

    def _refine(self, rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        if len(boxes) == 0:
            return boxes
        prob, reg = self.rnet.run(None, {"image": normalise(crop_patches(rgb, boxes, 24))})
        keep = prob >= self.stage_thresholds[1]
        boxes, prob, reg = boxes[keep], prob[keep], reg[keep]
        keep = nms(boxes, prob, 0.7)
        return square(apply_regression(boxes[keep], reg[keep]))

    def _output(self, rgb: np.ndarray, boxes: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Final boxes (x1, y1, x2, y2, score) and landmarks (N×5×2: eyes, nose, mouth corners, as seen)."""
        if len(boxes) == 0:
            return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
        prob, reg, marks = self.onet.run(None, {"image": normalise(crop_patches(rgb, boxes, 48))})
        keep = prob >= threshold
        boxes, prob, reg, marks = boxes[keep], prob[keep], reg[keep], marks[keep]
        w = (boxes[:, 2] - boxes[:, 0])[:, None]
        h = (boxes[:, 3] - boxes[:, 1])[:, None]
        points = np.stack([boxes[:, :1] + w * marks[:, :5], boxes[:, 1:2] + h * marks[:, 5:]], axis=2)
        final = apply_regression(boxes, reg)
        keep = nms(final, prob, 0.7, mode="min")
        return np.column_stack([final[keep], prob[keep]]), points[keep].astype(np.float32)
