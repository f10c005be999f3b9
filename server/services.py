"""The container: what the app holds while it runs. Built by server/app.py and read by
server/http/ (``deps.State``); nothing below them imports it: every other part is handed
the collaborators it needs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.config import Settings
from server.errors import APIError
from server.media.budget import PixelBudget
from server.ops.live import Live, Status, read_live
from server.ops.metrics import Metrics
from server.providers.local.chat import LocalChat
from server.providers.local.images import LocalImages
from server.retry_after import retry_headers
from server.routing.dispatch import Dispatcher
from server.serving import Serving
from server.store.image_store import ImageStore
from server.store.keys import KeyStore
from server.store.quotas import Quotas
from server.store.storage import free_bytes

if TYPE_CHECKING:
    from server.batches.service import BatchService
    from server.ops.dashboard_reads import DashboardReads


@dataclass
class AppState:
    settings: Settings
    store: ImageStore
    images: LocalImages | None = None
    chat: LocalChat | None = None
    chat_enabled: bool = True
    images_enabled: bool = True
    load_error: str | None = None
    loaders: list[asyncio.Task[None]] = field(default_factory=list, repr=False)
    dispatcher: Dispatcher | None = None
    serving: Serving | None = None  # made with the dispatcher
    keys: KeyStore | None = None
    quotas: Quotas | None = None
    shutting_down: bool = False
    batches: BatchService | None = None
    dashboard_reads: DashboardReads | None = None  # made on the first GET /v1/dashboard
    metrics: Metrics = field(default_factory=Metrics, repr=False)
    # Decoded image pixels all requests hold at once (media.max_decoding_pixels); None
    # bounds nothing, for code that runs without an app.
    pixels: PixelBudget | None = None

    def require_serving(self) -> Serving:
        if self.serving is None:
            raise self.not_ready()
        return self.serving

    async def is_closed(self) -> bool:
        """Keys are needed once any is configured: the admin key, or a team key ever made
        (revoking the last one does not open the server). Fails closed until the key
        store is up."""
        if self.settings.admin_key is not None:
            return True
        keys = self.keys
        if keys is None:
            return True
        # The cached answer costs no thread hop (a refusal under load must not queue
        # behind every admitted request's hops).
        if keys.fresh():
            return keys.cached_any_keys()
        return await asyncio.to_thread(keys.any_keys)

    def require_dispatcher(self) -> Dispatcher:
        if self.dispatcher is None:
            raise self.not_ready()
        return self.dispatcher

    @property
    def ready(self) -> bool:
        if self.shutting_down:
            return False
        if self.images is not None and self.images.batcher.live_devices() == 0:
            return False  # every engine worker is down (restarting): nothing takes work
        return ((self.images is not None or not self.images_enabled)
                and (self.chat is not None or not self.chat_enabled))

    def live(self) -> Live:
        """The one snapshot /readyz, /v1/models, the metrics and the dashboard read."""
        status: Status = ("ready" if self.ready else
                          "failed" if self.load_error is not None else "loading")
        return read_live(status, self.images, self.chat, self.dispatcher)

    def storage_problem(self) -> str | None:
        """What /readyz says is wrong with storage: ledger rows that could not be written
        (held in memory until they can), or too little free space. Unauthenticated, so
        no paths and no database text."""
        ledger = self.dispatcher.ledger if self.dispatcher is not None else None
        if ledger is not None and ledger.write_error is not None:
            return (f"the ledger cannot be written; {ledger.held} rows are held in memory "
                    "until it can")
        if self.batches is not None:
            free = free_bytes(self.batches.files_dir)
            if free is not None and free < self.settings.storage_min_free_mb * 2**20:
                return (f"{free // 2**20} MiB free where batch files are stored, below "
                        f"storage_min_free_mb ({self.settings.storage_min_free_mb})")
        return None

    def not_ready(self) -> APIError:
        message = ("The model is still loading." if self.load_error is None
                   else "The model failed to load; see the server log.")
        return APIError(503, message, type="server_error", code="model_not_ready",
                        headers=retry_headers(5.0))
