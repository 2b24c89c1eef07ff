"""POST /analyze/video: every face of an uploaded video, followed from frame to frame, classified, and
summarised per track, by the engine of ``mien analyze`` (:mod:`mien.service.analysis`) with the service's
loaded model and detector.

The upload is not parsed by Starlette (which keeps uploads in memory:
:func:`mien.service.limits.keep_uploads_in_memory`): the route reads the multipart body itself as it
streams (:mod:`mien.service.video_upload`), writing the video's bytes into a temporary file (the video decoder
reads files) and counting them,
so a video is never held in memory whole and one over ``max_video_bytes`` is refused as soon as it passes
the limit. The file is opened with OpenCV and its header checked against ``max_pixels``,
``max_video_seconds`` and ``max_video_frames`` before a frame is analysed; while the frames are read the
same limits are applied again (a container may not say, or may lie). The temporary file is deleted in a
``finally``, whatever happens: success, a refusal, an error, a timeout.

Refusals, each with a stable code (README, docs/robustness.md): 400 ``missing_file``, ``empty_file``,
``too_many_files``, ``bad_multipart``, ``bad_video`` (OpenCV cannot open it: corrupt, truncated, no video
stream) and ``empty_video`` (no frame); 413 ``too_large``, ``too_many_pixels``, ``video_too_long``,
``too_many_frames``; 415 ``unsupported_media_type`` (a declared type that is not a video, or bytes that are a
still image or audio: stills go to POST /predict).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import anyio.to_thread
import cv2
from fastapi import APIRouter, Depends, Query, Request

from mien.schemas import (
    Box,
    VideoAnalysisResponse,
    VideoFace,
    VideoFrame,
    VideoInfo,
    VideoTimings,
    VideoTrack,
    error_responses,
)
from mien.service.analysis import AnalyzeOptions, Analyzer, FaceRow, SummaryBuilder
from mien.service.config import Settings
from mien.service.deps import MetricsDep, ModelDep, SettingsDep
from mien.service.exceptions import (
    BadVideo,
    EmptyVideo,
    TooManyFrames,
    TooManyPixels,
    VideoTooLong,
)
from mien.service.frames import BadSource, Frame, count_sampled, video_frames
from mien.service.metrics import ServiceMetrics
from mien.service.registry import LoadedModel
from mien.service.routes.predict import FaceQuery, FaceQueryDep
from mien.service.security import ApiKey
from mien.service.video_upload import (
    FIELD,
    FORMATS,
    ReceivedVideo,
    VideoUpload,
    check_video_bytes,
    delete,
    receive_video,
)

log = logging.getLogger(__name__)
router = APIRouter(tags=["analyze"])

PATH = "/analyze/video"
MIN_FPS, MAX_FPS = 0.01, 60.0  # the query's fps bounds (the setting's too): a frame every 100 s at least
BATCH_FRAMES = 8  # frames decoded and analysed at once: memory is bounded by it, never by the video's length
_COUNT_EXACTLY = 200_000  # frame counts up to this are sampled exactly before analysis; above, a bound is used

FpsQuery = Annotated[
    float | None,
    Query(ge=MIN_FPS, le=MAX_FPS, allow_inf_nan=False,
          description="frames analysed per second of video (at most the video's own rate), 0.01 to 60; default "
          "MIEN_VIDEO_FPS"),
]  # fmt: skip
SmoothQuery = Annotated[
    float | None,
    Query(gt=0.0, le=1.0, allow_inf_nan=False,
          description="exponential moving average of each track's probabilities, the weight of the newest frame; "
          "default off"),
]  # fmt: skip
MaxMissedQuery = Annotated[
    int, Query(ge=0, le=1000, description="sampled frames a track survives without its face before it ends")
]


@dataclass(frozen=True)
class VideoOptions(FaceQuery):
    """The query parameters of POST /analyze/video, resolved against the settings."""

    fps: float
    smooth: float | None
    max_missed: int

    def analyze_options(self, model_id: str, threads: int) -> AnalyzeOptions:
        """The same options for the engine of ``mien analyze``."""
        return AnalyzeOptions(model=model_id, detector=self.detector_name, fps=self.fps, batch_size=BATCH_FRAMES,
                              min_face=self.min_face, threshold=self.threshold, max_faces=self.max_faces,
                              align=self.align, detect_max_pixels=self.detect_max_pixels, max_missed=self.max_missed,
                              smooth=self.smooth, threads=threads)  # fmt: skip


def video_options(
    settings: SettingsDep,
    faces: FaceQueryDep,
    fps: FpsQuery = None,
    smooth: SmoothQuery = None,
    max_missed: MaxMissedQuery = 5,
) -> VideoOptions:
    return VideoOptions(**faces.fields(), fps=settings.video_fps if fps is None else fps, smooth=smooth,
                        max_missed=max_missed)  # fmt: skip


VideoOptionsDep = Annotated[VideoOptions, Depends(video_options)]


# --- checked before analysis, and while reading --------------------------------------------------------


@dataclass(frozen=True)
class VideoHeader:
    """What the container says, before any frame is decoded."""

    width: int
    height: int
    fps: float | None
    frames: int | None

    @property
    def duration(self) -> float | None:
        return None if self.fps is None or self.frames is None else self.frames / self.fps


def read_header(path: Path) -> VideoHeader:
    """The video's size, rate and frame count; BadVideo when OpenCV cannot open it, EmptyVideo without a frame."""
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    try:
        if not capture.isOpened():
            raise BadVideo(f"OpenCV (FFmpeg) cannot open the uploaded file as a video: it is corrupt, truncated, not "
                           f"a video or has no video stream (audio only); send a video ({FORMATS})")  # fmt: skip
        fps = capture.get(cv2.CAP_PROP_FPS)
        count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
        width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        frames = int(count) if math.isfinite(count) and 0 < count < 2**53 else None
        if not frames and not capture.grab():
            raise EmptyVideo("the uploaded video has no frame that OpenCV (FFmpeg) can read")
    finally:
        capture.release()
    rate = fps if math.isfinite(fps) and 0 < fps < 10_000 else None  # as mien.service.frames reads it
    return VideoHeader(width, height, rate, frames)


