"""POST /predict: every face in an uploaded photo with a probability per expression; POST /predict/batch:
the same for several photos in one request, one result (or one error) per photo, in order.

Both routes take the same query parameters (resolved once per request into :class:`PhotoOptions`) and
work on each photo with the same function, :func:`predict_photo`: read the upload, decode, run the
pipeline (``mien.service.pipeline``), record the metrics, answer.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Query, UploadFile

from mien.schemas import (
    BatchItem,
    BatchResponse,
    Box,
    Face,
    ImageSize,
    PredictResponse,
    Timings,
    error_responses,
)
from mien.service.deps import DetectorsDep, MetricsDep, ModelDep, SettingsDep, one_upload, pick_detector
from mien.service.detectors import DetectorName, FaceDetector, resolve
from mien.service.errors import error_detail
from mien.service.exceptions import TooLarge, TooManyFiles
from mien.service.imaging import SUPPORTED, Photo, check_media_type, decode_photo
from mien.service.metrics import ServiceMetrics
from mien.service.pipeline import Prediction, StageTimer, predict_faces
from mien.service.registry import LoadedModel
from mien.service.security import ApiKey

log = logging.getLogger(__name__)
router = APIRouter(tags=["predict"])

# The query parameters (``?model=`` is read by the ModelDep dependency).
DetectQuery = Annotated[bool, Query(description="find faces; false: the whole image is one face crop")]
DetectorQuery = Annotated[
    DetectorName | None,
    Query(
        alias="detector",
        description="yunet or mtcnn (landmarks, aligned faces), haar (boxes only), or onnx "
        "(the landmark detector the service defaults to); default MIEN_DETECTOR",
    ),
]
MinFaceQuery = Annotated[
    int | None, Query(ge=12, le=4096, description="smallest face searched, pixels; default MIEN_MIN_FACE")
]
ThresholdQuery = Annotated[
    float | None,
    Query(
        gt=0.0,
        lt=1.0,
        description="detector score a face needs (not haar); default MIEN_FACE_THRESHOLD, "
        "else the detector's own (mtcnn 0.9, yunet 0.5)",
    ),
]
MaxFacesQuery = Annotated[
    int | None, Query(ge=1, le=1000, description="faces classified, largest first; at most MIEN_MAX_FACES")
]
AlignQuery = Annotated[bool, Query(description="rotate and frame faces from their landmarks (not haar)")]
DetectMaxPixelsQuery = Annotated[
    int | None,
    Query(ge=0, le=400_000_000, description="most pixels of the copy faces are searched on (aspect kept); 0: full "
          "size; default MIEN_DETECT_MAX_PIXELS. Boxes are always in the photo's pixels"),
]  # fmt: skip
MinConfidenceQuery = Annotated[
    float | None,
    Query(gt=0.0, le=1.0, allow_inf_nan=False,
          description="a face whose top probability is below it gets label null and uncertain true (its "
          "probabilities are still given); default MIEN_MIN_CONFIDENCE, else every face is labelled"),
]  # fmt: skip


@dataclass(frozen=True)
class FaceQuery:
    """The query parameters every route that finds faces takes (/predict, /predict/batch, /analyze/video), resolved
    against the settings: the query can lower MIEN_MAX_FACES only, and each other one left out takes its setting."""

    detector: FaceDetector
    detector_name: str
    max_faces: int
    min_face: int
    threshold: float | None
    align: bool
    detect_max_pixels: int
    min_confidence: float | None

    def fields(self) -> dict:
        """The fields by name, the detector itself included (``dataclasses.asdict`` would copy it)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class PhotoOptions(FaceQuery):
    """How each photo of a request is worked on: its query parameters, resolved against the settings."""

    detector_name: str | None  # the detector that runs; None with detect=false
    detect: bool
    max_upload_bytes: int
    max_pixels: int


