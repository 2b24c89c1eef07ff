"""The sources ``mien analyze`` reads, as generators of frames: one image, a folder of images, a video, a camera.

Every source yields :class:`Frame` objects one at a time, so memory is bounded by what the caller keeps,
never by the length of a video or the size of a folder. A still image (alone or in a folder) has no
timestamp: it is not part of a sequence and its faces are not tracked. A video's and a camera's frames have
one (seconds from the start) and are sampled by it when ``fps`` is given.

Images are decoded by :mod:`mien.service.imaging` (format sniffed, size checked against ``max_pixels`` before
decoding, EXIF orientation applied); videos by OpenCV's FFmpeg backend (mp4, webm, mov, avi, mkv, ...).
A source that cannot be read raises :class:`BadSource` with a message that says why.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from mien.service.exceptions import BadImage, MienError
from mien.service.imaging import decode_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif"})
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".webm", ".mov", ".avi", ".mkv", ".mpg", ".mpeg", ".wmv", ".flv", ".ogv"})
DEFAULT_MAX_PIXELS = 40_000_000  # Settings.max_pixels' default
#: A timestamp this close below a sampling instant still counts as reaching it (frame times are rounded).
_EPSILON = 1e-6


class BadSource(BadImage):
    """A file, folder, video or camera mien cannot read frames from (missing, unreadable, empty)."""


@dataclass
class Frame:
    """One image to analyse: where it comes from, its place in the source, and the pixels (BGR uint8).

    ``index`` is the frame's number in the video (counting every frame, sampled or not) or camera stream, or
    the image's position in a folder; ``timestamp`` is seconds from the start of a video or camera, None for a
    still image.
    """

    source: str
    index: int
    timestamp: float | None
    image: np.ndarray

    @property
    def still(self) -> bool:
        """A still image: not part of a sequence, so its faces get no track."""
        return self.timestamp is None


@dataclass(frozen=True)
class SourceInfo:
    """What is known of a source before reading it: its kind, how many frames will be yielded (None when
    unknown: a camera, or a video whose container does not say) and at what rate (None for still images)."""

    kind: str  # "image", "folder", "video" or "camera"
    frames: int | None
    fps: float | None  # frames yielded per second of the source
    native_fps: float | None = None  # the video's own rate


def camera_index(source: str | int | Path) -> int | None:
    """The camera a source names (an int, or a string of digits that is not an existing path), else None."""
    if isinstance(source, bool):
        return None
    if isinstance(source, int):
        return source
    if isinstance(source, str) and source.strip().isdigit() and not Path(source).exists():
        return int(source)
    return None


def source_kind(source: str | int | Path) -> str:
    """The kind of source: camera, folder, image or video; BadSource for a path that does not exist or a file that is
    neither an image nor a video by its extension."""
    if camera_index(source) is not None:
        return "camera"
    path = Path(source)
    if path.is_dir():
        return "folder"
    if not path.exists():
        raise BadSource(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    raise BadSource(
        f"{path}: not an image ({', '.join(sorted(IMAGE_SUFFIXES))}) or a video ({', '.join(sorted(VIDEO_SUFFIXES))}) "
        "by its extension"
    )


def check_fps(fps: float | None) -> None:
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise BadSource(f"fps must be a positive number of frames per second, got {fps}")


def folder_images(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursively, hidden folders included), in a deterministic order:
    sorted by their path parts."""
    found = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def read_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The image at ``path`` as BGR uint8, EXIF orientation applied; BadSource when it cannot be decoded."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadSource(f"{path}: {exc.strerror or exc}") from None
    try:
        return decode_image(data, max_pixels)
    except MienError as exc:
        raise BadSource(f"{path}: {exc.message}") from None


def image_frames(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Frame]:
    yield Frame(str(path), 0, None, read_image(path, max_pixels))


def folder_frames(folder: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Frame]:
    """Each image of the folder in turn; one that cannot be decoded is skipped with a warning (a folder is a
    batch job: one bad file must not stop it). BadSource when the folder holds no image at all."""
    paths = folder_images(folder)
    if not paths:
        raise BadSource(f"{folder}: no image ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder or below")
    for number, path in enumerate(paths):
        try:
            image = read_image(path, max_pixels)
        except BadSource as exc:
            log.warning("skipping %s", exc.message)
            continue
        yield Frame(str(path), number, None, image)


def sampled(timestamp: float, due: float, fps: float | None) -> tuple[bool, float]:
    """Whether a frame at ``timestamp`` is kept when the next sample is due at ``due``, and the next due time.

    Without ``fps`` every frame is kept. With it, a frame is kept when it reaches the due time, and the due
    time then moves on by whole periods past the frame (a source slower than ``fps`` gives every frame, never
    a burst of catching up).
    """
    if fps is None:
        return True, due
    if timestamp + _EPSILON < due:
        return False, due
    period = 1.0 / fps
    steps = math.floor((timestamp + _EPSILON - due) / period) + 1
    return True, due + steps * period


