"""What ``mien analyze`` draws: each tracked face's probabilities over time (a matplotlib plot) and the video
with every face's box, track, label and probabilities drawn on its frames (OpenCV, streamed)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np

from mien.service.frames import Frame
from mien.service.rows import AnalyzeError, FaceRow

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
