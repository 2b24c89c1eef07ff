"""The rows ``mien analyze`` produces, one per face per frame, and what becomes of them: written as they come
(jsonl, csv or parquet, streamed) and summarised per track (a few numbers per track, whatever the length of
the video). Shared by the CLI, ``POST /analyze/video`` and the Ray pipeline (:mod:`mien.service.scale`)."""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from mien.service.exceptions import MienError


class AnalyzeError(MienError):
    """An option, an output or a model ``mien analyze`` cannot work with; the message says what to do."""


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
