"""mien's own errors: what went wrong, in words a person can act on, with no HTTP in them.

The registry, the batcher, the limits, the detectors, image decoding and the routes raise these;
:mod:`mien.service.errors` alone turns each class into a status code and the JSON error body.
"""

from __future__ import annotations


class MienError(Exception):
    """Base of every error a request can meet; ``message`` is what the client is told."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --- the upload and the request -------------------------------------------------------------------


class BadImage(MienError):
    """The bytes are not an image mien can decode (corrupt, truncated, an empty header)."""


class EmptyFile(BadImage):
    """The uploaded file has no bytes."""


class MissingFile(MienError):
    """A request without the file it needs in the field it needs it (a route that reads its own multipart body)."""


class BadMultipart(MienError):
    """A multipart/form-data body that cannot be read (no boundary, malformed parts)."""


class BadVideo(BadImage):
    """An uploaded video OpenCV cannot open or read frames from (corrupt, truncated, no video stream)."""


class EmptyVideo(BadVideo):
    """A video file that opens but holds no frame."""


class UnsupportedMediaType(MienError):
    """A declared or sniffed format that mien does not read (TIFF, PDF, text, ...)."""


class TooLarge(MienError):
    """A body or file over the size limit.

    ``body_unread``: refused from the declared length, so the body is still on its way (the connection
    cannot carry another request).
    """

    def __init__(self, message: str, body_unread: bool = False) -> None:
        super().__init__(message)
        self.body_unread = body_unread


class TooManyPixels(TooLarge):
    """Width × height over the decoding limit, read from the header or the decoded image."""


class VideoTooLong(TooLarge):
    """A video whose declared (or read) duration is over the limit."""


class TooManyFrames(TooLarge):
    """A video that would give more sampled frames than the limit."""


class QueryTooLong(MienError):
    """A query string over the limit."""


class TooManyFiles(MienError):
    """More than one file in one request: mien never picks one silently."""


class Unauthorized(MienError):
    """No API key, or not this service's, on a route that needs one."""


# --- models and detectors -------------------------------------------------------------------------


class ModelNotFound(MienError):
    """No served model has this id; the message lists the ones that are served."""

    def __init__(self, model_id: str, available: list[str]) -> None:
        listed = ", ".join(available) if available else "none (no model is loaded)"
        super().__init__(f"unknown model {model_id!r}; available models: {listed} (GET /models)")
        self.model_id = model_id
        self.available = available


class VersionNotFound(MienError):
    """The model is served, but not in the version asked for."""

    def __init__(self, model_id: str, version: str, served: str) -> None:
        super().__init__(
            f"model {model_id!r} has no version {version!r}; the served version is {served!r} "
            f"(GET /v2/models/{model_id})"
        )


class DetectorUnavailable(MienError):
    """A request names a face detector that is not loaded here."""

    def __init__(self, name: str, loaded: list[str]) -> None:
        super().__init__(
            f"detector {name!r} is not loaded here; loaded: {', '.join(sorted(loaded))} "
            "(the onnx one needs `mien export detector`)"
        )


class DetectorNotLoaded(MienError, RuntimeError):
    """A face detector could not be built at start-up (never a request's error)."""


class DetectorFilesMissing(DetectorNotLoaded, FileNotFoundError):
    """A face detector's files are not in its folder; a detector that is not the default is then skipped."""


# --- readiness and load ---------------------------------------------------------------------------


class NotReady(MienError):
    """Nothing can be served yet (start-up, no default model) or any more (shutting down)."""


class Busy(MienError):
    """More requests in flight than the service admits; worth retrying after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TimedOut(MienError):
    """A request not answered within the time limit; worth retrying after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# --- the Open Inference Protocol (routes/v2.py) ---------------------------------------------------


class BadInferRequest(MienError):
    """A v2 inference body that is not the tensor the model takes."""


class UnsupportedModel(MienError):
    """An ensemble named on a v2 tensor route: its members preprocess raw crops each their own way."""

    def __init__(self, model_id: str) -> None:
        super().__init__(
            f"model {model_id!r} is an ensemble: its members preprocess raw face crops each in their own way, so "
            "it takes no tensor input; send the photo to POST /predict?model=" + model_id
        )


class ProtocolNotReady(NotReady):
    """The v2 protocol's "not ready" answer, which the protocol wants as a 4xx rather than a 503."""


class StaticFileNotFound(MienError):
    """A path under /static/ that is not one of the web page's files."""
