"""Face detectors the service can run: ``onnx`` (MTCNN through onnxruntime, the default) and ``haar``."""

from __future__ import annotations

import logging
from pathlib import Path

from mien.service.detect import FaceDetector, HaarFaceDetector
from mien.service.detectors.mtcnn import MtcnnDetector

from mien.runtime import DEFAULT_PROVIDERS, SessionConfig

log = logging.getLogger(__name__)

DETECTORS = ("onnx", "haar")
# The detector `mien export detector` writes into the repository's models/ folder.
BUNDLED_DIR = Path(__file__).resolve().parents[2] / "models" / "detector"


def detector_dir(configured: Path | None, model_dir: Path) -> Path:
    """The configured folder; else ``<model_dir>/detector`` when it holds the nets; else the bundled folder."""
    if configured is not None:
        return configured
    local = model_dir / "detector"
    return local if (local / "mtcnn_pnet.onnx").is_file() else BUNDLED_DIR


def load_detectors(
    default: str,
    folder: Path,
    providers: tuple[str, ...] = DEFAULT_PROVIDERS,
    threads: int | SessionConfig = 0,
    min_face: int = 20,
    threshold: float = 0.9,
    max_concurrent: int = 0,
) -> dict[str, FaceDetector]:
    """Every detector that can load, by name, so a request can pick either without a reload.

    The default detector must load (start-up fails otherwise); the ONNX one is optional only when
    Haar is the default. ``max_concurrent`` bounds the ONNX detections running at once (0: none).
    """
    detectors: dict[str, FaceDetector] = {"haar": HaarFaceDetector()}
    try:
        detectors["onnx"] = MtcnnDetector.from_dir(
            folder, providers, threads, min_face=min_face, threshold=threshold, max_concurrent=max_concurrent
        )
    except FileNotFoundError:
        if default == "onnx":
            raise
        log.warning("no ONNX face detector in %s; serving the Haar cascade only", folder)
    return detectors


def warm_up_detectors(detectors: dict[str, FaceDetector]) -> list[str]:
    """Run every detector that can warm up (the ONNX one) once; the names of those that did."""
    warmed = []
    for name, detector in detectors.items():
        warm_up = getattr(detector, "warm_up", None)
        if callable(warm_up):
            warm_up()
            warmed.append(name)
    return warmed
