"""One error shape for every failure: ``{"error": {"code": ..., "message": ...}}``.

Service errors subclass FastAPI's ``HTTPException`` so that FastAPI re-raises them unchanged even when
they happen while the request body is being parsed (the body-size limit); any other exception there
would become a generic 400.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

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


class ServiceError(HTTPException):
    """An error with a stable machine-readable ``code`` and a message a person can act on."""

    def __init__(self, status_code: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.code = code
        self.message = message


class BadImage(ServiceError):
    def __init__(self, message: str, code: str = "bad_image") -> None:
        super().__init__(400, code, message)


class UnsupportedMediaType(ServiceError):
    def __init__(self, message: str) -> None:
        super().__init__(415, "unsupported_media_type", message)


class TooLarge(ServiceError):
    def __init__(self, message: str, code: str = "too_large") -> None:
        super().__init__(413, code, message)


class ModelNotFound(ServiceError):
    def __init__(self, model_id: str, available: list[str]) -> None:
        listed = ", ".join(available) if available else "none (no model is loaded)"
        super().__init__(404, "unknown_model", f"unknown model {model_id!r}; available models: {listed} (GET /models)")
        self.available = available


class NotReady(ServiceError):
    def __init__(self, message: str) -> None:
        super().__init__(503, "not_ready", message)


def error_response(status_code: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status_code, headers=headers)


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


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = getattr(exc, "code", None)
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if code is None:  # raised by the framework, not by mien: add what to do
        code, message = _framework_message(request, exc, message)
    code = code or _DEFAULT_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))


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
    problems = "; ".join(f"{_where(tuple(err.get('loc', ())))}: {err.get('msg', 'invalid')}" for err in errors)
    return error_response(400, "invalid_request", problems or "invalid request")


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error while handling %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "the service failed unexpectedly; the error is in the server log")


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through the one JSON shape."""
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