def expected_frames(header: VideoHeader, fps: float) -> int | None:
    """How many frames sampling at ``fps`` gives, from the header alone (None when it does not say)."""
    if header.frames is None or header.fps is None:
        return None
    if header.frames <= _COUNT_EXACTLY:
        return count_sampled(header.frames, header.fps, fps)
    return min(header.frames, math.floor((header.frames - 1) / header.fps * fps + 1e-6) + 1)


def check_header(header: VideoHeader, fps: float, settings: Settings) -> None:
    """TooManyPixels, VideoTooLong or TooManyFrames from what the container declares."""
    pixels = header.width * header.height
    if pixels > settings.max_pixels:
        raise TooManyPixels(f"the video's frames are {header.width}×{header.height} = {pixels} pixels, over the "
                            f"limit of {settings.max_pixels} (MIEN_MAX_PIXELS); send a smaller video")  # fmt: skip
    duration = header.duration
    if duration is not None and duration > settings.max_video_seconds:
        raise too_long(f"the video declares {duration:.1f} s ({header.frames} frames at {header.fps:g} fps)",
                       settings)  # fmt: skip
    expected = expected_frames(header, fps)
    if expected is not None and expected > settings.max_video_frames:
        raise too_many(f"sampled at {fps:g} fps the video gives {expected} frames", settings)


def too_long(what: str, settings: Settings) -> VideoTooLong:
    return VideoTooLong(f"{what}, over the limit of {settings.max_video_seconds:g} s (MIEN_MAX_VIDEO_SECONDS); "
                        "send a shorter clip")  # fmt: skip


def too_many(what: str, settings: Settings) -> TooManyFrames:
    return TooManyFrames(f"{what}, over the limit of {settings.max_video_frames} (MIEN_MAX_VIDEO_FRAMES); ask for "
                         "a lower fps or send a shorter clip")  # fmt: skip


def guarded(
    frames: Iterator[Frame], settings: Settings, path: Path, stop: threading.Event | None = None
) -> Iterator[Frame]:
    """The frames, stopped with VideoTooLong or TooManyFrames as soon as the video proves longer than the limits
    (a container may declare no length, or a false one), and with BadVideo when a frame cannot be decoded; they
    simply end once ``stop`` is set (the request was answered 504 or its client left: nobody wants the rest)."""
    kept = 0
    try:
        for frame in frames:
            if stop is not None and stop.is_set():
                return
            if frame.timestamp is not None and frame.timestamp > settings.max_video_seconds:
                raise too_long(f"the video has a frame at {frame.timestamp:.1f} s", settings)
            kept += 1
            if kept > settings.max_video_frames:
                raise too_many(f"the video gives more than {settings.max_video_frames} sampled frames", settings)
            yield frame
    except BadSource as exc:  # never tell the client the temporary file's name
        message = exc.message.removeprefix(f"{path}: ")
        raise (EmptyVideo if "no frame" in message else BadVideo)(f"the uploaded video: {message}") from None


# --- the analysis ----------------------------------------------------------------------------------------


def video_face(row: FaceRow, min_confidence: float | None) -> VideoFace:
    uncertain = min_confidence is not None and row.score < min_confidence
    x, y, width, height = row.box
    return VideoFace(track=row.track, box=Box(x=x, y=y, width=width, height=height),  # type: ignore[arg-type]
                     label=None if uncertain else row.label, score=row.score, uncertain=uncertain,
                     probabilities=row.probabilities, detection_score=row.detection_score)  # fmt: skip


