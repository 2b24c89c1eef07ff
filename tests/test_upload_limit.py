"""An upload over MIEN_MAX_UPLOAD_BYTES is refused with 413 ``too_large`` before its body is read when it declares
its length, and cut off within a chunk of the limit when it streams without one (docs/robustness.md)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tests.conftest import CPU


def _post_raw(app, chunks: list[bytes], headers: list[tuple[bytes, bytes]]) -> tuple[int, dict, int]:
    """Drive the ASGI app directly: (status, JSON body, how many body chunks the app asked for)."""
    reads = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal reads
        reads += 1
        if reads > len(chunks):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunks[reads - 1], "more_body": reads < len(chunks)}

    async def send(message: dict) -> None:
        sent.append(message)

    boundary = [(b"content-type", b"multipart/form-data; boundary=B")]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/predict",
        "raw_path": b"/predict",
        "root_path": "",
        "query_string": b"",
        "headers": boundary + headers,
        "client": ("test", 1),
        "server": ("test", 80),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body), reads


def _limited_app(model_dir: Path):
    from mien.service.config import Settings
    from mien.service.main import create_app

    return create_app(Settings(model_dir=model_dir, providers=CPU, max_upload_bytes=1000))


# The start of a well-formed upload, so that only the size can be wrong with it.
PART_HEAD = b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'


def test_declared_body_over_the_limit_is_refused_without_reading_a_byte(model_dir):
    chunks = [PART_HEAD] + [bytes(64 * 1024)] * 40
    status, body, reads = _post_raw(_limited_app(model_dir), chunks, [(b"content-length", b"2621440")])
    assert (status, body["error"]["code"]) == (413, "too_large")
    assert reads == 0


def test_streamed_body_over_the_limit_is_cut_off_early(model_dir):
    chunks = [PART_HEAD] + [bytes(64 * 1024)] * 40  # 2.5 MB, no Content-Length; the limit is 1000 + 64 KiB
    status, body, reads = _post_raw(_limited_app(model_dir), chunks, [])
    assert (status, body["error"]["code"]) == (413, "too_large")
    assert reads <= 4  # the part's head, then at most 64 KiB + 1000 bytes and the chunk that passes it