def face_query(
    settings: SettingsDep,
    detectors: DetectorsDep,
    detector_name: DetectorQuery = None,
    min_face: MinFaceQuery = None,
    threshold: ThresholdQuery = None,
    max_faces: MaxFacesQuery = None,
    align: AlignQuery = True,
    detect_max_pixels: DetectMaxPixelsQuery = None,
    min_confidence: MinConfidenceQuery = None,
) -> FaceQuery:
    """The face-finding query parameters; DetectorUnavailable when the detector is not loaded."""
    name = resolve(detector_name or settings.detector, settings.detector)  # onnx: the default landmark detector
    return FaceQuery(
        detector=pick_detector(detectors, name),
        detector_name=name,
        max_faces=min(max_faces or settings.max_faces, settings.max_faces),
        min_face=min_face or settings.min_face,
        threshold=threshold,
        align=align,
        detect_max_pixels=settings.detect_max_pixels if detect_max_pixels is None else detect_max_pixels,
        min_confidence=settings.min_confidence if min_confidence is None else min_confidence,
    )


FaceQueryDep = Annotated[FaceQuery, Depends(face_query)]


def photo_options(settings: SettingsDep, faces: FaceQueryDep, detect: DetectQuery = True) -> PhotoOptions:
    """The query parameters of /predict and /predict/batch."""
    return PhotoOptions(**{**faces.fields(), "detector_name": faces.detector_name if detect else None},
                        detect=detect, max_upload_bytes=settings.max_upload_bytes,
                        max_pixels=settings.max_pixels)  # fmt: skip


PhotoOptionsDep = Annotated[PhotoOptions, Depends(photo_options)]


def read_upload(file: UploadFile, max_bytes: int) -> bytes:
    """The uploaded bytes; UnsupportedMediaType for a declared type mien does not read, TooLarge past the limit."""
    check_media_type(file.content_type)
    data = file.file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise TooLarge(
            f"the uploaded file is larger than the limit of {max_bytes} bytes "
            "(MIEN_MAX_UPLOAD_BYTES); send a smaller or more compressed image"
        )
    return data


def record(
    metrics: ServiceMetrics, timer: StageTimer, prediction: Prediction, model_id: str, detector: str | None
) -> None:
    """Stage and detector times, faces per image and, without the micro-batcher, the batch sizes."""
    for stage, ms in timer.ms.items():
        metrics.stage_duration.labels(stage=stage).observe(ms / 1000.0)
    if detector is not None:
        metrics.detect_duration.labels(detector=detector).observe(timer.ms["detect"] / 1000.0)
    metrics.faces.labels(model=model_id).observe(len(prediction.boxes))
    for size in prediction.batch_sizes:
        metrics.batch_size.labels(model=model_id).observe(size)


def faces(prediction: Prediction, min_confidence: float | None = None) -> list[Face]:
    """One Face per face found; below ``min_confidence`` a face keeps its probabilities but loses its label."""
    found = []
    points = prediction.landmarks
    for i, (box, probs) in enumerate(zip(prediction.boxes, prediction.probabilities, strict=True)):
        best = int(np.argmax(probs))
        score = float(probs[best])
        uncertain = min_confidence is not None and score < min_confidence
        found.append(
            Face(
                box=Box(x=int(box[0]), y=int(box[1]), width=int(box[2]), height=int(box[3])),
                label=None if uncertain else prediction.labels[best],
                score=score,
                uncertain=uncertain,
                probabilities={label: float(p) for label, p in zip(prediction.labels, probs, strict=True)},
                landmarks=None if points is None else [(float(x), float(y)) for x, y in points[i]],
                detection_score=None if prediction.scores is None else float(prediction.scores[i]),
            )
        )
    return found


def response(
    loaded: LoadedModel,
    photo: Photo,
    prediction: Prediction,
    timer: StageTimer,
    total_ms: float,
    detector: str | None,
    min_confidence: float | None = None,
) -> PredictResponse:
    detected_at = prediction.detected_at
    return PredictResponse(
        model=loaded.model_id,
        model_version=loaded.version,
        provider=loaded.provider,
        image=ImageSize(width=photo.width, height=photo.height),
        faces=faces(prediction, min_confidence),
        faces_omitted=prediction.truncated,
        detector=detector,
        aligned=prediction.aligned,
        detected_at=None if detected_at is None else ImageSize(width=detected_at[0], height=detected_at[1]),
        timings_ms=Timings(
            decode=timer.ms.get("decode", 0.0),
            detect=timer.ms.get("detect", 0.0),
            preprocess=timer.ms.get("preprocess", 0.0),
            classify=timer.ms.get("classify", 0.0),
            total=total_ms,
        ),
    )


