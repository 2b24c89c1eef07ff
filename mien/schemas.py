"""Request and response shapes of the HTTP API (what OpenAPI documents and clients rely on).

In the ground layer (pydantic only, no part of mien imported) so that the service answers with these classes
and the Python client (:mod:`mien.client`) parses into the very same ones without importing the service.

Every error, whatever its status, has the body :class:`ErrorResponse`:
``{"error": {"code": "<stable snake_case code>", "message": "<what to do about it>"}}``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Box(BaseModel):
    """A face box in image pixels (after EXIF orientation); x, y is the top-left corner."""

    x: int
    y: int
    width: int
    height: int


class Face(BaseModel):
    box: Box
    label: str | None = Field(
        description="the most probable expression; null when its probability is below min_confidence (uncertain)"
    )
    score: float = Field(description="probability of the most probable expression (of `label` when there is one)")
    uncertain: bool = Field(
        False, description="the top probability is below min_confidence: no label is given, probabilities still are"
    )
    probabilities: dict[str, float] = Field(description="probability of every label the model knows; sums to 1")
    landmarks: list[tuple[float, float]] | None = Field(
        None,
        description="five [x, y] points in image pixels: left eye, right eye, nose, left and right mouth corner "
        "(as seen in the image); null when the detector gives none (haar, detect=false)",
    )
    detection_score: float | None = Field(None, description="the detector's confidence; null for haar")


class ImageSize(BaseModel):
    width: int
    height: int


class Timings(BaseModel):
    """Milliseconds spent in each stage of this request."""

    decode: float
    detect: float
    preprocess: float
    classify: float
    total: float


class PredictResponse(BaseModel):
    model: str = Field(description="id of the model that classified the faces")
    model_version: str
    provider: str = Field(description="onnxruntime execution provider that really ran")
    image: ImageSize
    faces: list[Face] = Field(description="largest face first; empty when no face was found")
    faces_omitted: int = Field(0, description="faces found beyond max_faces and not classified")
    detector: str | None = Field(description="the face detector that ran (onnx, haar); null with detect=false")
    aligned: bool = Field(description="faces were rotated and framed from their landmarks before classification")
    detected_at: ImageSize | None = Field(
        None, description="the size of the copy faces were searched on (see detect_max_pixels); null with detect=false"
    )
    timings_ms: Timings


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. bad_image, too_large, unknown_model")
    message: str = Field(description="what went wrong and what to do about it")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class BatchItem(BaseModel):
    """One photo of a batch: its prediction, or the error POST /predict would have answered for it."""

    index: int = Field(description="position of the file in the request, from 0")
    filename: str | None = Field(description="the file name the client sent (never used for anything else)")
    status: int = Field(description="200, or the HTTP status POST /predict would have answered for this photo")
    prediction: PredictResponse | None = Field(description="as POST /predict answers it; null when `error` is set")
    error: ErrorDetail | None = Field(description="as POST /predict's error body; null when `prediction` is set")


class BatchResponse(BaseModel):
    model: str = Field(description="id of the model that classified the faces")
    model_version: str
    provider: str = Field(description="onnxruntime execution provider that really ran")
    results: list[BatchItem] = Field(description="one per uploaded file, in the order they were sent")


class VideoInfo(BaseModel):
    """What POST /analyze/video read of the uploaded video."""

    width: int
    height: int
    fps: float | None = Field(description="the container's frame rate; null when it does not say")
    duration_seconds: float | None = Field(description="frames over fps, as the container declares; null when unknown")
    frames: int | None = Field(description="the frames the container declares; null when it does not say")
    frames_sampled: int = Field(description="frames analysed (the video sampled at sample_fps)")
    sample_fps: float = Field(description="frames analysed per second of video: the fps asked, at most the video's")


class VideoFace(BaseModel):
    """One face in one frame of a video."""

    track: int = Field(description="the face's track id: the same person from frame to frame, from 1")
    box: Box
    label: str | None = Field(description="the most probable expression; null when below min_confidence (uncertain)")
    score: float = Field(description="probability of the most probable expression")
    uncertain: bool = Field(False, description="the top probability is below min_confidence")
    probabilities: dict[str, float] = Field(description="every label's probability (smoothed when `smoothed`)")
    detection_score: float | None = Field(None, description="the detector's confidence; null for haar")


class VideoFrame(BaseModel):
    """A sampled frame in which at least one face was found."""

    frame: int = Field(description="the frame's index in the video, every frame counted (sampled or not)")
    timestamp: float = Field(description="seconds from the start of the video: frame / the video's fps")
    faces: list[VideoFace] = Field(description="largest face first")


class VideoTrack(BaseModel):
    """One tracked face over the whole video (the summary `mien analyze` prints)."""

    track: int
    first_seen: float = Field(description="timestamp of its first frame, seconds")
    last_seen: float = Field(description="timestamp of its last frame, seconds")
    seconds: float = Field(description="frames it was seen in × the sampled frame interval (1 / sample_fps)")
    frames: int = Field(description="sampled frames it was seen in")
    dominant: str = Field(description="the expression that was the top one in most of its frames")
    shares: dict[str, float] = Field(description="per label, the share of its frames where it was the top one; sum 1")
    mean_probabilities: dict[str, float] = Field(description="per label, its mean probability over the track's frames")


class VideoTimings(BaseModel):
    """Milliseconds spent on this request."""

    upload: float = Field(description="receiving the upload into its temporary file")
    detect: float
    preprocess: float
    classify: float
    total: float = Field(description="from the first byte of the upload to the answer")


class VideoAnalysisResponse(BaseModel):
    model: str = Field(description="id of the model that classified the faces")
    model_version: str
    provider: str = Field(description="onnxruntime execution provider that really ran")
    detector: str = Field(description="the face detector that ran")
    aligned: bool = Field(description="faces were rotated and framed from their landmarks before classification")
    smoothed: bool = Field(description="probabilities were smoothed over each track (the `smooth` query parameter)")
    video: VideoInfo
    tracks: list[VideoTrack] = Field(description="one per tracked face, in the order they first appeared; empty "
                                     "when no face was found")  # fmt: skip
    timeline: list[VideoFrame] = Field(
        description="every sampled frame with at least one face, in order (frames without a face are left out)"
    )
    timings_ms: VideoTimings


class CalibrationInfo(BaseModel):
    method: str = Field(description="temperature, entropy or top-label (docs/calibration.md)")
    fitted_on: str | None = Field(description="the split the calibration was fitted on (val: carved from Training)")
    tested_on: str | None = Field(description="the held-out split ece_before/ece_after were measured on")
    ece_before: float | None = Field(description="expected calibration error (15 bins, top label) uncalibrated")
    ece_after: float | None = Field(description="the same with the calibration the served model applies")


class ModelInfo(BaseModel):
    id: str
    version: str
    labels: list[str]
    input: dict[str, Any] = Field(description="the preprocessing spec the model was trained with")
    accuracy: float | None = Field(description="accuracy from the model card; null without a card")
    accuracy_split: str | None = Field(description="the data split `accuracy` was measured on")
    provider: str
    default: bool = Field(description="used when a request names no model")
    calibration: CalibrationInfo | None = Field(
        default=None, description="how the served probabilities were calibrated, from the model card; null: they are "
        "the network's own (never calibrated, or no card)"
    )  # fmt: skip


class ModelsResponse(BaseModel):
    default: str
    models: list[ModelInfo]


class HealthResponse(BaseModel):
    status: str = "ok"


class ReadyResponse(BaseModel):
    status: str = "ready"
    models: list[str]
    default: str
    providers: dict[str, str] = Field(
        default_factory=dict, description="the onnxruntime provider each model runs on, e.g. CUDAExecutionProvider"
    )
    refused: dict[str, str] = Field(default_factory=dict, description="model files not served, with the reason")


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting the error body for each status."""
    return {status: {"model": ErrorResponse} for status in statuses}
