"""``mien analyze`` in-process: every face of an image, a folder of images, a video or a camera, tracked
across frames, written as rows, summarised per track, plotted over time and drawn onto the video.

No HTTP and no micro-batcher: :class:`Analyzer` loads one model and one detector and runs the service's own
pipeline (:func:`mien.service.pipeline.predict_faces`: detect on a bounded copy, align, crop) on each frame,
then classifies the faces of a whole batch of frames in one onnxruntime call. Frames are read, analysed and
handed on one batch at a time, so memory is bounded by ``batch_size``, never by the length of the video;
the writers stream (parquet in bounded row groups), the summary keeps a few numbers per track.

Faces of consecutive video or camera frames get a track id (:mod:`mien.service.tracking`); still images
are not a sequence and get none. ``smooth`` averages each track's probabilities over time (EMA).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np

from mien.ensemble import ENSEMBLE_SUFFIX, EnsembleClassifier, load_classifier
from mien.runtime import DEFAULT_PROVIDERS, OnnxClassifier, SessionConfig
from mien.service.config import Settings
from mien.service.detectors import DETECTORS, DetectorOptions, FaceDetector, detector_dir, resolve
from mien.service.exceptions import MienError
from mien.service.frames import DEFAULT_MAX_PIXELS, Frame, open_frames, probe
from mien.service.pipeline import StageTimer, predict_faces
from mien.service.registry import ModelRegistry
from mien.service.tracking import Smoother, Tracker

__all__ = [
    "AnalyzeError",
    "AnalyzeOptions",
    "Analyzer",
    "FaceRow",
    "OUTPUT_SUFFIXES",
    "SummaryBuilder",
    "TimelineBuilder",
    "TrackSummary",
    "VideoAnnotator",
    "annotate",
    "check_output",
    "draw_faces",
    "format_summary",
    "open_writer",
    "plot_timeline",
    "summarize",
    "timeline",
]

log = logging.getLogger(__name__)


def _setting(name: str) -> Any:
    """The default of a service setting (not the environment's value: options are explicit)."""
    return Settings.model_fields[name].default


class AnalyzeError(MienError):
    """An option, an output or a model ``mien analyze`` cannot work with; the message says what to do."""


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


@dataclass
class FaceRow:
    """One face in one frame. ``box`` is x, y, width, height in the frame's pixels; ``landmarks`` five (x, y)
    points or None; ``track`` None for a still image; ``probabilities`` one per label (smoothed over the
    track when ``smoothed``), ``label``/``score`` their top one."""

    source: str
    frame: int
    timestamp: float | None
    track: int | None
    box: tuple[int, int, int, int]
    landmarks: list[list[float]] | None
    label: str
    score: float
    probabilities: dict[str, float]
    detection_score: float | None = None
    smoothed: bool = False

    def record(self, labels: Iterable[str]) -> dict[str, Any]:
        """Flat columns for jsonl, csv and parquet (:func:`columns` names them in order)."""
        x, y, width, height = self.box
        return {
            "source": self.source, "frame": self.frame, "timestamp": self.timestamp, "track": self.track,
            "x": x, "y": y, "width": width, "height": height, "landmarks": self.landmarks,
            "label": self.label, "score": self.score, "detection_score": self.detection_score,
            "smoothed": self.smoothed, **{f"p_{label}": self.probabilities[label] for label in labels},
        }  # fmt: skip


def columns(labels: Iterable[str]) -> list[str]:
    """The output columns in order: the row's fields, then ``p_<label>`` per label."""
    fixed = ["source", "frame", "timestamp", "track", "x", "y", "width", "height", "landmarks", "label", "score",
             "detection_score", "smoothed"]  # fmt: skip
    return fixed + [f"p_{label}" for label in labels]


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


# --- writing rows -----------------------------------------------------------------------------------------

OUTPUT_SUFFIXES = (".jsonl", ".csv", ".parquet")


def check_output(path: str | Path) -> str:
    """The format of an output path by its extension ('-' is jsonl on stdout); AnalyzeError for another, or
    for parquet without pyarrow."""
    if str(path) == "-":
        return ".jsonl"
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise AnalyzeError(f"{path}: unknown output format {suffix or '(no extension)'!r}; "
                           f"use {', '.join(OUTPUT_SUFFIXES)}")  # fmt: skip
    if suffix == ".parquet":
        _pyarrow()
    return suffix


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise AnalyzeError("writing .parquet needs pyarrow: pip install 'mien[analyze]'") from None
    return pa, pq


class RowWriter:
    """Rows to a file as they come; a context manager."""

    def __init__(self, labels: Iterable[str]) -> None:
        self.labels = tuple(labels)
        self.rows = 0

    def write(self, rows: Iterable[FaceRow]) -> None:
        for row in rows:
            self._write(row.record(self.labels))
            self.rows += 1

    def _write(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JsonlWriter(RowWriter):
    """One JSON object per line."""

    def __init__(self, path: str | Path, labels: Iterable[str]) -> None:
        super().__init__(labels)
        self.stream: IO[str] = sys.stdout if str(path) == "-" else open(path, "w", encoding="utf-8")  # noqa: SIM115

    def _write(self, record: dict[str, Any]) -> None:
        self.stream.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.stream is sys.stdout:
            self.stream.flush()
        else:
            self.stream.close()


class CsvWriter(RowWriter):
    """A header, then one line per face; landmarks as a JSON list, a missing value empty."""

    def __init__(self, path: str | Path, labels: Iterable[str]) -> None:
        super().__init__(labels)
        self.stream = open(path, "w", encoding="utf-8", newline="")  # noqa: SIM115
        self.writer = csv.DictWriter(self.stream, fieldnames=columns(self.labels))
        self.writer.writeheader()

    def _write(self, record: dict[str, Any]) -> None:
        if record["landmarks"] is not None:
            record["landmarks"] = json.dumps(record["landmarks"])
        self.writer.writerow(record)

    def close(self) -> None:
        self.stream.close()


def record_schema(labels: Iterable[str]):
    """The Arrow schema of :meth:`FaceRow.record` (parquet files, and the Ray actors' output batches)."""
    pa, _ = _pyarrow()
    fields = [("source", pa.string()), ("frame", pa.int64()), ("timestamp", pa.float64()), ("track", pa.int64()),
              ("x", pa.int64()), ("y", pa.int64()), ("width", pa.int64()), ("height", pa.int64()),
              ("landmarks", pa.list_(pa.list_(pa.float64()))), ("label", pa.string()), ("score", pa.float64()),
              ("detection_score", pa.float64()), ("smoothed", pa.bool_())]  # fmt: skip
    fields += [(f"p_{label}", pa.float64()) for label in labels]
    return pa.schema(fields)


class ParquetRowWriter(RowWriter):
    """Parquet through ``pyarrow.parquet.ParquetWriter``, a row group every ``group_rows`` rows (and at the
    end): memory holds at most one row group."""

    def __init__(self, path: str | Path, labels: Iterable[str], group_rows: int = 4096) -> None:
        super().__init__(labels)
        pa, pq = _pyarrow()
        self.pa = pa
        self.schema = record_schema(self.labels)
        self.writer = pq.ParquetWriter(str(path), self.schema)
        self.group_rows = group_rows
        self.buffer: list[dict[str, Any]] = []

    def _write(self, record: dict[str, Any]) -> None:
        self.buffer.append(record)
        if len(self.buffer) >= self.group_rows:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.writer.write_table(self.pa.Table.from_pylist(self.buffer, schema=self.schema))
            self.buffer = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


def open_writer(path: str | Path, labels: Iterable[str]) -> RowWriter:
    """The writer for ``path``'s extension (:data:`OUTPUT_SUFFIXES`; '-' is jsonl on stdout)."""
    suffix = check_output(path)
    if suffix == ".csv":
        return CsvWriter(path, labels)
    if suffix == ".parquet":
        return ParquetRowWriter(path, labels)
    return JsonlWriter(path, labels)


# --- the summary per track --------------------------------------------------------------------------------


@dataclass
class TrackSummary:
    """One tracked face over the source: seen from ``first`` to ``last`` (timestamps, seconds), in ``frames``
    frames worth ``seconds`` of video; ``shares`` the fraction of those frames each expression was the top one
    (they sum to 1), ``dominant`` the most frequent. ``track`` None gathers the faces of still images."""

    source: str
    track: int | None
    first: float | None
    last: float | None
    seconds: float | None
    frames: int
    dominant: str
    shares: dict[str, float]
    mean_probabilities: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SummaryBuilder:
    """:func:`summarize` a row at a time: a few numbers per track, whatever the length of the video."""

    def __init__(self, labels: Iterable[str], frame_interval: float | None = None) -> None:
        self.labels = tuple(labels)
        self.frame_interval = frame_interval
        self.tracks: dict[tuple[str | None, int | None], dict[str, Any]] = {}
        self.last_time: dict[str, float] = {}
        self.gap: float | None = None  # the shortest step between two frames seen, when no interval is given
        self.still_sources: set[str] = set()

    def add(self, row: FaceRow) -> None:
        if row.track is None:
            key: tuple[str | None, int | None] = (None, None)
            self.still_sources.add(row.source)
        else:
            key = (row.source, row.track)
        if row.timestamp is not None:
            previous = self.last_time.get(row.source)
            if previous is not None and row.timestamp > previous:
                step = row.timestamp - previous
                self.gap = step if self.gap is None else min(self.gap, step)
            self.last_time[row.source] = row.timestamp
        state = self.tracks.get(key)
        if state is None:
            zeros = np.zeros(len(self.labels))
            state = self.tracks[key] = {"first": row.timestamp, "last": row.timestamp, "frames": 0,
                                        "top": zeros.copy(), "sum": zeros.copy()}  # fmt: skip
        state["last"] = row.timestamp
        state["frames"] += 1
        state["top"][self.labels.index(row.label)] += 1
        state["sum"] += [row.probabilities[label] for label in self.labels]

    def add_all(self, rows: Iterable[FaceRow]) -> None:
        for row in rows:
            self.add(row)

    def result(self) -> list[TrackSummary]:
        """One summary per track, in the order tracks first appeared (still images last)."""
        interval = self.frame_interval if self.frame_interval is not None else self.gap
        out = []
        for (source, track), state in sorted(self.tracks.items(), key=lambda item: item[0][1] is None):
            if track is None:
                sources = sorted(self.still_sources)
                source = sources[0] if len(sources) == 1 else os.path.commonpath(sources)
                seconds = None
            else:
                seconds = state["frames"] * interval if interval is not None else 0.0
            shares = state["top"] / state["frames"]
            out.append(TrackSummary(
                source, track, state["first"], state["last"], seconds, state["frames"],
                self.labels[int(np.argmax(shares))], dict(zip(self.labels, shares.tolist(), strict=True)),
                dict(zip(self.labels, (state["sum"] / state["frames"]).tolist(), strict=True)),
            ))  # fmt: skip
        return out


def summarize(
    rows: Iterable[FaceRow], labels: Iterable[str], frame_interval: float | None = None
) -> list[TrackSummary]:
    """Per track: first and last timestamp, frames, seconds seen (frames × ``frame_interval``, by default the
    shortest step between two frames of the rows), the dominant expression and the share of frames per
    expression. The faces of still images are gathered in one summary with track None."""
    builder = SummaryBuilder(labels, frame_interval)
    builder.add_all(rows)
    return builder.result()


def format_summary(summaries: list[TrackSummary], labels: Iterable[str]) -> str:
    """A plain-text table: one line per track, the share of each expression in percent."""
    labels = tuple(labels)
    head = ["track", "seconds", "frames", "from", "to", "dominant", *labels]
    lines = [head]
    for s in summaries:
        lines.append([
            "-" if s.track is None else str(s.track),
            "-" if s.seconds is None else f"{s.seconds:.2f}",
            str(s.frames),
            "-" if s.first is None else f"{s.first:.2f}",
            "-" if s.last is None else f"{s.last:.2f}",
            s.dominant,
            *(f"{100 * s.shares[label]:.0f}%" for label in labels),
        ])  # fmt: skip
    if not summaries:
        return "no face found"
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)) for line in lines)


