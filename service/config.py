"""Service settings, read from ``MIEN_*`` environment variables and refused at start-up when unsafe."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import onnxruntime as ort
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from mien.runtime import DEFAULT_PROVIDERS, SessionConfig
from mien.service.detectors import DetectorName

MEGABYTE = 1024 * 1024
# OpenCV refuses to decode more than 2**30 pixels (OPENCV_IO_MAX_IMAGE_PIXELS); a higher limit would lie.
OPENCV_MAX_PIXELS = 1 << 30
MIN_API_KEY_LENGTH = 16


def _canonical_providers() -> dict[str, str]:
    """Map 'cuda', 'CUDA' and 'CUDAExecutionProvider' alike to onnxruntime's own spelling."""
    names: dict[str, str] = {}
    for name in ort.get_all_providers():
        names[name.lower()] = name
        names[name.lower().removesuffix("executionprovider")] = name
    return names


class Settings(BaseSettings):
    """Every field can be set by ``MIEN_<FIELD>`` (e.g. ``MIEN_MAX_UPLOAD_BYTES=5000000``)."""

    model_config = SettingsConfigDict(env_prefix="MIEN_", protected_namespaces=())

    model_dir: Path = Field(Path("models"), description="folder whose *.onnx files are served")
    default_model: str = Field("mini_xception", min_length=1, description="model id used when a request names none")
    host: str = Field("127.0.0.1", min_length=1, description="interface to bind; 0.0.0.0 exposes the service")
    port: int = Field(8000, ge=1, le=65535)
    max_upload_bytes: int = Field(10 * MEGABYTE, gt=0, le=1024 * MEGABYTE, description="largest accepted image file")
    max_pixels: int = Field(40_000_000, gt=0, le=OPENCV_MAX_PIXELS, description="largest accepted width × height")
    max_faces: int = Field(50, gt=0, le=1000, description="faces classified per image, largest first")
    max_batch_files: int = Field(16, ge=1, le=1000, description="most files in one POST /predict/batch")
    max_batch_bytes: int | None = Field(
        None, gt=0, le=16 * 1024 * MEGABYTE,
        description="largest POST /predict/batch body (each file still at most max_upload_bytes); unset: "
        "max_batch_files × max_upload_bytes",
    )  # fmt: skip
    min_confidence: float | None = Field(
        None, gt=0.0, le=1.0,
        description="a face whose top probability is below it gets no label (label null, uncertain true; "
        "the query min_confidence default); unset: every face is labelled",
    )  # fmt: skip
    # POST /analyze/video (service/routes/analyze.py): refused with a 413 before any frame is analysed.
    max_video_bytes: int = Field(
        200 * MEGABYTE, gt=0, le=16 * 1024 * MEGABYTE, description="largest accepted video file (POST /analyze/video)"
    )
    max_video_seconds: float = Field(
        600.0, gt=0.0, le=24 * 3600.0, description="longest accepted video, seconds (its declared or read duration)"
    )
    max_video_frames: int = Field(
        3000, ge=1, le=1_000_000, description="most frames of one video analysed (after sampling at the fps asked)"
    )
    video_fps: float = Field(
        5.0, ge=0.01, le=60.0, description="frames sampled per second of video unless the query's fps says otherwise"
    )
    video_timeout: float = Field(
        600.0, gt=0.0, le=24 * 3600.0,
        description="seconds a POST /analyze/video may take before it is answered 504 (request_timeout for the rest)",
    )  # fmt: skip
    # Load limits on the inference routes (/predict, /analyze/video, /v2/.../infer), enforced in service/limits.py.
    max_concurrency: int = Field(32, gt=0, le=1024, description="inference requests worked on at once")
    max_queue: int = Field(64, ge=0, le=100_000, description="inference requests waiting beyond those; more get 503")
    request_timeout: float = Field(
        30.0, gt=0.0, le=3600.0, description="seconds an inference request may take before it is answered 504"
    )
    retry_after: int = Field(1, ge=1, le=3600, description="seconds a 503 (busy) answer asks the client to wait")
    max_query_bytes: int = Field(4096, ge=256, le=65536, description="longest accepted query string (after ?)")
    # Optional shared secret: when set, /predict and /v2 inference need it (X-API-Key or Authorization: Bearer).
    api_key: SecretStr | None = Field(None, description="API key the inference routes require; unset = open")
    metrics_need_key: bool = Field(False, description="GET /metrics also requires the API key (when one is set)")
    # Comma-separated in the environment: MIEN_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider (or cuda,cpu).
    providers: Annotated[tuple[str, ...], NoDecode] = Field(DEFAULT_PROVIDERS, min_length=1)
    threads: int = Field(
        0, ge=0, le=256, description="onnxruntime intra-op threads per model; 0 = onnxruntime's choice"
    )
    # onnxruntime session options (mien.runtime.SessionConfig explains each choice).
    inter_op_threads: int = Field(
        1, ge=0, le=256, description="onnxruntime inter-op threads; used only by parallel graphs, mien's are chains"
    )
    graph_optimization: Literal["disabled", "basic", "extended", "all"] = Field(
        "all", description="onnxruntime graph optimisation level"
    )
    ort_spinning: bool = Field(
        False, description="let onnxruntime's threads busy-wait between operators (faster alone, costly when shared)"
    )
    ort_memory_arena: bool = Field(True, description="onnxruntime CPU memory arena (see mien.runtime.SessionConfig)")
    detect_concurrency: int = Field(
        0, ge=0, le=1024, description="ONNX face detections run at once (memory bound); 0 = one per CPU core"
    )
    # Dynamic micro-batching (service/batching.py): faces of concurrent /predict requests share one call.
    batching: bool = Field(True, description="merge faces of concurrent requests into shared classifier calls")
    batch_max_size: int = Field(32, ge=1, le=1024, description="most faces in one classifier call")
    batch_max_wait_ms: float = Field(
        2.0, ge=0.0, le=1000.0, description="longest a face waits for others to join its batch, milliseconds"
    )
    detector: DetectorName = Field(
        "yunet",
        description="face detector: yunet (YuNet with landmarks, the default), mtcnn (MTCNN with landmarks), haar "
        "(OpenCV's cascade, boxes only); onnx means the default landmark detector",
    )
    detector_dir: Path | None = Field(
        None,
        description="folder with yunet.onnx and mtcnn_{pnet,rnet,onet}.onnx; default <model_dir>/detector when it "
        "holds either, else the bundled one",
    )
    min_face: int = Field(20, ge=12, le=4096, description="smallest face searched, pixels (the min_face default)")
    detect_max_pixels: int = Field(
        750_000, ge=0, le=400_000_000,
        description="faces are searched on a copy of the photo with at most this many pixels (its aspect kept; a "
        "large JPEG is decoded at 1/2, 1/4 or 1/8 size for it: a 4000×3000 photo at 1000×750) and reported in "
        "the photo's pixels; 0: full size",
    )  # fmt: skip
    face_threshold: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="detector score a face needs (the threshold default, for the detectors with scores); unset: "
        "each detector's own (MTCNN 0.9, YuNet 0.5)",
    )  # fmt: skip

    def batch_body_bytes(self) -> int:
        """The body limit of POST /predict/batch: ``max_batch_bytes``, else room for ``max_batch_files`` files."""
        return self.max_batch_bytes or self.max_batch_files * self.max_upload_bytes

    def detect_slots(self) -> int:
        """How many ONNX face detections may run at once (``detect_concurrency``, 0 meaning one per core)."""
        return self.detect_concurrency or os.cpu_count() or 1

    def session_config(self) -> SessionConfig:
        """The onnxruntime session options these settings ask for (every model and the detector)."""
        return SessionConfig(
            self.threads, self.inter_op_threads, self.graph_optimization, self.ort_spinning, self.ort_memory_arena
        )

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        known = _canonical_providers()
        unknown = [name for name in value if name.lower() not in known]
        if unknown:
            raise ValueError(
                f"unknown onnxruntime provider(s) {unknown}; known providers: {', '.join(ort.get_all_providers())}"
            )
        canonical = tuple(dict.fromkeys(known[name.lower()] for name in value))  # de-duplicated, order kept
        return canonical

    @field_validator("default_model", "host")
    @classmethod
    def _no_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value.strip()

    @field_validator("api_key", mode="before")
    @classmethod
    def _blank_key_is_no_key(cls, value: Any) -> Any:
        # MIEN_API_KEY= (set but empty) leaves the service open, as unset does; the docs say so.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_key")
    @classmethod
    def _key_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_API_KEY_LENGTH:
            raise ValueError(
                f"must be at least {MIN_API_KEY_LENGTH} characters (a guessable key is no protection); "
                'make one with: python -c "import secrets; print(secrets.token_urlsafe(32))"'
            )
        return value
