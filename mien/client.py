"""A Python client of mien's HTTP API, sync (:class:`MienClient`) and async (:class:`AsyncMienClient`), on httpx.

Answers are the service's own pydantic classes (:mod:`mien.schemas`), never copies, so a client and the
service it talks to agree on every field. It lives in the ground layer: it imports ``mien.schemas`` and
httpx (and OpenCV to encode an image array), never the service.

::

    from mien.client import MienClient

    with MienClient("http://127.0.0.1:8000", api_key="...") as mien:
        result = mien.predict("astronaut.jpg", min_confidence=0.5)
        for face in result.faces:
            print(face.box, face.label, face.score)

An image is a path (``str`` or :class:`~pathlib.Path`), its bytes, or a BGR ``uint8`` array (as OpenCV reads
it; sent as PNG). Query parameters of the routes (``detect``, ``detector``, ``min_face``, ``threshold``,
``max_faces``, ``align``, ``detect_max_pixels``, ``min_confidence``) are keyword arguments; ``None`` leaves one
out. A non-2xx answer raises :class:`MienError` with the service's status, error code and message. A
``503 busy`` answer (the service's queue is full) is retried up to ``max_retries`` times, waiting the
``Retry-After`` the service asks for, or longer: ``backoff × 2^attempt`` seconds, at most ``max_backoff``.
Connection errors and timeouts are httpx's own exceptions.
"""

from __future__ import annotations

import asyncio
import email.utils
import mimetypes
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
from pydantic import BaseModel, ValidationError

from mien.schemas import (
    BatchResponse,
    ErrorResponse,
    HealthResponse,
    ModelsResponse,
    PredictResponse,
    ReadyResponse,
    VideoAnalysisResponse,
)

DEFAULT_URL = "http://127.0.0.1:8000"
#: The header the service reads the API key from (mien.service.security.API_KEY_HEADER; a client cannot import it).
API_KEY_HEADER = "X-API-Key"
RETRIED_CODE = "busy"  # the only answer worth repeating unchanged: nothing was done, the service asks to retry

ImageInput = str | Path | bytes | bytearray | memoryview | np.ndarray
Model = TypeVar("Model", bound=BaseModel)


class MienError(Exception):
    """A non-2xx answer: its HTTP status, the service's stable error code, and the message that says what to do.

    An answer without mien's error body (a proxy's page, say) gets the code ``http_error`` and the start of its
    text. ``retry_after`` is the seconds a 503 or 504 asked to wait, else None.
    """

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


def image_part(image: ImageInput, index: int = 0) -> tuple[str, bytes, str]:
    """(file name, bytes, media type) of one image for a multipart upload."""
    if isinstance(image, np.ndarray):
        return f"image{index}.png", encode_png(image), "image/png"
    if isinstance(image, bytes | bytearray | memoryview):
        return f"image{index}", bytes(image), "application/octet-stream"  # the service reads the format from the bytes
    if isinstance(image, str | Path):
        path = Path(image)
        return path.name, path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    raise TypeError(f"an image is a path, bytes or a BGR uint8 numpy array, not {type(image).__name__}")


def encode_png(image: np.ndarray) -> bytes:
    """A BGR (or grey, or BGRA) uint8 array as PNG bytes, losslessly."""
    import cv2  # only for arrays: a client sending files needs no OpenCV at import time

    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ValueError(
            f"an image array is uint8 of shape (h, w), (h, w, 3) BGR or (h, w, 4) BGRA; got {image.dtype} {image.shape}"
        )
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"OpenCV could not encode the {image.shape} array as PNG")
    return buf.tobytes()


def video_part(video: str | Path | bytes) -> tuple[str, bytes, str]:
    if isinstance(video, bytes | bytearray | memoryview):
        return "video", bytes(video), "application/octet-stream"
    path = Path(video)
    return path.name, path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def query_params(model: str | None, query: dict[str, Any]) -> dict[str, Any]:
    """The query string of a request: ``model`` and the keyword arguments that are not None."""
    params = {key: value for key, value in query.items() if value is not None}
    if model is not None:
        params["model"] = model
    return params


def retry_after_seconds(response: httpx.Response) -> float | None:
    """``Retry-After`` as seconds (it may be a number or an HTTP date); None when absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def error_of(response: httpx.Response) -> MienError:
    """The :class:`MienError` a non-2xx answer means, from mien's error body when it has one."""
    retry_after = retry_after_seconds(response)
    try:
        detail = ErrorResponse.model_validate_json(response.content).error
    except ValidationError:
        text = response.text.strip()[:300] or response.reason_phrase
        return MienError(response.status_code, "http_error", text, retry_after)
    return MienError(response.status_code, detail.code, detail.message, retry_after)


