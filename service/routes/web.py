"""GET /: the page a person uses (pick a model, upload a photo or turn on the camera, watch the probabilities).

Three static files from ``service/static/``: the page, its script and its style sheet. They load nothing from
anywhere but this server, and the page's Content-Security-Policy keeps it that way. Only the files named in
``ASSETS`` are served, so no request path can reach another file. None of these routes is in the OpenAPI schema:
they are the page, not the API.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from mien.service.exceptions import StaticFileNotFound

router = APIRouter(tags=["web"], include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
# Everything from this server only; the camera preview is a MediaStream, uploaded photos are blob: URLs.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "media-src 'self' blob: mediastream:; connect-src 'self'; object-src 'none'; base-uri 'self'; "
    "form-action 'self'; frame-ancestors 'none'"
)
# Small files that change with the service: the browser asks again each time (304 when unchanged).
NO_CACHE = {"Cache-Control": "no-cache"}


@router.get("/")
def page() -> FileResponse:
    headers = NO_CACHE | {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff"}
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=headers)


@router.get("/static/{name}")
def asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise StaticFileNotFound(f"no static file {name!r}; the page uses {', '.join(sorted(ASSETS))}")
    return FileResponse(
        STATIC_DIR / name, media_type=media_type, headers=NO_CACHE | {"X-Content-Type-Options": "nosniff"}
    )