def predict_photo(
    file: UploadFile, loaded: LoadedModel, options: PhotoOptions, metrics: ServiceMetrics
) -> PredictResponse:
    """One uploaded photo through the pipeline: the work of POST /predict, and of each file of /predict/batch.

    Raises mien's own errors (:mod:`mien.service.exceptions`) for a photo that cannot be read.
    """
    start = time.perf_counter()
    data = read_upload(file, options.max_upload_bytes)
    timer = StageTimer()
    with timer.stage("decode"):
        photo = decode_photo(data, options.max_pixels, need_pixels=options.detect_max_pixels if options.detect else 0)
    prediction = predict_faces(photo, loaded.runner, options.detector, timer, detect=options.detect,
                               max_faces=options.max_faces, min_face=options.min_face, threshold=options.threshold,
                               align=options.align, detect_max_pixels=options.detect_max_pixels)  # fmt: skip
    total_ms = (time.perf_counter() - start) * 1000.0

    ran = options.detector_name
    record(metrics, timer, prediction, loaded.model_id, ran)
    if prediction.truncated:
        log.warning("image had %d more faces than max_faces=%d; they were not classified",
                    prediction.truncated, options.max_faces)  # fmt: skip
    log.info("predict model=%s detector=%s image=%dx%d faces=%d total=%.1fms", loaded.model_id, ran or "none",
             photo.width, photo.height, len(prediction.boxes), total_ms)  # fmt: skip
    return response(loaded, photo, prediction, timer, total_ms, ran, options.min_confidence)


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=error_responses(400, 401, 404, 413, 414, 415, 503, 504),
    summary="Find every face in a photo and classify its expression",
    dependencies=[ApiKey, Depends(one_upload)],
)
def predict(
    file: Annotated[UploadFile, File(description=f"the photo: a {SUPPORTED} image")],
    loaded: ModelDep,
    options: PhotoOptionsDep,
    metrics: MetricsDep,
) -> PredictResponse:
    # A plain `def`: FastAPI runs it in a worker thread, so decoding and inference never block the event loop.
    return predict_photo(file, loaded, options, metrics)


@router.post(
    "/predict/batch",
    response_model=BatchResponse,
    responses=error_responses(400, 401, 404, 413, 414, 503, 504),
    summary="Several photos in one request: every face of each, one result or error per photo, in order",
    dependencies=[ApiKey],
)
def predict_batch(
    files: Annotated[
        list[UploadFile],
        File(
            description=f"the photos, each a {SUPPORTED} image, in the field 'files' repeated; at most "
            "MIEN_MAX_BATCH_FILES (16), each at most MIEN_MAX_UPLOAD_BYTES"
        ),
    ],  # fmt: skip
    settings: SettingsDep,
    loaded: ModelDep,
    options: PhotoOptionsDep,
    metrics: MetricsDep,
) -> BatchResponse:
    """Each photo is worked on exactly as POST /predict would; a photo that fails gets the status and error
    body /predict would have answered for it, in its own result, and never fails the others."""
    if len(files) > settings.max_batch_files:
        raise TooManyFiles(f"the batch carries {len(files)} files, over the limit of {settings.max_batch_files} "
                           "(MIEN_MAX_BATCH_FILES); split it into several requests")  # fmt: skip
    start = time.perf_counter()
    results = []
    for index, file in enumerate(files):
        try:
            prediction = predict_photo(file, loaded, options, metrics)
        except Exception as exc:  # one photo's failure, whatever it is, is that photo's result
            status, error = error_detail(exc)
            results.append(BatchItem(index=index, filename=file.filename, status=status, prediction=None, error=error))
        else:
            results.append(BatchItem(index=index, filename=file.filename, status=200, prediction=prediction,
                                     error=None))  # fmt: skip
    failed = sum(1 for item in results if item.error is not None)
    log.info("predict batch model=%s files=%d failed=%d total=%.1fms", loaded.model_id, len(files), failed,
             (time.perf_counter() - start) * 1000.0)  # fmt: skip
    return BatchResponse(model=loaded.model_id, model_version=loaded.version, provider=loaded.provider,
                         results=results)  # fmt: skip
