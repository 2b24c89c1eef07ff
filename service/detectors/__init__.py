"""The face detectors the service can run, chosen by name from :data:`DETECTORS`.

``yunet`` (the default) is YuNet through onnxruntime, with five landmarks; ``mtcnn`` is MTCNN through
onnxruntime, with five landmarks; ``haar`` is OpenCV's cascade. ``onnx`` (the name of the only ONNX detector
before YuNet) stays an alias of the service's default landmark detector (:func:`resolve`). Each implements
:class:`~mien.service.detectors.base.FaceDetector` (one method, ``detect``); another detector is a module
here and a row in the table (and a name in :data:`DetectorName`).
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
    "ALIAS",
    "BUNDLED_DIR",
    "DETECTOR_FOLDER",
    "DETECTORS",
    "Detections",
    "DetectorName",
    "DetectorOptions",
    "FaceDetector",
    "detector_dir",
    "load_detectors",
    "resolve",
]

log = logging.getLogger(__name__)

#: The names a request (``?detector=``) or ``MIEN_DETECTOR`` may give: the keys of :data:`DETECTORS` and ``onnx``.
DetectorName = Literal["yunet", "mtcnn", "haar", "onnx"]
ALIAS = "onnx"
LANDMARK_DETECTORS = ("yunet", "mtcnn")


def resolve(name: str, default: str) -> str:
    """The detector a name means: ``onnx`` is the service's default when that is a landmark detector, else
    YuNet; any other name is itself."""
    if name != ALIAS:
        return name
    return default if default in LANDMARK_DETECTORS else LANDMARK_DETECTORS[0]


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


def _mtcnn(options: DetectorOptions) -> MtcnnDetector:
    detector = MtcnnDetector.from_dir(options.folder, options.providers, options.session, **_scored(options))
    detector.warm_up()  # onnxruntime's first-run allocations at start-up, not in the first request
    return detector


def _yunet(options: DetectorOptions) -> YunetDetector:
    detector = YunetDetector.from_dir(options.folder, options.providers, options.session, **_scored(options))
    detector.warm_up()
    return detector


#: Every detector by name: how to build it from the settings.
DETECTORS: dict[str, Callable[[DetectorOptions], FaceDetector]] = {"yunet": _yunet, "mtcnn": _mtcnn, "haar": _haar}


def load_detectors(default: str, options: DetectorOptions) -> dict[str, FaceDetector]:
    """Every detector that can load, by name (and ``onnx``, the default landmark detector), so that a request
    can pick any without a reload.

    The default must load (start-up fails otherwise); another whose files are missing is left out.
    """
    default = resolve(default, default)
    if default not in DETECTORS:
        raise ValueError(f"unknown face detector {default!r}; known: {', '.join(DETECTORS)}")
    detectors: dict[str, FaceDetector] = {}
    for name, build in DETECTORS.items():
        try:
            detectors[name] = build(options)
        except DetectorFilesMissing as exc:
            if name == default:
                raise
            log.warning("face detector %s not loaded (%s); serving the others only", name, exc)
    if resolve(ALIAS, default) in detectors:
        detectors[ALIAS] = detectors[resolve(ALIAS, default)]
    return detectors
