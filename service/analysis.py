"""``mien analyze`` in-process: every face of an image, a folder of images, a video or a camera, tracked
across frames, written as rows, summarised per track, plotted over time and drawn onto the video.

No HTTP and no micro-batcher: :class:`Analyzer` loads one model and one detector and runs the service's own
pipeline (:func:`mien.service.pipeline.predict_faces`: detect on a bounded copy, align, crop) on each frame,
then classifies the faces of a whole batch of frames in one onnxruntime call. Frames are read, analysed and
handed on one batch at a time, so memory is bounded by ``batch_size``, never by the length of the video;
the writers stream (parquet in bounded row groups), the summary keeps a few numbers per track.

Faces of consecutive video or camera frames get a track id (:mod:`mien.service.tracking`); still images
are not a sequence and get none. ``smooth`` averages each track's probabilities over time (EMA).

This module analyses; the rows, their writers and the summary per track are in :mod:`mien.service.rows`, the
timeline plot and the annotated video in :mod:`mien.service.drawing`. Their public names are importable from
here too, the engine's one entry point.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from mien.ensemble import ENSEMBLE_SUFFIX, EnsembleClassifier, load_classifier
from mien.runtime import DEFAULT_PROVIDERS, OnnxClassifier, SessionConfig
from mien.service.config import Settings
from mien.service.detectors import DETECTORS, DetectorOptions, FaceDetector, detector_dir, resolve
from mien.service.drawing import (
    TimelineBuilder,
    VideoAnnotator,
    annotate,
    check_annotate,
    check_plot,
    draw_faces,
    plot_timeline,
    timeline,
)
from mien.service.frames import DEFAULT_MAX_PIXELS, Frame, open_frames, probe
from mien.service.pipeline import StageTimer, predict_faces
from mien.service.registry import ModelRegistry
from mien.service.rows import (
    OUTPUT_SUFFIXES,
    AnalyzeError,
    FaceRow,
    RowWriter,
    SummaryBuilder,
    TrackSummary,
    check_output,
    columns,
    format_summary,
    open_writer,
    record_schema,
    summarize,
)
from mien.service.tracking import Smoother, Tracker

__all__ = [
    "AnalyzeError",
    "AnalyzeOptions",
    "Analyzer",
    "FaceRow",
    "OUTPUT_SUFFIXES",
    "RowWriter",
    "SummaryBuilder",
    "TimelineBuilder",
    "TrackSummary",
    "VideoAnnotator",
    "annotate",
    "check_annotate",
    "check_output",
    "check_plot",
    "columns",
    "draw_faces",
    "format_summary",
    "open_writer",
    "plot_timeline",
    "record_schema",
    "summarize",
    "timeline",
]

log = logging.getLogger(__name__)


def _setting(name: str) -> Any:
    """The default of a service setting (not the environment's value: options are explicit)."""
    return Settings.model_fields[name].default


@dataclass
class AnalyzeOptions:
    """How to analyse a source. Detection options mean what the service's query parameters mean
    (``min_face``, ``threshold``, ``max_faces``, ``align``, ``detect_max_pixels``) and default to its settings.

    ``fps``: frames sampled per second of video (None: every frame); ``batch_size``: frames read and analysed
    at once (memory is bounded by it); ``max_missed``: frames a track survives without its face; ``iou``: the
    overlap a face needs with a track to join it; ``smooth``: EMA factor of the probabilities per track, the
    weight of the newest frame (None: off); ``max_pixels``: the largest still image decoded.
    """

    model: str = field(default_factory=lambda: _setting("default_model"))
    detector: str = field(default_factory=lambda: _setting("detector"))
    fps: float | None = None
    batch_size: int = field(default_factory=lambda: _setting("batch_max_size"))
    min_face: int = field(default_factory=lambda: _setting("min_face"))
    threshold: float | None = field(default_factory=lambda: _setting("face_threshold"))
    max_faces: int = field(default_factory=lambda: _setting("max_faces"))
    align: bool = True
    detect_max_pixels: int = field(default_factory=lambda: _setting("detect_max_pixels"))
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_missed: int = 5
    iou: float = 0.3
    smooth: float | None = None
    threads: int = field(default_factory=lambda: _setting("threads"))

    def __post_init__(self) -> None:
        problems = []
        if self.fps is not None and not (np.isfinite(self.fps) and self.fps > 0):
            problems.append(f"fps must be a positive number, got {self.fps}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be at least 1, got {self.batch_size}")
        if self.min_face < 1:
            problems.append(f"min_face must be at least 1 pixel, got {self.min_face}")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            problems.append(f"threshold must be between 0 and 1, got {self.threshold}")
        if self.max_faces < 1:
            problems.append(f"max_faces must be at least 1, got {self.max_faces}")
        if self.detect_max_pixels < 0 or self.max_pixels < 1:
            problems.append("detect_max_pixels must be >= 0 and max_pixels >= 1")
        if self.max_missed < 0:
            problems.append(f"max_missed must be >= 0, got {self.max_missed}")
        if not 0.0 < self.iou <= 1.0:
            problems.append(f"iou must be in (0, 1], got {self.iou}")
        if self.smooth is not None and not 0.0 < self.smooth <= 1.0:
            problems.append(f"smooth must be in (0, 1] (the weight of the newest frame), got {self.smooth}")
        if self.threads < 0:
            problems.append(f"threads must be >= 0, got {self.threads}")
        if problems:
            raise AnalyzeError("; ".join(problems))


class _DeferredClassifier:
    """Stands in for the classifier in :func:`predict_faces`: it keeps each frame's face crops and answers
    placeholders, so that the faces of a whole batch of frames go through the real classifier in one call."""

    def __init__(self, spec) -> None:
        self.spec = spec
        self.crops: list[np.ndarray] = []

    def predict_crops(self, crops: list[np.ndarray]) -> np.ndarray:
        self.crops.extend(crops)
        return np.zeros((len(crops), self.spec.num_classes), np.float32)


def batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def load_model(
    model_dir: Path, model_id: str, providers: tuple[str, ...], session: SessionConfig
) -> OnnxClassifier | EnsembleClassifier:
    """Model ``model_id`` of the folder: ``<id>.onnx`` or ``<id>.ensemble.json`` when its metadata agrees, else
    found as the service finds it (every model of the folder loaded, ModelNotFound listing the ids)."""
    if not model_dir.is_dir():
        raise AnalyzeError(f"model folder {model_dir} does not exist (--model-dir or MIEN_MODEL_DIR)")
    for path in (model_dir / f"{model_id}.onnx", model_dir / f"{model_id}{ENSEMBLE_SUFFIX}"):
        if path.is_file():
            try:
                classifier = load_classifier(path, providers, session)
            except Exception as exc:
                raise AnalyzeError(f"cannot load model {path}: {type(exc).__name__}: {exc}") from None
            if classifier.model_id == model_id:
                return classifier
    return ModelRegistry.load(model_dir, model_id, providers, session).get(model_id).classifier


def load_detector(
    name: str, folder: Path, options: AnalyzeOptions, providers: tuple[str, ...], session: SessionConfig
) -> tuple[str, FaceDetector]:
    """The detector a name means (``onnx``: the default landmark detector), built and warmed up."""
    resolved = resolve(name, _setting("detector"))
    if resolved not in DETECTORS:
        raise AnalyzeError(f"unknown face detector {name!r}; known: {', '.join([*DETECTORS, 'onnx'])}")
    built = DETECTORS[resolved](DetectorOptions(folder, providers, session, options.min_face, options.threshold))
    return resolved, built


class Analyzer:
    """One model and one detector, in process; :meth:`analyze` streams the rows of a whole source."""

    def __init__(
        self,
        classifier: OnnxClassifier | EnsembleClassifier,
        detector: FaceDetector,
        options: AnalyzeOptions,
        detector_name: str = "",
    ) -> None:
        self.classifier = classifier
        self.detector = detector
        self.options = options
        self.detector_name = detector_name
        self.timer = StageTimer()  # milliseconds per stage over everything analysed
        self.frames_seen = 0

    @classmethod
    def load(
        cls,
        model_dir: Path,
        options: AnalyzeOptions,
        providers: tuple[str, ...] = DEFAULT_PROVIDERS,
        detector_dir: Path | None = None,
    ) -> Analyzer:
        """Model ``options.model`` from ``model_dir`` and detector ``options.detector`` from ``detector_dir``
        (default: as the service resolves it: ``<model_dir>/detector`` or the bundled folder)."""
        model_dir = Path(model_dir)
        session = SessionConfig(intra_op_threads=options.threads)
        folder = _detector_folder(detector_dir, model_dir)
        name, detector = load_detector(options.detector, folder, options, providers, session)
        classifier = load_model(model_dir, options.model, providers, session)
        return cls(classifier, detector, options, name)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.classifier.spec.labels)

    @property
    def model_id(self) -> str:
        return self.classifier.model_id

    def analyze_frame_batch(self, frames: list[Frame]) -> list[list[FaceRow]]:
        """The faces of each frame (largest first), untracked; one classifier call for the whole batch."""
        options = self.options
        deferred = _DeferredClassifier(self.classifier.spec)
        predictions = [
            predict_faces(frame.image, deferred, self.detector, self.timer, max_faces=options.max_faces,  # type: ignore[arg-type]
                          min_face=options.min_face, threshold=options.threshold, align=options.align,
                          detect_max_pixels=options.detect_max_pixels)
            for frame in frames
        ]  # fmt: skip
        with self.timer.stage("classify"):
            probabilities = self.classifier.predict_crops(deferred.crops) if deferred.crops else None
        deferred.crops.clear()
        labels = self.labels
        out: list[list[FaceRow]] = []
        start = 0
        for frame, prediction in zip(frames, predictions, strict=True):
            rows = []
            for i, box in enumerate(prediction.boxes):
                probs = probabilities[start + i]  # type: ignore[index]
                top = int(np.argmax(probs))
                points = None if prediction.landmarks is None else prediction.landmarks[i].astype(float).tolist()
                score = None if prediction.scores is None else float(prediction.scores[i])
                rows.append(FaceRow(
                    frame.source, frame.index, frame.timestamp, None, tuple(int(v) for v in box), points,
                    labels[top], float(probs[top]), {label: float(p) for label, p in zip(labels, probs, strict=True)},
                    score,
                ))  # fmt: skip
            start += len(prediction.boxes)
            out.append(rows)
        self.frames_seen += len(frames)
        return out

    def analyze_batch(self, frames: list[Frame]) -> list[FaceRow]:
        """Every face of every frame, in frame order (untracked): a pure function of the frames."""
        return [row for rows in self.analyze_frame_batch(frames) for row in rows]

    def analyze_frames(
        self, source: str | int | Path | Iterable[Frame], progress: bool = False
    ) -> Iterator[tuple[Frame, list[FaceRow]]]:
        """Each frame of the source with its faces' rows, tracked (videos, cameras) and smoothed when asked.

        ``source`` is a path, a camera index, or any iterable of :class:`Frame`. Frames are read
        ``batch_size`` at a time; ``progress`` shows a tqdm bar on stderr (frames, frames per second, ETA when
        the frame count is known).
        """
        options = self.options
        if isinstance(source, str | int | Path):
            total = probe(source, options.fps).frames
            frames: Iterable[Frame] = open_frames(source, options.fps, options.max_pixels)
        else:
            total, frames = None, source
        bar = _progress_bar(total) if progress else None
        tracker = Tracker(max_missed=options.max_missed, min_iou=options.iou)
        smoother = Smoother(options.smooth) if options.smooth is not None else None
        current: str | None = None
        try:
            for batch in batched(frames, options.batch_size):
                for frame, rows in zip(batch, self.analyze_frame_batch(batch), strict=True):
                    if not frame.still:
                        if frame.source != current:
                            if smoother is not None:
                                smoother.forget(tracker.active)
                            tracker.reset()
                            current = frame.source
                        self._track(rows, tracker, smoother)
                    yield frame, rows
                if bar is not None:
                    bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()

    def analyze(self, source: str | int | Path | Iterable[Frame], progress: bool = False) -> Iterator[FaceRow]:
        """Every face of the source as rows, streamed (see :meth:`analyze_frames`)."""
        for _, rows in self.analyze_frames(source, progress):
            yield from rows

    def _track(self, rows: list[FaceRow], tracker: Tracker, smoother: Smoother | None) -> None:
        boxes = np.array([row.box for row in rows], np.float64).reshape(-1, 4)
        has_points = bool(rows) and all(row.landmarks is not None for row in rows)
        points = np.array([row.landmarks for row in rows], np.float64) if has_points else None
        ids = tracker.update(boxes, points)
        if smoother is not None:
            smoother.forget(tracker.ended)
        labels = self.labels
        for row, track in zip(rows, ids, strict=True):
            row.track = track
            if smoother is not None:
                probs = smoother(track, np.array([row.probabilities[label] for label in labels]))
                top = int(np.argmax(probs))
                row.probabilities = {label: float(p) for label, p in zip(labels, probs, strict=True)}
                row.label, row.score, row.smoothed = labels[top], float(probs[top]), True


def _detector_folder(configured: Path | None, model_dir: Path) -> Path:
    return detector_dir(None if configured is None else Path(configured), model_dir)


def _progress_bar(total: int | None):
    try:
        from tqdm import tqdm
    except ImportError:
        log.warning("no progress bar: tqdm is not installed (pip install 'mien[analyze]')")
        return None
    return tqdm(total=total, unit="frame", dynamic_ncols=True, file=sys.stderr)
