"""A canary: a server on another loopback port that records whatever reaches it.

A redirecting fake upstream points here (``fake.redirect_to = canary.url + "/stolen"``);
a test then asserts that nothing, and above all no credential, arrived. It answers every
method on every path with 200 and an empty JSON object, as an attacker's server would
answer anything to keep the client talking.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tests.fakes import FakeUpstream, run_app

# Headers that carry an upstream credential, in any of the SDKs we use.
CREDENTIAL_HEADERS = ("authorization", "api-key", "x-goog-api-key", "x-api-key")


class Canary(FakeUpstream):
    def __init__(self) -> None:
        super().__init__()
        self.app = self._build()

    def credentials_seen(self) -> list[str]:
        """Every credential header value (and ``?key=``) that reached the canary."""
        seen = [c.headers[h] for c in self.calls for h in CREDENTIAL_HEADERS if h in c.headers]
        return seen + [c.query["key"] for c in self.calls if "key" in c.query]

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
        async def anything(path: str, request: Request) -> Response:
            body = await request.body()
            self.record(request.url.path, {k.lower(): v for k, v in request.headers.items()},
                        body.decode("utf-8", "replace"), dict(request.query_params))
            return JSONResponse({})

        return app


@contextmanager
def running_canary() -> Iterator[Canary]:
    canary = Canary()
    with run_app(canary.app, canary) as url:
        canary.url = url
        yield canary
