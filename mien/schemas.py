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


class ModelInfo(BaseModel):
    id: str
    version: str
    labels: list[str]
    input: dict[str, Any] = Field(description="the preprocessing spec the model was trained with")
    accuracy: float | None = Field(description="accuracy from the model card; null without a card")
    accuracy_split: str | None = Field(description="the data split `accuracy` was measured on")
    provider: str
    default: bool = Field(description="used when a request names no model")


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
