"""What the app holds while it runs, reachable from routes as a dependency."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from server.config import Settings
from server.errors import APIError
from server.image_store import ImageStore
from server.providers.local import LocalImages


@dataclass
class AppState:
    settings: Settings
    store: ImageStore
    images: LocalImages | None = None
    load_error: str | None = None
    loader: asyncio.Task[None] | None = field(default=None, repr=False)

    def local_images(self) -> LocalImages:
        if self.images is None:
            message = ("The model is still loading." if self.load_error is None
                       else "The model failed to load; see the server log.")
            raise APIError(503, message, type="server_error", code="model_not_ready",
                           headers={"Retry-After": "5"})
        return self.images


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.spillway
    return state


State = Annotated[AppState, Depends(get_state)]
