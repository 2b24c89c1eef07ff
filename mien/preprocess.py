"""Turn face crops into model input exactly as the preprocessing spec says (numpy + OpenCV only).

Used by the service on detected faces, and by export and evaluation when they feed an ONNX file, so
that every path into a model goes through the same arithmetic as training.
"""

from __future__ import annotations

import cv2
import numpy as np

from mien.spec import PreprocessSpec


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Return ``image`` (H×W gray or H×W×3 BGR, uint8) with 1 or 3 channels as H×W×C."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        # A grayscale crop is repeated on all three channels for a colour model.
        return image if channels == 1 else np.repeat(image, 3, axis=2)
    if channels == 1:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)[:, :, None]
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)  # models that take colour are trained on RGB


def to_model_input(crops: list[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    """Resize, convert and normalise crops into one float32 N×C×H×W batch."""
    height, width = spec.input_size
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
    batch = np.empty((len(crops), spec.channels, height, width), dtype=np.float32)
    for i, crop in enumerate(crops):
        if crop.shape[:2] != (height, width):
            # INTER_AREA when shrinking avoids aliasing; INTER_LINEAR when enlarging.
            shrink = crop.shape[0] > height or crop.shape[1] > width
            crop = cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        batch[i] = to_channels(crop, spec.channels).transpose(2, 0, 1)
    return (batch * np.float32(spec.scale) - mean) / std


def expand_box(
    box: tuple[int, int, int, int], margin: float, image_shape: tuple[int, ...]
) -> tuple[int, int, int, int]:
    """Grow an (x, y, w, h) box by ``margin`` of its size on each side, clipped to the image."""
    x, y, w, h = box
    dx, dy = int(round(w * margin)), int(round(h * margin))
    x0, y0 = max(0, x - dx), max(0, y - dy)
    x1, y1 = min(image_shape[1], x + w + dx), min(image_shape[0], y + h + dy)
    return x0, y0, x1 - x0, y1 - y0
