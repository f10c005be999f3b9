"""Who is calling: API keys, the admin key, and per-key daily quotas."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass

from fastapi import Request

from server.errors import APIError, is_gemini_path
from server.keys import KeyInfo
from server.state import AppState, State


@dataclass(frozen=True)
class Caller:
    name: str | None  # the key's name; None on an open server
    admin: bool = False
    bulk: bool = False  # the key's priority
    key: KeyInfo | None = None


OPEN = Caller(None)


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
        request.state.caller = Caller("admin", admin=True)
        return
    keys = state.keys
    if keys is None or not await asyncio.to_thread(keys.any_active):
        request.state.caller = OPEN
        return
    if not token:
        raise _unauthorized("This server needs an API key: send 'Authorization: Bearer <key>' "
                             "(or 'x-goog-api-key: <key>').")
    info = await asyncio.to_thread(keys.lookup, token)
    if info is None:
        # Never echo the key: OpenAI's message shows a masked form; we show none of it.
        raise _unauthorized("Incorrect API key provided.")
    request.state.caller = Caller(info.name, bulk=info.priority == "bulk", key=info)


def caller_of(request: Request) -> Caller:
    caller: Caller = getattr(request.state, "caller", OPEN)
    return caller


async def check_quota(state: AppState, caller: Caller, images: int = 0) -> None:
    """429 ``insufficient_quota`` when this request would pass the key's daily quota."""
    info = caller.key
    if info is None or (info.daily_images is None and info.daily_usd is None):
        return
    dispatcher = state.dispatcher
    if dispatcher is None or dispatcher.ledger is None:
        return
    used_images, used_usd = await asyncio.to_thread(dispatcher.ledger.used_today, info.name)
    if info.daily_images is not None and used_images + images > info.daily_images:
        raise APIError(429, f"The key {info.name!r} has used {used_images} of its "
                       f"{info.daily_images} images today.", type="insufficient_quota",
                       code="insufficient_quota")
    if info.daily_usd is not None and used_usd >= info.daily_usd:
        raise APIError(429, f"The key {info.name!r} has spent ${used_usd:.2f} of its "
                       f"${info.daily_usd:.2f} today.", type="insufficient_quota",
                       code="insufficient_quota")