class _Base:
    """What the sync and async clients share: settings, request building, answer parsing, the retry rule."""

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        timeout: float | httpx.Timeout | None,
        max_retries: int,
        backoff: float,
        max_backoff: float,
        headers: dict[str, str] | None,
        injected: httpx.Client | httpx.AsyncClient | None,
    ) -> None:
        if max_retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError("max_retries, backoff and max_backoff must not be negative")
        default = str(injected.base_url) if injected is not None and str(injected.base_url) else DEFAULT_URL
        self.base_url = (base_url or default).rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.headers = dict(headers or {})
        if api_key:
            self.headers[API_KEY_HEADER] = api_key

    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def _delay(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None when this answer is final."""
        if response.status_code != 503 or attempt >= self.max_retries:
            return None
        error = error_of(response)
        if error.code != RETRIED_CODE:
            return None  # not_ready and the rest: repeating would not help
        backoff = min(self.backoff * 2**attempt, self.max_backoff)
        return max(backoff, error.retry_after or 0.0)  # never sooner than the service asked

    @staticmethod
    def _parse(response: httpx.Response, schema: type[Model] | None) -> Any:
        if not response.is_success:
            raise error_of(response)
        return response.json() if schema is None else schema.model_validate_json(response.content)

    @staticmethod
    def _predict_files(image: ImageInput) -> dict[str, Any]:
        return {"files": {"file": image_part(image)}}

    @staticmethod
    def _batch_files(images: Sequence[ImageInput]) -> dict[str, Any]:
        if isinstance(images, str | bytes | Path | np.ndarray):
            raise TypeError("predict_batch takes a sequence of images; use predict for one")
        return {"files": [("files", image_part(image, i)) for i, image in enumerate(images)]}


class MienClient(_Base):
    """The sync client. ``client``: an httpx.Client to send through (e.g. Starlette's TestClient, which is one);
    it is then not closed by this one, and its base URL is the default. ``sleep`` waits between retries."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = 30.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        headers: dict[str, str] | None = None,
        client: httpx.Client | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, backoff, max_backoff, headers, client)
        self._owned = client is None
        self._http = client if client is not None else httpx.Client(timeout=timeout, transport=transport)
        self._sleep = sleep

    def _request(self, method: str, path: str, schema: type[Model] | None, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            response = self._http.request(method, self._url(path), headers=self.headers, **kwargs)
            delay = self._delay(response, attempt)
            if delay is None:
                return self._parse(response, schema)
            self._sleep(delay)
            attempt += 1

    def predict(self, image: ImageInput, model: str | None = None, **query: Any) -> PredictResponse:
        """POST /predict: every face in the photo."""
        return self._request("POST", "/predict", PredictResponse, params=query_params(model, query),
                             **self._predict_files(image))  # fmt: skip

    def predict_batch(self, images: Sequence[ImageInput], model: str | None = None, **query: Any) -> BatchResponse:
        """POST /predict/batch: one result per image, in order, each a prediction or that image's own error."""
        return self._request("POST", "/predict/batch", BatchResponse, params=query_params(model, query),
                             **self._batch_files(images))  # fmt: skip

    def analyze_video(self, video: str | Path | bytes, model: str | None = None, **query: Any) -> VideoAnalysisResponse:
        """POST /analyze/video (the video in the multipart field ``file``): every face followed over the video, a
        timeline and a summary per track. Query keywords: ``fps``, ``smooth``, ``max_missed`` and /predict's."""
        return self._request("POST", "/analyze/video", VideoAnalysisResponse, params=query_params(model, query),
                             files={"file": video_part(video)})  # fmt: skip

    def models(self) -> ModelsResponse:
        return self._request("GET", "/models", ModelsResponse)

    def ready(self) -> ReadyResponse:
        """GET /ready; a service that is not ready raises MienError(503, 'not_ready', why)."""
        return self._request("GET", "/ready", ReadyResponse)

    def health(self) -> HealthResponse:
        return self._request("GET", "/health", HealthResponse)

    def close(self) -> None:
        if self._owned:
            self._http.close()

    def __enter__(self) -> MienClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncMienClient(_Base):
    """The async client, the same methods awaited. ``client``: an httpx.AsyncClient to send through;
    ``transport``: e.g. ``httpx.ASGITransport(app=app)``; ``sleep`` is awaited between retries."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = 30.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        headers: dict[str, str] | None = None,
        client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, backoff, max_backoff, headers, client)
        self._owned = client is None
        self._http = client if client is not None else httpx.AsyncClient(timeout=timeout, transport=transport)
        self._sleep = sleep

    async def _request(self, method: str, path: str, schema: type[Model] | None, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            response = await self._http.request(method, self._url(path), headers=self.headers, **kwargs)
            delay = self._delay(response, attempt)
            if delay is None:
                return self._parse(response, schema)
            await self._sleep(delay)
            attempt += 1

    async def predict(self, image: ImageInput, model: str | None = None, **query: Any) -> PredictResponse:
        """POST /predict: every face in the photo."""
        return await self._request("POST", "/predict", PredictResponse, params=query_params(model, query),
                                   **self._predict_files(image))  # fmt: skip

    async def predict_batch(
        self, images: Sequence[ImageInput], model: str | None = None, **query: Any
    ) -> BatchResponse:
        """POST /predict/batch: one result per image, in order, each a prediction or that image's own error."""
        return await self._request("POST", "/predict/batch", BatchResponse, params=query_params(model, query),
                                   **self._batch_files(images))  # fmt: skip

    async def analyze_video(
        self, video: str | Path | bytes, model: str | None = None, **query: Any
    ) -> VideoAnalysisResponse:
        """POST /analyze/video (the video in the multipart field ``file``): every face followed over the video, a
        timeline and a summary per track. Query keywords: ``fps``, ``smooth``, ``max_missed`` and /predict's."""
        return await self._request("POST", "/analyze/video", VideoAnalysisResponse,
                                   params=query_params(model, query), files={"file": video_part(video)})  # fmt: skip

    async def models(self) -> ModelsResponse:
        return await self._request("GET", "/models", ModelsResponse)

    async def ready(self) -> ReadyResponse:
        """GET /ready; a service that is not ready raises MienError(503, 'not_ready', why)."""
        return await self._request("GET", "/ready", ReadyResponse)

    async def health(self) -> HealthResponse:
        return await self._request("GET", "/health", HealthResponse)

    async def aclose(self) -> None:
        if self._owned:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncMienClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