def _open_video(path: Path) -> cv2.VideoCapture:
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not capture.isOpened():
        capture.release()
        raise BadSource(f"{path}: OpenCV (FFmpeg) cannot open this video; the file is corrupt or not a video")
    return capture


def _native_fps(capture: cv2.VideoCapture) -> float | None:
    fps = capture.get(cv2.CAP_PROP_FPS)
    return fps if math.isfinite(fps) and 0 < fps < 10_000 else None


def video_frames(path: Path, fps: float | None = None) -> Iterator[Frame]:
    """The video's frames, every one or ``fps`` per second of video (sampled by timestamp; the others are
    grabbed and never decoded). A frame's timestamp is its index over the video's frame rate, or the
    container's position when the rate is unknown. BadSource for a video that cannot be opened or yields
    no frame."""
    check_fps(fps)
    capture = _open_video(path)
    try:
        native = _native_fps(capture)
        due, index = 0.0, 0
        while capture.grab():
            if native is not None:
                timestamp = index / native
            else:
                timestamp = max(capture.get(cv2.CAP_PROP_POS_MSEC), 0.0) / 1000.0
            keep, due = sampled(timestamp, due, fps)
            if keep:
                ok, image = capture.retrieve()
                if not ok or image is None:
                    raise BadSource(f"{path}: frame {index} could not be decoded")
                yield Frame(str(path), index, timestamp, _bgr(image))
            index += 1
        if index == 0:
            raise BadSource(f"{path}: the video has no frame that OpenCV (FFmpeg) can read")
    finally:
        capture.release()


def camera_frames(index: int, fps: float | None = None, limit: int | None = None) -> Iterator[Frame]:
    """Frames of camera ``index`` until it stops (or ``limit`` frames were yielded, or the caller stops
    iterating: Ctrl-C), timestamped from the first frame and sampled at ``fps`` when given."""
    check_fps(fps)
    capture = cv2.VideoCapture(index)
    if not capture.isOpened():
        capture.release()
        raise BadSource(f"camera {index}: cannot be opened (no such camera, or it is in use)")
    name = f"camera:{index}"
    try:
        start, due, number, kept = None, 0.0, 0, 0
        while limit is None or kept < limit:
            ok, image = capture.read()
            if not ok or image is None:
                if number == 0:
                    raise BadSource(f"camera {index}: opened but gives no frame")
                break
            now = time.monotonic()
            start = now if start is None else start
            keep, due = sampled(now - start, due, fps)
            if keep:
                kept += 1
                yield Frame(name, number, now - start, _bgr(image))
            number += 1
    finally:
        capture.release()


def _bgr(image: np.ndarray) -> np.ndarray:
    """3-channel uint8 (some cameras and codecs give grey or 4 channels)."""
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def open_frames(
    source: str | int | Path, fps: float | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[Frame]:
    """The frames of any source (see the module docstring). The source is checked now (BadSource for a
    missing path or an unknown extension); a video that cannot be opened raises when iteration starts."""
    check_fps(fps)
    kind = source_kind(source)
    if kind == "camera":
        return camera_frames(camera_index(source), fps)  # type: ignore[arg-type]
    path = Path(source)
    if kind == "folder":
        return folder_frames(path, max_pixels)
    if kind == "image":
        return image_frames(path, max_pixels)
    return video_frames(path, fps)


def count_sampled(total: int, native_fps: float, fps: float | None) -> int:
    """How many of a video's ``total`` frames at ``native_fps`` are kept when sampling at ``fps`` (exactly
    what :func:`video_frames` yields, computed without reading the video)."""
    if fps is None:
        return total
    due, kept = 0.0, 0
    for index in range(total):
        keep, due = sampled(index / native_fps, due, fps)
        kept += keep
    return kept


def probe(source: str | int | Path, fps: float | None = None) -> SourceInfo:
    """What :func:`open_frames` will yield, without decoding any frame: the frame count (None when unknown)
    for a progress bar's ETA, and the rate (for the annotated video). BadSource for a missing path, a video
    that cannot be opened or one without a frame."""
    check_fps(fps)
    kind = source_kind(source)
    if kind == "camera":
        return SourceInfo(kind, None, fps, None)
    path = Path(source)
    if kind == "image":
        return SourceInfo(kind, 1, None)
    if kind == "folder":
        return SourceInfo(kind, len(folder_images(path)), None)
    capture = _open_video(path)
    try:
        native = _native_fps(capture)
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if total <= 0 and not capture.grab():  # the container does not say: is there a frame at all?
            raise BadSource(f"{path}: the video has no frame that OpenCV (FFmpeg) can read")
    finally:
        capture.release()
    rate = native if fps is None or native is None else min(fps, native)
    if native is None or total <= 0:
        return SourceInfo(kind, None, rate, native)
    return SourceInfo(kind, count_sampled(total, native, fps), rate, native)


def count_frames(source: str | int | Path, fps: float | None = None) -> int | None:
    """The number of frames :func:`open_frames` will yield, when known without reading them (for an ETA)."""
    return probe(source, fps).frames
