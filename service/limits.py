"""Every request limit, set from :class:`~mien.service.config.Settings` and applied before a route does any work.

One pure ASGI middleware, :class:`RequestLimitsMiddleware`, refuses with mien's own errors
(:mod:`mien.service.exceptions`), answered in the one error shape by :mod:`mien.service.errors`:

======================  ====================================  ======================================
limit (setting)         applies to                            answer
======================  ====================================  ======================================
``max_query_bytes``     every request                         414 ``uri_too_long``
``max_upload_bytes``    every request body (+ multipart room)  413 ``too_large``, without reading it
``max_batch_bytes``     the body of ``POST /predict/batch``    413 ``too_large``, without reading it
``max_batch_files``     files in one ``POST /predict/batch``   400 ``too_many_files`` (in the route)
``max_video_bytes``     the body of ``POST /analyze/video``    413 ``too_large``, without reading it
``video_timeout``       ``POST /analyze/video``, queue incl.   504 ``timeout``
``max_concurrency``     inference routes: worked on at once   beyond it, requests wait in the queue
``max_queue``           inference routes: waiting             beyond it, 503 ``busy`` + Retry-After
``request_timeout``     the other inference routes            504 ``timeout``
======================  ====================================  ======================================

The two limits that need the image itself are applied where the image is read, from the same settings:
``max_pixels`` by :func:`mien.service.imaging.decode_image` from the file header before decoding (413
``too_many_pixels``), ``max_faces`` by the pipeline (faces beyond it are counted in ``faces_omitted``).

A batch carries several photos, so ``POST /predict/batch`` has its own body limit, ``max_batch_bytes``, unset
by default meaning ``max_batch_files × max_upload_bytes`` (16 × 10 MiB), plus the same multipart room; each
of its files is still held to ``max_upload_bytes`` where it is read (413 ``too_large`` in that file's result).

A video is bigger and takes longer than a photo: ``POST /analyze/video`` has the body limit
``max_video_bytes`` (plus the multipart room) and the time limit ``video_timeout``; its duration and frame
limits (``max_video_seconds``, ``max_video_frames``) need the file's header and are applied by the route
(:mod:`mien.service.routes.analyze`), which also streams the upload into a temporary file itself (the video
decoder reads files) instead of letting Starlette hold it in memory.

A declared ``Content-Length`` over the body limit is answered with 413 before a byte of the body is read;
a body without one (chunked) is counted while it streams and stopped as soon as it passes the limit.
Uploads are parsed in memory only (:func:`keep_uploads_in_memory`): the body limit bounds that memory,
and no image ever touches the disk.

The inference routes (``POST /predict``, ``POST /predict/batch``, ``POST /analyze/video``,
``POST /v2/models/.../infer``) are admitted
while fewer than ``max_concurrency + max_queue`` are in flight; the rest get 503 at once instead of queueing
without bound (a batch is one request: it holds one slot while it works on its photos one after the other).
``/health``, ``/ready``, ``/metrics`` and the rest are never queued, so probes answer under load. The counts of
running and waiting requests are exported as ``mien_inflight_requests`` and ``mien_queued_requests``
(:mod:`mien.service.metrics`), the per-pod load an autoscaler reads. A
request that is not answered within ``request_timeout`` seconds gets 504; work already running in a
worker thread cannot be interrupted, so it keeps its slot until it ends and its result is dropped. The video
route is the exception (``video_timeout``): it is cancelled, its worker stops at the next frame, and its slot
and temporary file are given back before the 504 is sent.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sys

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mien.service.config import Settings
from mien.service.errors import mien_error_response
from mien.service.exceptions import Busy, MienError, QueryTooLong, TimedOut, TooLarge

log = logging.getLogger(__name__)

# Room for the multipart envelope (boundaries, part headers, other small fields) around the file itself.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
BATCH_PATH = "/predict/batch"
VIDEO_PATH = "/analyze/video"


def is_inference(scope: Scope) -> bool:
    """POST /predict, POST /predict/batch, POST /analyze/video and POST /v2/models/{id}[/versions/{v}]/infer: the
    routes that run models."""
    path = scope["path"].rstrip("/")
    return scope["method"] == "POST" and (
        path in ("/predict", BATCH_PATH, VIDEO_PATH) or (path.startswith("/v2/models/") and path.endswith("/infer"))
    )


def is_batch(scope: Scope) -> bool:
    return scope["path"].rstrip("/") == BATCH_PATH


def is_video(scope: Scope) -> bool:
    return scope["path"].rstrip("/") == VIDEO_PATH


def keep_uploads_in_memory() -> None:
    """Never let Starlette roll an uploaded file over to a temporary file on disk.

    Starlette keeps each uploaded file in a ``SpooledTemporaryFile`` that moves to disk past
    ``MultiPartParser.spool_max_size`` (1 MB). Uploads here are faces: they stay in memory, whose use the
    body-size limit bounds. The attribute is Starlette's documented knob and is process-wide.
    """
    if not hasattr(MultiPartParser, "spool_max_size"):  # a Starlette that moved the knob: fail loudly, not quietly
        raise RuntimeError("starlette.formparsers.MultiPartParser has no spool_max_size; uploads could reach the disk")
    MultiPartParser.spool_max_size = sys.maxsize


class LoadLimiter:
    """Admission for the inference routes: ``max_concurrency`` run, ``max_queue`` wait in order, others are refused.

    Counters only, no asyncio primitive bound to an event loop, so one app can be served by several loops
    (as tests do). Lives on ``app.state.load_limiter``.
    """

    def __init__(self, max_concurrency: int, max_queue: int) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    @property
    def full(self) -> bool:
        return self.running + self.waiting >= self.max_concurrency + self.max_queue

    async def acquire(self) -> None:
        if self.running < self.max_concurrency and not self.waiting:
            self.running += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # release() hands its slot over: `running` stays counted for us
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot arrived as we were cancelled: pass it on
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1


class RequestLimitsMiddleware:
    """Query length, body size, admission and timeout, in the service's one error shape."""

    def __init__(self, app: ASGIApp, settings: Settings, limiter: LoadLimiter) -> None:
        self.app = app
        self.max_body_bytes = settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
        self.max_upload_bytes = settings.max_upload_bytes
        self.max_batch_body_bytes = settings.batch_body_bytes() + MULTIPART_OVERHEAD_BYTES
        self.max_video_bytes = settings.max_video_bytes
        self.max_video_body_bytes = settings.max_video_bytes + MULTIPART_OVERHEAD_BYTES
        self.max_query_bytes = settings.max_query_bytes
        self.timeout = settings.request_timeout
        self.video_timeout = settings.video_timeout
        self.retry_after = settings.retry_after
        self.limiter = limiter
        self._abandoned: set[asyncio.Task[None]] = set()  # timed-out work still running; kept from the GC

    def _body_limit(self, scope: Scope) -> int:
        if is_video(scope):
            return self.max_video_body_bytes
        return self.max_batch_body_bytes if is_batch(scope) else self.max_body_bytes

    def _timeout(self, scope: Scope) -> float:
        return self.video_timeout if is_video(scope) else self.timeout

    def _too_large(self, scope: Scope, size: int | None) -> str:
        got = f"the request body is {size} bytes" if size is not None else "the request body is too large"
        if is_video(scope):
            return (
                f"{got}, over the video limit of {self.max_video_body_bytes} bytes (MIEN_MAX_VIDEO_BYTES="
                f"{self.max_video_bytes} plus room for the multipart envelope); send a shorter or more compressed video"
            )
        if is_batch(scope):
            return (
                f"{got}, over the batch limit of {self.max_batch_body_bytes} bytes (MIEN_MAX_BATCH_BYTES, unset: "
                "MIEN_MAX_BATCH_FILES × MIEN_MAX_UPLOAD_BYTES, plus room for the multipart envelope); send fewer or "
                "smaller images per batch"
            )
        return (
            f"{got}, over the limit of {self.max_body_bytes} bytes (MIEN_MAX_UPLOAD_BYTES={self.max_upload_bytes} "
            "plus room for the multipart envelope); send a smaller image, or fewer faces per /v2 request"
        )

    def _check_head(self, scope: Scope) -> None:
        """QueryTooLong, or TooLarge from the declared length before a byte of the body is read."""
        query = scope.get("query_string", b"")
        if len(query) > self.max_query_bytes:
            raise QueryTooLong(
                f"the query string is {len(query)} bytes, over the limit of {self.max_query_bytes} "
                "(MIEN_MAX_QUERY_BYTES); send the image in the body and only short parameters such as ?model=..."
            )
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._body_limit(scope):
            raise TooLarge(self._too_large(scope, int(declared)), body_unread=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._check_head(scope)
        except MienError as exc:  # out here the app's exception handlers do not run: answer it ourselves
            await mien_error_response(exc)(scope, receive, send)
            return

        received = 0
        limit = self._body_limit(scope)

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the app (its body parsing or route): its error handler answers.
                    raise TooLarge(self._too_large(scope, None))
            return message

        if not is_inference(scope):
            await self.app(scope, limited_receive, send)
            return
        await self._admitted(scope, limited_receive, send)

    async def _admitted(self, scope: Scope, receive: Receive, send: Send) -> None:
        limiter = self.limiter
        if limiter.full:
            busy = Busy(
                f"the service is busy: {limiter.running} requests are being worked on and {limiter.waiting} are "
                f"waiting (MIEN_MAX_CONCURRENCY={limiter.max_concurrency}, MIEN_MAX_QUEUE={limiter.max_queue}); "
                f"retry in {self.retry_after} s",
                self.retry_after,
            )
            await mien_error_response(busy)(scope, receive, send)
            return

        started = False  # the request holds a slot (it left the queue)
        answered = False  # a response has started, from the route or from the timeout below
        timed_out = False

        async def guarded_send(message: Message) -> None:
            nonlocal answered
            if timed_out:  # the client already has its 504; what the route answers late goes nowhere
                return
            if message["type"] == "http.response.start":
                answered = True
            await send(message)

        async def run() -> None:
            nonlocal started
            await limiter.acquire()
            started = True
            try:
                await self.app(scope, receive, guarded_send)
            finally:
                limiter.release()

        task = asyncio.ensure_future(run())
        timeout = self._timeout(scope)
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if done or answered:
            await task  # finished, or streaming its answer: let it end (and raise what it raised)
            return
        timed_out = True
        if started and is_video(scope):
            # The video route stops its worker at the next frame when cancelled (routes/analyze.py): its slot and
            # its temporary file are given back before the 504 goes out.
            task.cancel()
            await asyncio.wait({task})
            where = "was being worked on"
        elif started:
            # A worker thread cannot be stopped: let the work end in the background, still holding its slot.
            self._abandoned.add(task)
            task.add_done_callback(self._forget)
            where = "was being worked on"
        else:
            task.cancel()
            where = "was still waiting for a free slot"
        timed_out_error = TimedOut(
            f"the request took longer than {timeout:g} s "
            f"({'MIEN_VIDEO_TIMEOUT' if is_video(scope) else 'MIEN_REQUEST_TIMEOUT'}) and {where}; "
            "retry, or send a smaller image or fewer faces (a shorter video, or a lower fps)",
            self.retry_after,
        )
        await mien_error_response(timed_out_error)(scope, receive, send)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._abandoned.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a request that had timed out failed afterwards", exc_info=task.exception())


def install_limits(app: FastAPI, settings: Settings) -> None:
    """Add the limits middleware (with its admission counters on ``app.state.load_limiter``, exported by
    ``app.state.metrics`` as ``mien_inflight_requests`` and ``mien_queued_requests``)."""
    keep_uploads_in_memory()
    app.state.load_limiter = LoadLimiter(settings.max_concurrency, settings.max_queue)
    app.state.metrics.track_load(app.state.load_limiter)
    app.add_middleware(RequestLimitsMiddleware, settings=settings, limiter=app.state.load_limiter)