# --- the timeline plot ------------------------------------------------------------------------------------


class TimelineBuilder:
    """:func:`timeline` a row at a time: the timestamps and probabilities of each tracked face (8 bytes per
    label per face per frame: the plot needs them all)."""

    def __init__(self, labels: Iterable[str]) -> None:
        self.labels = tuple(labels)
        self.times: dict[tuple[str, int], list[float]] = {}
        self.probs: dict[tuple[str, int], list[np.ndarray]] = {}

    def add(self, row: FaceRow) -> None:
        if row.track is None or row.timestamp is None:
            return
        key = (row.source, row.track)
        self.times.setdefault(key, []).append(row.timestamp)
        self.probs.setdefault(key, []).append(np.array([row.probabilities[label] for label in self.labels]))

    def add_all(self, rows: Iterable[FaceRow]) -> None:
        for row in rows:
            self.add(row)

    def series(self) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
        width = len(self.labels)
        return {key: (np.array(times), np.array(self.probs[key]).reshape(-1, width))
                for key, times in self.times.items()}  # fmt: skip


def timeline(rows: Iterable[FaceRow], labels: Iterable[str]) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """Per tracked face (source, track): its timestamps (T) and probabilities (T × labels)."""
    builder = TimelineBuilder(labels)
    builder.add_all(rows)
    return builder.series()


