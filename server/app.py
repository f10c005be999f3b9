"""create_app(settings): the FastAPI app, its routes and the lifespan that loads models."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import torch
from fastapi import Depends, FastAPI

from pipelines.base import pick_device
from pipelines.registry import MODEL_ID, VLM, WeightsInfo, best_weights, describe
from pipelines.sdxl_turbo import Limits, SDXLTurbo
from pipelines.vlm import VisionLanguageModel
from server.batches.service import BatchService
from server.config import Settings
from server.http import errors
from server.http.deps import authenticate
from server.http.routes import batches, chat, dashboard, gemini, images, ops, usage, web
from server.media.budget import PixelBudget
from server.ops.metrics import Metrics
from server.providers.base import CloudProvider
from server.providers.local.batcher import BatchPolicy
from server.providers.local.chat import LocalChat
from server.providers.local.images import LocalImages
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


def batch_policy(settings: Settings) -> BatchPolicy:
    b = settings.batch
    return BatchPolicy(max_batch=b.max_batch, max_batch_pixels=b.max_batch_pixels,
                       max_wait_s=b.max_wait_ms / 1000, max_queue=b.max_queue)


def resolve_weights(settings: Settings) -> WeightsInfo:
    if settings.sdxl_weights is not None:
        return describe(settings.sdxl_weights)
    found = best_weights(settings.weights_dir)
    if found is None:
        raise FileNotFoundError(
            f"no SDXL weights under {settings.weights_dir.resolve()}: run "
            "`spillway weights tiny` (built-in default) or `spillway weights fetch sdxl-turbo`")
    return found


def _device(settings: Settings) -> torch.device:
    device = pick_device(settings.device)
    if device.type == "cpu":
        # The models' threads would otherwise spin on every core and starve the event
        # loop that parses requests and encodes images (measured: 124 -> 153 images/s).
        torch.set_num_threads(settings.cpu_threads or max(1, (os.cpu_count() or 2) - 1))
    return device


def load_engine(settings: Settings) -> tuple[SDXLTurbo, WeightsInfo]:
    weights = resolve_weights(settings)
    limits = Limits(min_side=settings.images.min_side, max_side=settings.images.max_side)
    device = _device(settings)
    engine = SDXLTurbo.load(weights.path, device, variant=weights.variant,
                            xformers=settings.xformers, limits=limits)
    return engine, weights


def load_local_images(settings: Settings) -> LocalImages:
    engine, weights = load_engine(settings)
    description = f"{engine.device.type}, {str(engine.pipe.dtype).removeprefix('torch.')}, " \
                  f"{engine.attention}"
    return LocalImages(MODEL_ID, weights, engine.run, batch_policy(settings),
                       settings.batch.default_timeout_s, description)


def load_vlm(settings: Settings) -> tuple[VisionLanguageModel, WeightsInfo]:
    weights = best_weights(settings.weights_dir, VLM)
    if weights is None:
        raise FileNotFoundError(
            f"no vision-language weights under {settings.weights_dir.resolve()}: run "
            "`spillway weights tiny` (built-in default) or `spillway weights fetch qwen3-vl-4b`")
    return VisionLanguageModel.load(weights.path, _device(settings)), weights


def load_local_chat(settings: Settings) -> LocalChat:
    model, weights = load_vlm(settings)
    v = settings.vlm
    policy = BatchPolicy(max_batch=v.max_batch, max_batch_pixels=2**62,
                         max_wait_s=v.max_wait_ms / 1000, max_queue=v.max_queue)
    description = f"{model.device.type}, {str(model.model.dtype).removeprefix('torch.')}"
    return LocalChat(VLM.model_id, weights, model.generate,
                     lambda item: model.count_prompt_tokens(item.messages, item.images),
                     model.context_length, policy, v.timeout_s, description)


def build_providers(settings: Settings) -> dict[str, CloudProvider]:
    """Cloud providers with a key in settings; a server without keys runs local-only."""
    providers: dict[str, CloudProvider] = {}
    if settings.openai.configured:
        from server.providers.openai import OpenAIProvider

        providers["openai"] = OpenAIProvider(settings.openai, settings.prices)
    if settings.gemini.configured:
        from server.providers.gemini import GeminiProvider

        providers["gemini"] = GeminiProvider(settings.gemini, settings.prices)
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


def create_app(settings: Settings, loader: Loader | None = load_local_images,
               chat_loader: ChatLoader | None = load_local_chat) -> FastAPI:
    """``chat_loader=None`` serves images only (as does ``SPILLWAY_VLM__ENABLED=false``);
    ``loader=None`` serves chat only."""
    state = AppState(settings, ImageStore(settings.images.url_ttl_s,
                                          settings.images.url_store_mb * 2**20),
                     chat_enabled=settings.vlm.enabled and chat_loader is not None,
                     images_enabled=loader is not None,
                     pixels=PixelBudget(settings.media.max_decoding_pixels,
                                        settings.media.decode_wait_s))
    state.metrics = Metrics.for_app(state)

    async def load(what: str, build: Callable[[Settings], LocalImages | LocalChat]) -> None:
        try:
            local = await asyncio.to_thread(build, settings)
        except Exception as exc:
            state.load_error = str(exc)
            log.exception("%s load failed: %s", what, exc)
            return
        local.batcher.on_batch = state.metrics.observe_batch
        local.start()
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
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
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

    app = FastAPI(title="Spillway", version="0.1.0", lifespan=lifespan)
    app.state.spillway = state
    errors.install(app)
    app.include_router(ops.router)
    app.include_router(images.public_router)
    app.include_router(images.router, dependencies=[Depends(authenticate)])
    app.include_router(chat.router, dependencies=[Depends(authenticate)])
    app.include_router(usage.router, dependencies=[Depends(authenticate)])
    app.include_router(dashboard.router, dependencies=[Depends(authenticate)])
    app.include_router(web.router)  # the page needs no key; the API calls it makes do
    app.include_router(batches.router, dependencies=[Depends(authenticate)])
    app.include_router(gemini.router, dependencies=[Depends(authenticate)])
    # RequestContext, with the Files API's larger body cap on POST /v1/files only.
    app.add_middleware(batches.UploadBodyLimit, max_body=int(settings.max_body_mb * 2**20))
    return app
