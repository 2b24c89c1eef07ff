"""The optional API key (``MIEN_API_KEY``) that the inference routes require when it is set.

A client sends it as ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``; both are declared with
FastAPI's security classes, so they appear in the OpenAPI schema (and in /docs' "Authorize" dialog).
Keys are compared in constant time. ``/health``, ``/ready``, ``/models``, the web page and the v2
health and metadata routes stay open; ``/metrics`` needs the key when ``MIEN_METRICS_NEED_KEY`` is true.

The key is checked before a route runs; ``POST /predict`` has its multipart body parsed by FastAPI before
any dependency runs, so an unauthenticated upload is still read (within the body-size limit) before the 401.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from mien.service.deps import SettingsDep
from mien.service.exceptions import Unauthorized

API_KEY_HEADER = "X-API-Key"

_api_key_header = APIKeyHeader(
    name=API_KEY_HEADER,
    scheme_name="APIKeyHeader",
    description="the service's key (MIEN_API_KEY), needed only when the service sets one",
    auto_error=False,
)
_bearer = HTTPBearer(
    scheme_name="Bearer",
    description="the same key as a bearer token: Authorization: Bearer <MIEN_API_KEY>",
    auto_error=False,
)


def _matches(given: str, expected: str) -> bool:
    # compare_digest takes bytes of any content (str only when ASCII) and does not stop at the first difference.
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8"))


def check_api_key(expected: str | None, header_key: str | None, bearer_key: str | None) -> None:
    """Nothing when no key is configured or either header carries it; Unauthorized otherwise."""
    if expected is None:
        return
    given = [key for key in (header_key, bearer_key) if key]
    if not given:
        raise Unauthorized(
            f"this service needs an API key: send it in the {API_KEY_HEADER} header "
            "(or as Authorization: Bearer <key>); ask the service's operator for it"
        )
    # Every given key is compared (no short cut), so the time taken does not say which header was right.
    matched = [_matches(key, expected) for key in given]
    if not any(matched):
        raise Unauthorized(f"the API key sent is not this service's; check the {API_KEY_HEADER} header's value")


def require_api_key(
    settings: SettingsDep,
    header_key: Annotated[str | None, Security(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    expected = settings.api_key.get_secret_value() if settings.api_key is not None else None
    check_api_key(expected, header_key, bearer.credentials if bearer is not None else None)


def require_metrics_key(
    settings: SettingsDep,
    header_key: Annotated[str | None, Security(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    if settings.metrics_need_key:
        require_api_key(settings, header_key, bearer)


#: ``dependencies=[ApiKey]`` on a route makes it need the key (when one is set).
ApiKey = Depends(require_api_key)
MetricsKey = Depends(require_metrics_key)
