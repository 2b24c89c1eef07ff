"""POST /predict: every face in an uploaded photo with a probability per expression.

The handler reads as its steps: pick the detector, read the upload, decode, run the pipeline
(``mien.service.pipeline``), record the metrics, answer.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Query, UploadFile

from mien.schemas import Box, Face, ImageSize, PredictResponse, Timings, error_responses
from mien.service.deps import DetectorsDep, MetricsDep, ModelDep, SettingsDep, one_upload, pick_detector
from mien.service.detectors import DetectorName, resolve
from mien.service.exceptions import TooLarge
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


def faces(prediction: Prediction) -> list[Face]:
    found = []
    points = prediction.landmarks
    for i, (box, probs) in enumerate(zip(prediction.boxes, prediction.probabilities, strict=True)):
        best = int(np.argmax(probs))
        found.append(
            Face(
                box=Box(x=int(box[0]), y=int(box[1]), width=int(box[2]), height=int(box[3])),
                label=prediction.labels[best],
                score=float(probs[best]),
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
) -> PredictResponse:
    detected_at = prediction.detected_at
    return PredictResponse(
        model=loaded.model_id,
        model_version=loaded.version,
        provider=loaded.provider,
        image=ImageSize(width=photo.width, height=photo.height),
        faces=faces(prediction),
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


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=error_responses(400, 401, 404, 413, 414, 415, 503, 504),
    summary="Find every face in a photo and classify its expression",
    dependencies=[ApiKey, Depends(one_upload)],
)
def predict(
    file: Annotated[UploadFile, File(description=f"the photo: a {SUPPORTED} image")],
    settings: SettingsDep,
    loaded: ModelDep,
    detectors: DetectorsDep,
    metrics: MetricsDep,
    detect: DetectQuery = True,
    detector_name: DetectorQuery = None,
    min_face: MinFaceQuery = None,
    threshold: ThresholdQuery = None,
    max_faces: MaxFacesQuery = None,
    align: AlignQuery = True,
    detect_max_pixels: DetectMaxPixelsQuery = None,
) -> PredictResponse:
    # A plain `def`: FastAPI runs it in a worker thread, so decoding and inference never block the event loop.
    start = time.perf_counter()
    name = resolve(detector_name or settings.detector, settings.detector)  # onnx: the default landmark detector
    detector = pick_detector(detectors, name)
    limit = min(max_faces or settings.max_faces, settings.max_faces)  # the query can lower the setting only
    data = read_upload(file, settings.max_upload_bytes)
    timer = StageTimer()
    detect_pixels = settings.detect_max_pixels if detect_max_pixels is None else detect_max_pixels
    with timer.stage("decode"):
        photo = decode_photo(data, settings.max_pixels, need_pixels=detect_pixels if detect else 0)
    prediction = predict_faces(photo, loaded.runner, detector, timer, detect=detect, max_faces=limit,
                               min_face=min_face or settings.min_face, threshold=threshold,
                               align=align, detect_max_pixels=detect_pixels)  # fmt: skip
    total_ms = (time.perf_counter() - start) * 1000.0

    ran = name if detect else None
    record(metrics, timer, prediction, loaded.model_id, ran)
    if prediction.truncated:
        log.warning("image had %d more faces than max_faces=%d; they were not classified",
                    prediction.truncated, limit)  # fmt: skip
    log.info("predict model=%s detector=%s image=%dx%d faces=%d total=%.1fms", loaded.model_id, ran or "none",
             photo.width, photo.height, len(prediction.boxes), total_ms)  # fmt: skip
    return response(loaded, photo, prediction, timer, total_ms, ran)
