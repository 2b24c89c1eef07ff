"""The HTTP edge of every error: mien's own exceptions become a status code and one JSON shape,
``{"error": {"code": ..., "message": ...}}``.

Domain code raises :mod:`mien.service.exceptions` and knows nothing of HTTP; this module alone knows
which status and stable code each one gets (:data:`STATUS`), and gives FastAPI's own errors (unknown
route, wrong method, bad multipart, invalid parameters) the same shape.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mien.schemas import ErrorDetail
from mien.service.exceptions import (
    BadImage,
    BadInferRequest,
    BadMultipart,
    BadVideo,
    Busy,
    DetectorUnavailable,
    EmptyFile,
    EmptyVideo,
    MienError,
    MissingFile,
    ModelNotFound,
    NotReady,
    ProtocolNotReady,
    QueryTooLong,
    StaticFileNotFound,
    TimedOut,
    TooLarge,
    TooManyFiles,
    TooManyFrames,
    TooManyPixels,
    Unauthorized,
    UnsupportedMediaType,
    UnsupportedModel,
    VersionNotFound,
    VideoTooLong,
)
from mien.service.rows import AnalyzeError

log = logging.getLogger(__name__)

#: Status and stable code per exception; the most specific class of an exception wins (README's error table).
STATUS: dict[type[MienError], tuple[int, str]] = {
    BadImage: (400, "bad_image"),
    EmptyFile: (400, "empty_file"),
    BadVideo: (400, "bad_video"),
    EmptyVideo: (400, "empty_video"),
    MissingFile: (400, "missing_file"),
    BadMultipart: (400, "bad_multipart"),
    TooManyFiles: (400, "too_many_files"),
    DetectorUnavailable: (400, "unavailable_detector"),
    BadInferRequest: (400, "invalid_infer_request"),
    UnsupportedModel: (400, "unsupported_model"),
    ProtocolNotReady: (400, "not_ready"),
    Unauthorized: (401, "unauthorized"),
    ModelNotFound: (404, "unknown_model"),
    VersionNotFound: (404, "unknown_model_version"),
    StaticFileNotFound: (404, "not_found"),
    TooLarge: (413, "too_large"),
    TooManyPixels: (413, "too_many_pixels"),
    VideoTooLong: (413, "video_too_long"),
    TooManyFrames: (413, "too_many_frames"),
    QueryTooLong: (414, "uri_too_long"),
    UnsupportedMediaType: (415, "unsupported_media_type"),
    NotReady: (503, "not_ready"),
    Busy: (503, "busy"),
    TimedOut: (504, "timeout"),
}

#: Errors of mien's own defined outside :mod:`mien.service.exceptions`: the in-process engine of ``mien analyze``
#: (service/analysis.py; AnalyzeError is in service/rows.py), which POST /analyze/video runs. Its frames'
#: BadSource is a BadImage (``bad_image``); the route turns the ones an upload can cause into ``bad_video`` and
#: ``empty_video``.
ENGINE_STATUS: dict[type[MienError], tuple[int, str]] = {
    AnalyzeError: (400, "invalid_analysis"),
}

# Codes for errors raised by FastAPI/Starlette themselves (unknown route, wrong method, bad multipart).
_DEFAULT_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    503: "not_ready",
}


def error_response(status_code: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status_code, headers=headers)


def status_of(exc: MienError) -> tuple[int, str] | None:
    """The status and code of ``exc``'s most specific class in :data:`STATUS` or :data:`ENGINE_STATUS`; None when
    no request error."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
        if cls in ENGINE_STATUS:
            return ENGINE_STATUS[cls]
    return None


def _headers(exc: MienError) -> dict[str, str] | None:
    if isinstance(exc, Busy | TimedOut):
        return {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, Unauthorized):
        return {"WWW-Authenticate": "Bearer"}
    if isinstance(exc, TooLarge) and exc.body_unread:
        return {"Connection": "close"}  # the unread body is still on the wire: this connection cannot be reused
    return None


INTERNAL_ERROR = ErrorDetail(
    code="internal_error", message="the service failed unexpectedly; the error is in the server log"
)