def plot_timeline(
    rows: Iterable[FaceRow] | TimelineBuilder, path: str | Path, labels: Iterable[str], max_tracks: int = 12
) -> Path:
    """Each tracked face's probabilities over time, one panel per track (the ``max_tracks`` seen longest),
    saved by matplotlib (Agg canvas, no display) to ``path`` (.png, .svg, .pdf). ``rows`` may be a
    :class:`TimelineBuilder` already fed."""
    labels = tuple(labels)
    Figure = _matplotlib_figure()
    series = rows.series() if isinstance(rows, TimelineBuilder) else timeline(rows, labels)
    chosen = sorted(series, key=lambda key: -len(series[key][0]))[:max_tracks]
    chosen.sort(key=lambda key: (key[0], key[1]))
    figure = Figure(figsize=(10, 2.2 * max(1, len(chosen)) + 0.6), layout="constrained")
    axes = figure.subplots(max(1, len(chosen)), 1, squeeze=False)[:, 0]
    if not chosen:
        axes[0].text(0.5, 0.5, "no tracked face", ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
    for ax, key in zip(axes, chosen, strict=False):
        times, probs = _broken_at_gaps(*series[key])
        for i, label in enumerate(labels):
            ax.plot(times, probs[:, i], label=label, linewidth=1.2, marker="." if len(times) < 50 else None)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("probability")
        ax.set_title(f"track {key[1]} ({Path(key[0]).name})", fontsize=10, loc="left")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("seconds")
    if chosen:
        handles, names = axes[0].get_legend_handles_labels()
        figure.legend(handles, names, loc="outside upper center", ncol=min(len(labels), 7), fontsize=8)
    if len(series) > len(chosen):
        figure.suptitle(f"the {len(chosen)} longest of {len(series)} tracks", fontsize=10)
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path


def _broken_at_gaps(times: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A NaN point inserted where the face was missed (a step over 1.5 × the usual one), so that the plotted
    lines stop there instead of joining across the gap."""
    if len(times) < 3:
        return times, probs
    steps = np.diff(times)
    gaps = np.flatnonzero(steps > 1.5 * np.median(steps))
    if not len(gaps):
        return times, probs
    times = np.insert(times, gaps + 1, times[gaps] + steps[gaps] / 2)
    probs = np.insert(probs, gaps + 1, np.nan, axis=0)
    return times, probs


def _matplotlib_figure():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise AnalyzeError("--plot needs matplotlib: pip install 'mien[analyze]'") from None
    return Figure


def check_plot(path: str | Path) -> None:
    """AnalyzeError now, before any work, for a plot that could not be written."""
    if Path(path).suffix.lower() not in (".png", ".svg", ".pdf"):
        raise AnalyzeError(f"{path}: the timeline plot is written as .png, .svg or .pdf")
    _matplotlib_figure()


# --- the annotated video ----------------------------------------------------------------------------------

#: Track colours (BGR), by track id; faces of still images are drawn in the first.
_COLOURS = ((80, 200, 60), (60, 120, 255), (255, 160, 40), (40, 220, 230), (220, 80, 220), (255, 255, 90),
            (90, 90, 255), (160, 255, 160), (200, 140, 255), (30, 170, 255))  # fmt: skip
VIDEO_SUFFIXES_OUT = (".mp4", ".avi", ".mov", ".mkv")


def _colour(track: int | None) -> tuple[int, int, int]:
    return _COLOURS[0 if track is None else track % len(_COLOURS)]


def draw_faces(image: np.ndarray, rows: Iterable[FaceRow], labels: Iterable[str]) -> np.ndarray:
    """A copy of the frame with each face's box, landmarks, track id, top label and a bar per label."""
    labels = tuple(labels)
    out = image.copy()
    height, width = out.shape[:2]
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = max(0.35, min(width, height) / 1000)
    thick = max(1, round(min(width, height) / 400))
    line = int(22 * scale) + 2
    name_width = max(cv2.getTextSize(label, font, scale, 1)[0][0] for label in labels) + 4
    bar_width = int(80 * scale / 0.35 * 0.6)
    for row in rows:
        colour = _colour(row.track)
        x, y, w, h = row.box
        cv2.rectangle(out, (x, y), (x + w, y + h), colour, thick)
        for px, py in row.landmarks or []:
            cv2.circle(out, (round(px), round(py)), thick + 1, colour, -1)
        caption = ("" if row.track is None else f"#{row.track} ") + f"{row.label} {row.score:.2f}"
        (tw, th), _ = cv2.getTextSize(caption, font, scale * 1.2, thick)
        ty = y - 4 if y - th - 6 >= 0 else y + h + th + 4
        cv2.rectangle(out, (x, ty - th - 3), (x + tw + 2, ty + 3), colour, -1)
        cv2.putText(out, caption, (x + 1, ty), font, scale * 1.2, (0, 0, 0), thick, cv2.LINE_AA)
        panel = name_width + bar_width + 6
        left = x + w + 4 if x + w + 4 + panel <= width else max(0, x - panel - 4)
        for i, label in enumerate(labels):
            top = y + i * line
            if top + line > height:
                break
            p = row.probabilities[label]
            cv2.rectangle(out, (left, top), (left + panel, top + line), (30, 30, 30), -1)
            cv2.putText(out, label, (left + 2, top + line - 4), font, scale, (235, 235, 235), 1, cv2.LINE_AA)
            bar_left = left + name_width + 2
            cv2.rectangle(out, (bar_left, top + 3), (bar_left + bar_width, top + line - 3), (80, 80, 80), -1)
            fill = colour if label == row.label else (200, 200, 200)
            cv2.rectangle(out, (bar_left, top + 3), (bar_left + round(p * bar_width), top + line - 3), fill, -1)
    return out


def _fit(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` letterboxed into ``size`` (width, height) when its size differs (still images of a folder)."""
    width, height = size
    if image.shape[1] == width and image.shape[0] == height:
        return image
    factor = min(width / image.shape[1], height / image.shape[0])
    scaled = cv2.resize(image, (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[0] * factor))))
    canvas = np.zeros((height, width, 3), np.uint8)
    top, left = (height - scaled.shape[0]) // 2, (width - scaled.shape[1]) // 2
    canvas[top : top + scaled.shape[0], left : left + scaled.shape[1]] = scaled
    return canvas


def check_annotate(path: str | Path) -> None:
    if Path(path).suffix.lower() not in VIDEO_SUFFIXES_OUT:
        raise AnalyzeError(f"{path}: the annotated video is written as {', '.join(VIDEO_SUFFIXES_OUT)} (mp4v)")


class VideoAnnotator:
    """Frames with their faces drawn, written one at a time by ``cv2.VideoWriter`` (mp4v), opened at the first
    frame's size (later frames of another size are letterboxed into it)."""

    def __init__(self, path: str | Path, fps: float, labels: Iterable[str]) -> None:
        check_annotate(path)
        self.path = Path(path)
        self.fps = fps
        self.labels = tuple(labels)
        self.writer: cv2.VideoWriter | None = None
        self.size: tuple[int, int] | None = None
        self.frames = 0

    def write(self, frame: Frame, rows: Iterable[FaceRow]) -> None:
        image = draw_faces(frame.image, rows, self.labels)
        if self.writer is None:
            self.size = (image.shape[1], image.shape[0])
            self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self.size)
            if not self.writer.isOpened():
                raise AnalyzeError(f"{self.path}: OpenCV cannot write an mp4v video here")
        self.writer.write(_fit(image, self.size))  # type: ignore[arg-type]
        self.frames += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()

    def __enter__(self) -> VideoAnnotator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def annotate(frames: Iterable[tuple[Frame, list[FaceRow]]], path: str | Path, labels: Iterable[str], fps: float) -> int:
    """Write each (frame, rows) pair, e.g. from :meth:`Analyzer.analyze_frames`, drawn, to the video at ``path``;
    the number of frames written. Streams: one frame in memory at a time."""
    with VideoAnnotator(path, fps, labels) as annotator:
        for frame, rows in frames:
            annotator.write(frame, rows)
        return annotator.frames
