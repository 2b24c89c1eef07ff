"""Box arithmetic for cascaded detectors, in plain numpy: NMS, regression, squaring.

Boxes here are float ``x1, y1, x2, y2`` rows in pixel coordinates (``x2 - x1`` is the width); the
service's public boxes are integer ``x, y, width, height`` and are made from these at the very end.
"""

from __future__ import annotations

import numpy as np


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Indices of the boxes kept by greedy non-maximum suppression, highest score first.

    ``mode="union"`` compares intersection over union; ``"min"`` divides by the smaller box instead,
    which also removes a small box lying inside a larger one (MTCNN's last stage uses it).
    """
    if mode not in ("union", "min"):
        raise ValueError(f"mode must be 'union' or 'min', got {mode!r}")
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    areas = np.maximum(x2 - x1, 0.0) * np.maximum(y2 - y1, 0.0)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        w = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]))
        inter = w * h
        denom = areas[best] + areas[rest] - inter if mode == "union" else np.minimum(areas[best], areas[rest])
        overlap = inter / np.maximum(denom, 1e-9)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)


def apply_regression(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Move each edge by the net's offset, a fraction of the box's width (x) or height (y)."""
    w = (boxes[:, 2] - boxes[:, 0])[:, None]
    h = (boxes[:, 3] - boxes[:, 1])[:, None]
    return boxes[:, :4] + reg[:, :4] * np.concatenate([w, h, w, h], axis=1)


def square(boxes: np.ndarray) -> np.ndarray:
    """Square boxes with the same centres, side = the longer side: the next net's input is square."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    cx = boxes[:, 0] + w / 2
    cy = boxes[:, 1] + h / 2
    return np.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], axis=1)


def to_xywh(boxes: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    """Integer ``x, y, width, height`` boxes clipped to the image (the service's public form)."""
    height, width = image_shape[:2]
    x1 = np.clip(np.round(boxes[:, 0]), 0, width)
    y1 = np.clip(np.round(boxes[:, 1]), 0, height)
    x2 = np.clip(np.round(boxes[:, 2]), 0, width)
    y2 = np.clip(np.round(boxes[:, 3]), 0, height)
    return np.stack([x1, y1, x2 - x1, y2 - y1], axis=1).astype(np.int32).reshape(-1, 4)