def error_detail(exc: Exception) -> tuple[int, ErrorDetail]:
    """The status and error body any exception met while working on a photo gets: one of mien's own by
    :data:`STATUS`; anything else (a bug, or a start-up error such as DetectorNotLoaded during a request) is
    logged and answered 500 ``internal_error``. POST /predict answers with it, and POST /predict/batch puts it
    in the result of the one photo that failed."""
    mapped = status_of(exc) if isinstance(exc, MienError) else None
    if mapped is None:
        log.error("unexpected %s while handling a request", type(exc).__name__, exc_info=exc)
        return 500, INTERNAL_ERROR
    status, code = mapped
    return status, ErrorDetail(code=code, message=exc.message)


def mien_error_response(exc: MienError) -> JSONResponse:
    """The answer to one of mien's own errors (the routes' handler below, and the limits middleware)."""
    status, detail = error_detail(exc)
    headers = _headers(exc) if status != 500 else None
    return error_response(status, detail.code, detail.message, headers=headers)


def _where(loc: tuple) -> str:
    """('query', 'detect') -> "query parameter 'detect'"; ('body', 'file') -> "form field 'file'"."""
    kinds = {"query": "query parameter", "path": "path parameter", "header": "header", "body": "form field"}
    if len(loc) >= 2 and loc[0] in kinds:
        return f"{kinds[loc[0]]} {'.'.join(str(part) for part in loc[1:])!r}"
    return ".".join(str(part) for part in loc) or "request"


def _framework_message(request: Request, exc: StarletteHTTPException, message: str) -> tuple[str | None, str]:
    """A code and a message a person can act on for the errors FastAPI/Starlette raise with a bare phrase."""
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404 and message == "Not Found":
        return None, f"there is no {where}; the API is listed at /docs (GET /models, POST /predict, /v2/...)"
    if exc.status_code == 405:
        allowed = next((value for key, value in (exc.headers or {}).items() if key.lower() == "allow"), "")
        return None, f"{where} is not allowed; this path answers {allowed or 'other methods'} (see /docs)"
    content_type = request.headers.get("content-type", "")
    if exc.status_code == 400 and content_type.lower().startswith("multipart/"):
        # Starlette's multipart parser: missing boundary, malformed parts, too many files or fields.
        return "bad_multipart", (
            f"the multipart/form-data body could not be read ({message.rstrip('.')}); let the HTTP client build "
            "it, e.g. curl -F file=@photo.jpg http://host:port/predict"
        )
    return None, message


async def _mien_error(request: Request, exc: MienError) -> JSONResponse:
    return mien_error_response(exc)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc.__cause__, MienError):
        # FastAPI turns any error met while it parses the body (the streamed body limit's TooLarge) into a
        # bare 400, raised from the original: answer the original.
        return mien_error_response(exc.__cause__)
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    code, message = _framework_message(request, exc, message)
    code = code or _DEFAULT_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, message, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # Bad input is the client's to fix: 400 with every problem named, never FastAPI's bare 422 list.
    errors = exc.errors()
    if any(tuple(err.get("loc", ()))[:2] == ("body", "file") for err in errors):
        return error_response(
            400,
            "missing_file",
            "no image uploaded: send the image as multipart/form-data in a field named 'file' "
            "(e.g. curl -F file=@photo.jpg http://host:port/predict)",
        )
    if any(tuple(err.get("loc", ()))[:2] == ("body", "files") for err in errors):  # POST /predict/batch
        return error_response(
            400,
            "missing_file",
            "no images uploaded: send each image as multipart/form-data in the field 'files', repeated "
            "(e.g. curl -F files=@a.jpg -F files=@b.jpg http://host:port/predict/batch)",
        )
    problems = "; ".join(f"{_where(tuple(err.get('loc', ())))}: {err.get('msg', 'invalid')}" for err in errors)
    return error_response(400, "invalid_request", problems or "invalid request")


def _internal_error() -> JSONResponse:
    return error_response(500, INTERNAL_ERROR.code, INTERNAL_ERROR.message)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error while handling %s %s", request.method, request.url.path)
    return _internal_error()


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through the one JSON shape."""
    app.add_exception_handler(MienError, _mien_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
