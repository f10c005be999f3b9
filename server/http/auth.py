"""Who is calling: API keys, the admin key, and per-key daily quotas."""

from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import dataclass

from fastapi import Request

from server.errors import APIError, is_gemini_path
from server.services import AppState, State
from server.store.keys import ADMIN_OWNER, KeyInfo
from server.store.quotas import Limits, QuotaExceeded, Reservation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caller:
    name: str | None  # what logs and listings show: the key's name, "admin"; None: open
    owner: str | None = None  # who owns what it makes (server/store/keys.py): never a name
    admin: bool = False
    bulk: bool = False  # the key's priority
    key: KeyInfo | None = None

    @staticmethod
    def of_key(info: KeyInfo) -> Caller:
        return Caller(info.name, info.owner, bulk=info.priority == "bulk", key=info)


OPEN = Caller(None)
ADMIN = Caller(ADMIN_OWNER, ADMIN_OWNER, admin=True)


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
    if not await is_closed(state):
        request.state.caller = OPEN
        return
    if not token:
        raise _unauthorized("This server needs an API key: send 'Authorization: Bearer <key>' "
                             "(or 'x-goog-api-key: <key>').")
    info = None if keys is None else await asyncio.to_thread(keys.lookup, token)
    if info is None:
        # Never echo the key: OpenAI's message shows a masked form; we show none of it.
        raise _unauthorized("Incorrect API key provided.")
    request.state.caller = Caller.of_key(info)


async def is_closed(state: AppState) -> bool:
    """Keys are needed once any is configured: the admin key, or a team key ever made
    (revoking the last one does not open the server). Fails closed until the key store
    is up."""
    if state.settings.admin_key is not None:
        return True
    keys = state.keys
    return keys is None or await asyncio.to_thread(keys.any_keys)


def caller_of(request: Request) -> Caller:
    caller: Caller = getattr(request.state, "caller", OPEN)
    return caller


async def reserve_quota(state: AppState, caller: Caller, images: int = 0,
                        usd: float = 0.0) -> Reservation | None:
    """Reserve ``images`` and up to ``usd`` of the key's daily quota before the work runs,
    or answer 429 ``insufficient_quota``. ``settle_quota`` when the work ends."""
    info = caller.key
    if info is None or (info.daily_images is None and info.daily_usd is None):
        return None
    quotas = state.quotas
    if quotas is None:  # the app is starting: nothing runs yet, but never unmetered
        raise state.not_ready()
    try:
        return await asyncio.to_thread(quotas.reserve, info.owner,
                                       Limits(info.daily_images, info.daily_usd), images, usd)
    except QuotaExceeded as exc:
        if exc.what == "busy":
            raise APIError(503, "The key's quota counter is too busy; retry.",
                           type="server_error", code="quota_busy",
                           headers={"Retry-After": "1"}) from None
        if exc.what == "images":
            message = (f"The key {info.name!r} has used {int(exc.used)} of its "
                       f"{int(exc.limit)} images today; this request needs {images}.")
        else:
            message = (f"The key {info.name!r} has spent ${exc.used:.2f} of its "
                       f"${exc.limit:.2f} today.")
        raise APIError(429, message, type="insufficient_quota",
                       code="insufficient_quota") from None


async def settle_quota(state: AppState, reservation: Reservation | None, images: int,
                       usd: float) -> None:
    """Count what the request used instead of what it reserved. A failure here leaves
    the reservation counted (the quota errs towards refusing) and is logged."""
    if reservation is None or state.quotas is None:
        return
    try:
        await asyncio.to_thread(state.quotas.settle, reservation, images, usd)
    except Exception:
        log.exception("could not settle a quota reservation of %s", reservation.owner)