def analyse(
    received: ReceivedVideo,
    loaded: LoadedModel,
    options: VideoOptions,
    settings: Settings,
    upload_ms: float,
    stop: threading.Event | None = None,
) -> VideoAnalysisResponse:
    """The whole analysis of a received video (blocking: run in a worker thread); it ends early once ``stop`` is
    set, and its answer is then thrown away."""
    start = time.perf_counter()
    check_video_bytes(received.head)
    header = read_header(received.path)
    check_header(header, options.fps, settings)
    sample_fps = options.fps if header.fps is None else min(options.fps, header.fps)
    analyzer = Analyzer(loaded.classifier, options.detector, options.analyze_options(loaded.model_id,
                        settings.threads), options.detector_name)  # fmt: skip
    summary = SummaryBuilder(analyzer.labels, 1.0 / sample_fps)
    timeline: list[VideoFrame] = []
    sampled = faces = 0
    frames = guarded(video_frames(received.path, options.fps), settings, received.path, stop)
    for frame, rows in analyzer.analyze_frames(frames):
        sampled += 1
        faces += len(rows)
        summary.add_all(rows)
        if rows:
            timeline.append(VideoFrame(frame=frame.index, timestamp=frame.timestamp,  # type: ignore[arg-type]
                                       faces=[video_face(row, options.min_confidence) for row in rows]))  # fmt: skip
    tracks = [
        VideoTrack(track=s.track, first_seen=s.first, last_seen=s.last, seconds=s.seconds, frames=s.frames,  # type: ignore[arg-type]
                   dominant=s.dominant, shares=s.shares, mean_probabilities=s.mean_probabilities)
        for s in summary.result()
    ]  # fmt: skip
    ms = analyzer.timer.ms
    total_ms = upload_ms + (time.perf_counter() - start) * 1000.0
    log.info("analyze video model=%s detector=%s video=%dx%d sampled=%d faces=%d tracks=%d total=%.1fms",
             loaded.model_id, options.detector_name, header.width, header.height, sampled, faces, len(tracks),
             total_ms)  # fmt: skip
    return VideoAnalysisResponse(
        model=loaded.model_id,
        model_version=loaded.version,
        provider=loaded.provider,
        detector=options.detector_name,
        aligned=options.align and options.detector_name != "haar",  # haar gives no landmarks to align on
        smoothed=options.smooth is not None,
        video=VideoInfo(
            width=header.width,
            height=header.height,
            fps=header.fps,
            duration_seconds=header.duration,
            frames=header.frames,
            frames_sampled=sampled,
            sample_fps=sample_fps,
        ),  # fmt: skip
        tracks=tracks,
        timeline=timeline,
        timings_ms=VideoTimings(
            upload=upload_ms,
            detect=ms.get("detect", 0.0),
            preprocess=ms.get("preprocess", 0.0),
            classify=ms.get("classify", 0.0),
            total=total_ms,
        ),  # fmt: skip
    )


def record(metrics: ServiceMetrics, answer: VideoAnalysisResponse) -> None:
    """Stage times of the whole video (the request itself is counted by the metrics middleware)."""
    timings = answer.timings_ms
    for stage, ms in (("detect", timings.detect), ("preprocess", timings.preprocess), ("classify", timings.classify)):
        metrics.stage_duration.labels(stage=stage).observe(ms / 1000.0)


_VIDEO_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": [FIELD],
                "properties": {
                    FIELD: {
                        "type": "string",
                        "format": "binary",
                        "description": f"the video ({FORMATS}: whatever OpenCV's FFmpeg reads), at most "
                        "MIEN_MAX_VIDEO_BYTES",
                    },  # fmt: skip
                },
            }
        }
    },
}


@router.post(
    PATH,
    response_model=VideoAnalysisResponse,
    responses=error_responses(400, 401, 404, 413, 414, 415, 503, 504),
    summary="Follow every face of a video and classify its expression: a timeline and a summary per face",
    dependencies=[ApiKey],
    openapi_extra={"requestBody": _VIDEO_BODY},
)
async def analyze_video(
    request: Request, settings: SettingsDep, loaded: ModelDep, options: VideoOptionsDep, metrics: MetricsDep
) -> VideoAnalysisResponse:
    """The body is read here, as it streams (not by FastAPI: it would hold the whole video in memory); decoding
    and inference run in a worker thread, so the event loop never blocks. The temporary file is deleted once the
    request ends. When it is cancelled (the 504 of ``video_timeout``, a client gone), the worker is told to stop
    at its next frame and is not waited for: its slot and the file are given back now, not when the video would
    have ended (the decoder keeps reading the deleted file's data until it closes it)."""
    start = time.perf_counter()
    upload = VideoUpload(settings.max_video_bytes)
    stop = threading.Event()
    try:
        received = await receive_video(request, upload)
        upload_ms = (time.perf_counter() - start) * 1000.0
        answer = await anyio.to_thread.run_sync(
            analyse, received, loaded, options, settings, upload_ms, stop, abandon_on_cancel=True
        )
        record(metrics, answer)
        return answer
    finally:
        stop.set()
        delete(upload.path)
