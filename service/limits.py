"""Refuse oversized request bodies before they are read into memory or spooled to disk.

A declared ``Content-Length`` over the limit is answered with 413 without reading the body; a body
without one (chunked) is counted while it streams and stopped as soon as it passes the limit.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import TooLarge, error_response


class BodySizeLimitMiddleware:
    """Pure ASGI middleware: 413 in the service's error shape for bodies over ``max_body_bytes``."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, hint: str = "") -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.hint = hint

    def _message(self, size: int | None) -> str:
        got = f"the request body is {size} bytes" if size is not None else "the request body is too large"
        return f"{got}, over the limit of {self.max_body_bytes} bytes{self.hint}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            response = error_response(413, "too_large", self._message(int(declared)), headers={"Connection": "close"})
            await response(scope, receive, send)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # An HTTPException, so FastAPI's body parsing re-raises it and the error handler answers.
                    raise TooLarge(self._message(None))
            return message

        await self.app(scope, limited_receive, send)
