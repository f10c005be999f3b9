"""The composition root: ``create_app(settings)`` builds every part (ledger, dispatcher,
serving, keys, quotas, the Batch API), wires the observers (``on_batch``, ``on_record``
into the metrics) and runs the lifespan that loads the models. The only module that knows
all the parts; the HTTP side is server/http/api.py."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from server.batches.service import BatchService
from server.config import Settings
from server.http.api import API, build_api
from server.media.budget import PixelBudget
from server.ops.metrics import Metrics, known_models
from server.providers.base import CloudProvider
from server.providers.local.chat import LocalChat
from server.providers.local.images import LocalImages
from server.providers.local.loading import load_local_chat, load_local_images
from server.routing.dispatch import Dispatcher
from server.services import AppState
from server.serving import Serving
from server.store.image_store import ImageStore
from server.store.keys import KeyStore
from server.store.ledger import Ledger
from server.store.quotas import Quotas

log = logging.getLogger("spillway")

Loader = Callable[[Settings], LocalImages]
ChatLoader = Callable[[Settings], LocalChat]


def build_providers(settings: Settings) -> dict[str, CloudProvider]:
    """One provider per configured upstream, by kind; without any, the server runs
    local-only."""
    providers: dict[str, CloudProvider] = {}
    for up in settings.clouds:
        if up.kind == "gemini":
            from server.providers.gemini import GeminiProvider

            providers[up.name] = GeminiProvider(up, settings.prices)
        elif up.kind == "anthropic":
            from server.providers.anthropic import AnthropicProvider

            providers[up.name] = AnthropicProvider(up, settings.prices)
        else:
            from server.providers.openai import OpenAIProvider

            providers[up.name] = OpenAIProvider(up, settings.prices)
    return providers


async def _say_auth_mode(state: AppState) -> None:
    """Open or closed, the operator hears it at startup (AppState.is_closed)."""
    if await state.is_closed():
        keys = state.keys.list() if state.keys is not None else []
        active = sum(k.active for k in keys)
        log.info("auth: an API key is required (admin key %s; %d team keys active, %d "
                 "revoked)", "set" if state.settings.admin_key else "not set", active,
                 len(keys) - active)
    else:
        log.warning("auth: OPEN. No API key is configured (no SPILLWAY_ADMIN_KEY, no key "
                    "made with `spillway keys create`): anyone who can reach this port can "
                    "use it and read all usage")


async def _flush_ledger(ledger: Ledger, every_s: float = 5.0) -> None:
    """Rows held while the database refused writes (a full disk) go in once it takes them."""
    while True:
        await asyncio.sleep(every_s)
        if ledger.held:
            left = await asyncio.to_thread(ledger.flush_held)
            if not left:
                log.info("ledger: the held rows are written")


async def _refresh_keys(keys: KeyStore) -> None:
    """Keep the key cache fresh in the background: a request then checks its key with no
    thread hop (KeyStore.fresh), and a key made or revoked by another process (the CLI)
    is seen within the cache's life."""
    while True:
        try:
            await asyncio.to_thread(keys.refresh)
        except Exception as exc:  # noqa: BLE001 - requests fall back to their own lookup
            log.warning("keys: could not refresh the cache (%s)", exc)
        await asyncio.sleep(keys.ttl_s / 4)


def create_app(settings: Settings, loader: Loader | None = load_local_images,
               chat_loader: ChatLoader | None = load_local_chat) -> API:
    """``chat_loader=None`` serves images only (as does ``SPILLWAY_VLM__ENABLED=false``);
    ``loader=None`` serves chat only."""
    state = AppState(settings, ImageStore(settings.images.url_ttl_s,
                                          settings.images.url_store_mb * 2**20),
                     chat_enabled=settings.vlm.enabled and chat_loader is not None,
                     images_enabled=loader is not None,
                     pixels=PixelBudget(settings.media.max_decoding_pixels,
                                        settings.media.decode_wait_s))
    state.metrics = Metrics(known_models(settings), state.live)

    async def load(what: str, build: Callable[[Settings], LocalImages | LocalChat]) -> None:
        try:
            local = await asyncio.to_thread(build, settings)
        except Exception as exc:
            state.load_error = str(exc)
            log.exception("%s load failed: %s", what, exc)
            return
        local.batcher.on_batch = state.metrics.observe_batch
        local.start()
        if isinstance(local, LocalImages) and settings.batch.warmup:
            width, _, height = settings.images.default_size.partition("x")
            try:
                await asyncio.to_thread(local.warm_up, int(width), int(height),
                                        settings.images.default_steps)
            except Exception as exc:  # noqa: BLE001 - it serves anyway, on the prior
                log.warning("%s: warm-up failed (%s); estimates start from the prior",
                            local.model_id, exc)
        dispatcher = state.require_dispatcher()
        if isinstance(local, LocalImages):
            state.images = dispatcher.images_local = local
        else:
            state.chat = dispatcher.chat_local = local
        log.info("serving %s from %s [%s] (%s)", local.model_id, local.weights.path,
                 local.weights.label, local.description)
        if local.weights.source != "hub":
            log.warning("%s has random weights: its output is noise. For real output: "
                        "spillway weights fetch %s", local.model_id, what)

    @asynccontextmanager
    async def lifespan(_: API) -> AsyncIterator[None]:
        ledger = Ledger(settings.ledger_url)
        state.dispatcher = Dispatcher(settings, build_providers(settings), ledger)
        state.dispatcher.on_record = state.metrics.observe_row
        state.keys = KeyStore(ledger)
        state.quotas = Quotas(ledger)
        state.serving = Serving.build(settings, state.dispatcher, state.quotas, state.pixels,
                                      chat_enabled=state.chat_enabled)
        await _say_auth_mode(state)
        state.batches = BatchService(
            settings, state.serving, state.keys,
            lambda: not state.shutting_down and (state.ready or state.load_error is not None))
        await state.batches.start()
        log.info("cloud providers: %s; ledger: %s",
                 ", ".join(state.dispatcher.providers) or "none (local only)",
                 settings.ledger_url.split("://")[0])
        # Load in the background: /healthz answers at once, /readyz says 503 until done.
        # One after the other: from_pretrained patches process-wide torch state (empty-
        # weight init on the meta device), and two loads at once corrupt each other.
        async def load_all() -> None:
            if loader is not None:
                await load("sdxl-turbo", loader)
            if state.chat_enabled and chat_loader is not None:
                await load("qwen3-vl-4b", chat_loader)

        state.loaders.append(asyncio.create_task(load_all()))
        state.loaders.append(asyncio.create_task(_flush_ledger(ledger), name="ledger-flush"))
        state.loaders.append(asyncio.create_task(_refresh_keys(state.keys), name="key-refresh"))
        try:
            yield
        finally:
            # Batch items in flight finish on the models; pending ones wait for next start.
            await state.batches.stop()
            for task in state.loaders:
                task.cancel()
            for local in (state.images, state.chat):
                if local is not None:
                    await asyncio.to_thread(local.close)
            await state.dispatcher.close()
            if ledger.held and await asyncio.to_thread(ledger.flush_held):
                log.error("ledger: %d rows could not be written before exit", ledger.held)
            ledger.close()

    return build_api(state, lifespan)
