"""The face detectors the service can run, chosen by name from :data:`DETECTORS`.

``mtcnn`` is MTCNN through onnxruntime, with five landmarks, also named ``onnx`` (the default); ``yunet`` is
YuNet through onnxruntime, with five landmarks; ``haar`` is OpenCV's cascade. Each implements
:class:`~mien.service.detectors.base.FaceDetector` (one method, ``detect``); another
detector is a module here and a row in the table (and a name in :data:`DetectorName`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mien.paths import DETECTOR_FOLDER
from mien.runtime import DEFAULT_PROVIDERS, SessionConfig
from mien.service.detectors.base import Detections, FaceDetector
from mien.service.detectors.haar import HaarFaceDetector
from mien.service.detectors.mtcnn import MtcnnDetector
from mien.service.detectors.yunet import YunetDetector
from mien.service.exceptions import DetectorFilesMissing

__all__ = [
    "BUNDLED_DIR",
    "DETECTOR_FOLDER",
    "DETECTORS",
    "Detections",
    "DetectorName",
    "DetectorOptions",
    "FaceDetector",
    "detector_dir",
    "load_detectors",
]

log = logging.getLogger(__name__)

#: The names a request (``?detector=``) or ``MIEN_DETECTOR`` may give: the keys of :data:`DETECTORS`.
DetectorName = Literal["onnx", "mtcnn", "yunet", "haar"]


def source_checkout(module_file: str | Path = __file__) -> Path | None:
    """The repository root when mien runs from a source checkout (an editable install), else None.

    This file is ``<checkout>/service/detectors/__init__.py`` there; installed from a wheel it is
    ``site-packages/mien/service/detectors/__init__.py``, and no pyproject.toml sits two folders up.
    """
    root = Path(module_file).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


_CHECKOUT = source_checkout()
#: The detector committed in a source checkout's ``models/``; None when installed (the wheel ships no detector).
BUNDLED_DIR: Path | None = None if _CHECKOUT is None else _CHECKOUT / "models" / DETECTOR_FOLDER


#: The ONNX files of each detector that has some, by the function that names them in a folder.
DETECTOR_FILES = (MtcnnDetector.net_paths, YunetDetector.net_paths)


def detector_dir(configured: Path | None, model_dir: Path) -> Path:
    """The configured folder; else ``<model_dir>/detector`` when it holds any detector's ONNX file (or there is
    no bundled folder to fall back on); else the bundled folder."""
    if configured is not None:
        return configured
    local = model_dir / DETECTOR_FOLDER
    if BUNDLED_DIR is None or any(path.is_file() for paths in DETECTOR_FILES for path in paths(local)):
        return local
    return BUNDLED_DIR


@dataclass(frozen=True)
class DetectorOptions:
    """What a detector is built from: the service's settings (each detector takes what applies to it)."""

    folder: Path
    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    session: int | SessionConfig = 0
    min_face: int = 20  # pixels: the default of ?min_face=
    threshold: float | None = None  # the default of ?threshold=; None: each detector's own (MTCNN 0.9, YuNet 0.5)
    max_concurrent: int = 0  # ONNX detections running at once; 0: no bound


def _scored(options: DetectorOptions) -> dict:
    """The keyword arguments every detector with scores is built with."""
    kw = {"min_face": options.min_face, "max_concurrent": options.max_concurrent}
    return kw if options.threshold is None else {**kw, "threshold": options.threshold}


def _haar(options: DetectorOptions) -> HaarFaceDetector:
    return HaarFaceDetector()


def _onnx(options: DetectorOptions) -> MtcnnDetector:
    detector = MtcnnDetector.from_dir(options.folder, options.providers, options.session, **_scored(options))
    detector.warm_up()  # onnxruntime's first-run allocations at start-up, not in the first request
    return detector


def _yunet(options: DetectorOptions) -> YunetDetector:
    detector = YunetDetector.from_dir(options.folder, options.providers, options.session, **_scored(options))
    detector.warm_up()
    return detector


#: Every detector by name: how to build it from the settings. Names with the same builder share one detector.
DETECTORS: dict[str, Callable[[DetectorOptions], FaceDetector]] = {
    "onnx": _onnx,
    "mtcnn": _onnx,
    "yunet": _yunet,
    "haar": _haar,
}


def load_detectors(default: str, options: DetectorOptions) -> dict[str, FaceDetector]:
    """Every detector that can load, by name, so that a request can pick any without a reload.

    The default must load (start-up fails otherwise); another whose files are missing is left out. Names
    that share a builder (``onnx`` and ``mtcnn``) share one detector, built once.
    """
    if default not in DETECTORS:
        raise ValueError(f"unknown face detector {default!r}; known: {', '.join(DETECTORS)}")
    built: dict[Callable, FaceDetector | DetectorFilesMissing] = {}
    for build in dict.fromkeys(DETECTORS.values()):
        try:
            built[build] = build(options)
        except DetectorFilesMissing as exc:
            built[build] = exc
    detectors: dict[str, FaceDetector] = {}
    for name, build in DETECTORS.items():
        if isinstance(built[build], DetectorFilesMissing):
            if name == default:
                raise built[build]
            log.warning("face detector %s not loaded (%s); serving the others only", name, built[build])
        else:
            detectors[name] = built[build]
    return detectors
