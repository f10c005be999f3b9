"""The web page at ``/``: a playground and a dashboard, plain files shipped in the package.

The page itself needs no key: it holds no data. Everything it shows comes from the /v1
API, which it calls with the key the user types in (kept in the browser's localStorage).
"""

from __future__ import annotations

import re
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from server.errors import APIError

router = APIRouter()

WEB = resources.files("server") / "web"
MEDIA_TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8",
               "css": "text/css; charset=utf-8", "svg": "image/svg+xml"}
_NAME = re.compile(r"^[a-z][a-z0-9_-]*\.(html|js|css|svg)$")
# Nothing from elsewhere: no CDN, no fonts, no inline script; images may be data: URLs
# (b64_json answers, the picture being asked about) or this server's own /v1/images.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def _file(name: str) -> Response:
    match = _NAME.match(name)
    resource = WEB / name
    if match is None or not resource.is_file():
        raise APIError(404, f"No such file: {name[:80]!r}.", type="not_found_error",
                       code="not_found")
    return Response(resource.read_bytes(), media_type=MEDIA_TYPES[match.group(1)],
                    headers=HEADERS)


@router.get("/", include_in_schema=False)
async def index() -> Response:
    return _file("index.html")


@router.get("/web/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    return _file(name)
