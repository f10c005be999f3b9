"""What every route depends on: the container, who is calling (API keys, the admin key),
the client's deadline, racing the client, and the request's account."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

from server.errors import APIError, bad_request
from server.http.errors import is_gemini_path
from server.services import AppState
from server.serving import Serving
from server.serving.accounting import ADMIN, OPEN, Account, Caller
from server.wire import safejson

T = TypeVar("T")
DEADLINE_HEADER = "x-spillway-max-wait-ms"


async def get_state(request: Request) -> AppState:
    """Async on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, one
    hop per request, and under a burst the hop's queue is where a 429 waited."""
    state: AppState = request.app.state.spillway
    return state


State = Annotated[AppState, Depends(get_state)]


# -- who is calling ---------------------------------------------------------------------
def _token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    goog = request.headers.get("x-goog-api-key", "").strip()
    if not goog and is_gemini_path(request.url.path):
        goog = request.query_params.get("key", "").strip()  # Google's REST examples: ?key=
    return goog


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, type="invalid_request_error", code="invalid_api_key")


async def authenticate(request: Request, state: State) -> None:
    """A router dependency: sets ``request.state.caller`` or answers 401."""
    token = _token(request)
    admin = state.settings.admin_key
    if admin is not None and token and hmac.compare_digest(
            token.encode(), admin.get_secret_value().encode()):
        request.state.caller = ADMIN
        return
    keys = state.keys
    if not await state.is_closed():
        request.state.caller = OPEN
        return
    if not token:
        raise _unauthorized("This server needs an API key: send 'Authorization: Bearer <key>' "
                             "(or 'x-goog-api-key: <key>').")
    if keys is None:
        info = None
    elif keys.fresh():
        info = keys.cached_lookup(token)
    else:
        info = await asyncio.to_thread(keys.lookup, token)
    if info is None:
        # Never echo the key: OpenAI's message shows a masked form; we show none of it.
        raise _unauthorized("Incorrect API key provided.")
    request.state.caller = Caller.of_key(info)


def caller_of(request: Request) -> Caller:
    caller: Caller = getattr(request.state, "caller", OPEN)
    return caller


# -- the request ------------------------------------------------------------------------
def deadline_s(request: Request, state: AppState) -> float:
    """What is left now of the client's ``x-spillway-max-wait-ms`` (else the configured
    default), counted from the request's arrival: time spent reading and checking it
    is time the job no longer has."""
    raw = request.headers.get(DEADLINE_HEADER)
    if raw is None:
        value = state.settings.router.default_deadline_ms
    else:
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not 0 <= value <= 86_400_000:
            raise bad_request(f"{DEADLINE_HEADER} must be milliseconds between 0 and "
                              "86400000.", param=DEADLINE_HEADER)
    arrived = getattr(request.state, "arrived", None)
    spent = time.monotonic() - arrived if arrived is not None else 0.0
    return max(0.0, value / 1000 - spent)


async def json_body(request: Request) -> Any:
    """A JSON body we parse ourselves (not through a pydantic model): ``safejson``, so
    deep nesting and lone surrogates are a 400 naming where, never a RecursionError."""
    try:
        return safejson.parse(await request.body())
    except safejson.JSONError as exc:
        raise bad_request(exc.message, param=exc.path, code="invalid_json") from None


def new_account(request: Request, endpoint: str, model: str | None) -> Account:
    """The request's account, left on ``request.state`` for the access log and the
    request metrics (server/http/middleware.py)."""
    # Its latency counts from the request's arrival, as the access log's does.
    arrived = getattr(request.state, "arrived", None)
    account = Account(endpoint, model or "auto", caller_of(request),
                      request_id=getattr(request.state, "request_id", None),
                      **({"started": arrived} if arrived is not None else {}))
    request.state.account = account
    return account


@asynccontextmanager
async def accounted(request: Request, serving: Serving, endpoint: str, model: str | None
                    ) -> AsyncIterator[Account]:
    """One ledger row per request: what ran where, what it cost, or how it failed."""
    account = new_account(request, endpoint, model)
    try:
        yield account
    except APIError as err:
        account.failed(err)
        raise
    finally:
        await serving.accounting.close(account)


# -- racing the client --------------------------------------------------------------------
class ClientGone(Exception):
    pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Race the work against the client leaving; if it leaves, the work is cancelled
    (and with it every queued item of the request), and what it does when cancelled (its
    account says 499) is done before this raises ``ClientGone``.

    The work runs in this task, not a task of its own: a new task would start only after
    one trip round the event loop, and under a burst of requests that trip waits behind
    every other request's turn (a 429 decided at once must not). A watcher task cancels
    this one when the client leaves."""
    current = asyncio.current_task()
    assert current is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        current.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise  # the server cancels the request (shutdown): not the client's doing
        current.uncancel()
        raise ClientGone from None
    finally:
        watcher.cancel()
